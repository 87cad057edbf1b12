#include "runtime/dist/dist_checkpoint.h"

#include <filesystem>

#include <nlohmann/json.hpp>

#include "runtime/io/safetensors.h"

namespace fs = std::filesystem;

namespace llama3::dist {

void save_pieces(const std::string& dir, int rank, const std::vector<Piece>& pieces,
                 const std::map<std::string, std::string>& info) {
  fs::create_directories(dir);
  io::TensorMap tensors;
  std::map<std::string, std::string> meta = info;
  nlohmann::json slices = nlohmann::json::object();
  for (const Piece& p : pieces) {
    LLAMA3_CHECK(!tensors.count(p.name), "checkpoint: piece '{}' twice on rank {}", p.name, rank);
    tensors[p.name] = p.data.contiguous().view({p.data.numel()});
    slices[p.name] = {{"full_shape", p.full_shape}, {"split_dim", p.split_dim}, {"tp_index", p.tp_index},
                      {"tp_size", p.tp_size}, {"offset", p.offset}};
  }
  meta["llama3.slices"] = slices.dump();
  meta["llama3.format"] = "dist-pieces-v1";
  const std::string path = fmt::format("{}/rank-{:05}.safetensors", dir, rank);
  io::save_safetensors(path + ".tmp", tensors, meta);
  fs::rename(path + ".tmp", path);
}

std::map<std::string, Tensor> load_full(const std::string& dir, std::map<std::string, std::string>* info) {
  LLAMA3_CHECK(fs::is_directory(dir), "checkpoint: {} is not a directory", dir);
  std::vector<std::string> files;
  for (auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("rank-", 0) == 0 && e.path().extension() == ".safetensors") files.push_back(e.path().string());
  }
  std::sort(files.begin(), files.end());
  LLAMA3_CHECK(!files.empty(), "checkpoint: {} has no rank-*.safetensors", dir);
  std::map<std::string, Tensor> full;
  std::map<std::string, int64_t> covered;
  for (size_t f = 0; f < files.size(); ++f) {
    std::map<std::string, std::string> meta;
    io::TensorMap tensors = io::load_safetensors(files[f], &meta);
    LLAMA3_CHECK(meta.count("llama3.slices"), "checkpoint: {} has no slice metadata", files[f]);
    if (f == 0 && info) *info = meta;
    const nlohmann::json slices = nlohmann::json::parse(meta["llama3.slices"]);
    for (auto& [name, t] : tensors) {
      const auto& s = slices.at(name);
      const Shape fshape = s.at("full_shape").get<Shape>();
      const int split = s.at("split_dim").get<int>();
      const int64_t tpi = s.at("tp_index").get<int64_t>(), tps = s.at("tp_size").get<int64_t>();
      const int64_t off = s.at("offset").get<int64_t>();
      auto it = full.find(name);
      if (it == full.end()) it = full.emplace(name, Tensor::zeros(fshape, DType::f32)).first;
      LLAMA3_CHECK(it->second.shape() == fshape, "checkpoint: {} in {} has full shape {}, elsewhere {}", name,
                   files[f], shape_str(fshape), shape_str(it->second.shape()));
      Tensor local = it->second;
      if (split >= 0) {
        const int64_t n = fshape[size_t(split)] / tps;
        local = local.narrow(split, tpi * n, n);
      }
      const int64_t ln = local.numel(), pn = t.numel();
      LLAMA3_CHECK(off >= 0 && off + pn <= ln, "checkpoint: {} in {}: range [{}, {}) outside {} elements", name,
                   files[f], off, off + pn, ln);
      // Copy the flat range into the (possibly strided) tp-local view, row by row of its layout.
      Tensor lc = local.contiguous().clone();
      lc.view({ln}).narrow(0, off, pn).copy_(t.view({pn}));
      local.copy_(lc);
      covered[name] += pn;
    }
  }
  for (auto& [name, t] : full)
    LLAMA3_CHECK(covered[name] == t.numel(), "checkpoint: {} covers {} of {} elements of {}", dir, covered[name],
                 t.numel(), name);
  return full;
}

}  // namespace llama3::dist
