#include "runtime/io/safetensors.h"

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"

namespace llama3::io {

namespace {

const char* st_dtype(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
    case DType::u8: return "U8";
    case DType::f64: return "F64";
  }
  return "?";
}

DType from_st_dtype(const std::string& s, const std::string& path, const std::string& name) {
  for (DType t : {DType::f32, DType::bf16, DType::f16, DType::i32, DType::i64, DType::u8, DType::f64})
    if (s == st_dtype(t)) return t;
  fail("{}: tensor '{}' has unsupported dtype '{}'", path, name, s);
}

}  // namespace

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<Tensor> host;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    Tensor h = t.to(Device::cpu()).contiguous();
    header[name] = {{"dtype", st_dtype(h.dtype())},
                    {"shape", h.shape()},
                    {"data_offsets", {offset, offset + h.nbytes()}}};
    offset += h.nbytes();
    host.push_back(h);
  }
  std::string hs = header.dump();
  hs.append((8 - hs.size() % 8) % 8, ' ');  // align data to 8 bytes
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  LLAMA3_CHECK(f, "cannot write {}", path);
  uint64_t n = hs.size();
  f.write(reinterpret_cast<const char*>(&n), 8);
  f.write(hs.data(), std::streamsize(hs.size()));
  for (const Tensor& h : host) f.write(static_cast<const char*>(h.data_ptr()), std::streamsize(h.nbytes()));
  f.flush();
  LLAMA3_CHECK(f, "write to {} failed (disk full?)", path);
}

TensorMap load_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  LLAMA3_CHECK(f, "cannot open {}", path);
  const uint64_t file_size = uint64_t(f.tellg());
  f.seekg(0);
  LLAMA3_CHECK(file_size >= 8, "{}: truncated ({} bytes, no header length)", path, file_size);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  LLAMA3_CHECK(n <= file_size - 8, "{}: header length {} exceeds the file size {}", path, n, file_size);
  std::string hs(n, '\0');
  f.read(hs.data(), std::streamsize(n));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(hs);
  } catch (const std::exception& e) {
    fail("{}: malformed safetensors header: {}", path, e.what());
  }
  const uint64_t data_start = 8 + n, data_size = file_size - data_start;
  TensorMap out;
  for (auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (metadata)
        for (auto& [k, v] : info.items()) (*metadata)[k] = v.get<std::string>();
      continue;
    }
    try {
      DType dt = from_st_dtype(info.at("dtype").get<std::string>(), path, name);
      Shape shape = info.at("shape").get<Shape>();
      auto off = info.at("data_offsets").get<std::vector<uint64_t>>();
      LLAMA3_CHECK(off.size() == 2 && off[0] <= off[1] && off[1] <= data_size,
                   "{}: tensor '{}' data [{}, {}) lies outside the {} data bytes (truncated file?)",
                   path, name, off.size() > 0 ? off[0] : 0, off.size() > 1 ? off[1] : 0, data_size);
      LLAMA3_CHECK(off[1] - off[0] == uint64_t(shape_numel(shape)) * dtype_size(dt),
                   "{}: tensor '{}' has {} bytes for shape {} of {}", path, name, off[1] - off[0],
                   shape_str(shape), dtype_name(dt));
      Tensor t = Tensor::empty(shape, dt);
      f.seekg(std::streamoff(data_start + off[0]));
      f.read(static_cast<char*>(t.data_ptr()), std::streamsize(t.nbytes()));
      LLAMA3_CHECK(f, "{}: reading tensor '{}' failed", path, name);
      out.emplace(name, std::move(t));
    } catch (const nlohmann::json::exception& e) {
      fail("{}: malformed entry for tensor '{}': {}", path, name, e.what());
    }
  }
  return out;
}

}  // namespace llama3::io
