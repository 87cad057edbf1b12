#include "runtime/io/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>

#include "runtime/core/error.h"

namespace fs = std::filesystem;

namespace llama3::io {

namespace {
void fsync_path(const std::string& p) {
  int fd = ::open(p.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}
}  // namespace

uint32_t file_crc32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LLAMA3_CHECK(f, "cannot open {}", path);
  uLong crc = crc32(0L, Z_NULL, 0);
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), std::streamsize(buf.size()));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), uInt(f.gcount()));
  }
  return uint32_t(crc);
}

CheckpointWriter::CheckpointWriter(std::string dir) : dir_(std::move(dir)), tmp_(dir_ + ".tmp") {
  fs::remove_all(tmp_);
  fs::create_directories(tmp_);
}

void CheckpointWriter::tensors(const std::string& file, const TensorMap& t,
                               const std::map<std::string, std::string>& metadata) {
  save_safetensors(tmp_ + "/" + file, t, metadata);
  add_checksum(file);
}

void CheckpointWriter::json(const std::string& file, const nlohmann::json& j) {
  {
    std::ofstream f(tmp_ + "/" + file, std::ios::trunc);
    LLAMA3_CHECK(f, "cannot write {}/{}", tmp_, file);
    f << j.dump(2) << "\n";
    LLAMA3_CHECK(f, "write to {}/{} failed", tmp_, file);
  }
  add_checksum(file);
}

void CheckpointWriter::add_checksum(const std::string& file) {
  sums_[file] = file_crc32(tmp_ + "/" + file);
  fsync_path(tmp_ + "/" + file);
}

void CheckpointWriter::commit() {
  {
    std::ofstream f(tmp_ + "/checksums.json", std::ios::trunc);
    f << sums_.dump(2) << "\n";
  }
  fsync_path(tmp_ + "/checksums.json");
  fsync_path(tmp_);
  // Replace: move the old directory aside first so a crash leaves one complete copy.
  std::string old = dir_ + ".old";
  fs::remove_all(old);
  if (fs::exists(dir_)) fs::rename(dir_, old);
  fs::rename(tmp_, dir_);
  fsync_path(fs::path(dir_).parent_path().string());
  fs::remove_all(old);
}

void verify_checkpoint(const std::string& dir) {
  LLAMA3_CHECK(fs::is_directory(dir), "checkpoint {} does not exist", dir);
  const std::string sums_path = dir + "/checksums.json";
  LLAMA3_CHECK(fs::exists(sums_path), "checkpoint {} has no checksums.json (incomplete write?)", dir);
  nlohmann::json sums = read_json(sums_path);
  for (auto& [file, crc] : sums.items()) {
    const std::string p = dir + "/" + file;
    LLAMA3_CHECK(fs::exists(p), "checkpoint {}: file {} is missing", dir, file);
    uint32_t got = file_crc32(p);
    LLAMA3_CHECK(got == crc.get<uint32_t>(),
                 "checkpoint {}: {} is damaged (crc32 {:08x}, expected {:08x})", dir, file, got,
                 crc.get<uint32_t>());
  }
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  LLAMA3_CHECK(f, "cannot open {}", path);
  try {
    return nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    fail("{}: malformed JSON: {}", path, e.what());
  }
}

}  // namespace llama3::io
