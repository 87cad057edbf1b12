// Checkpoint directories, written atomically: files go to `<dir>.tmp`, are fsynced, listed
// with their CRC32 in `checksums.json`, and the directory is renamed into place. Loading
// verifies every checksum, so a damaged checkpoint is reported, never silently loaded.
//
// Layout: model.safetensors (HF names) + config.json, optimizer.safetensors,
// trainer_state.json (step, tokens, RNG, data position, ...), checksums.json.
#pragma once

#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/io/safetensors.h"

namespace llama3::io {

class CheckpointWriter {
 public:
  explicit CheckpointWriter(std::string dir);  // creates <dir>.tmp (removing a stale one)
  void tensors(const std::string& file, const TensorMap& t,
               const std::map<std::string, std::string>& metadata = {});
  void json(const std::string& file, const nlohmann::json& j);
  // A file another writer (another rank of a distributed checkpoint) put into tmp_dir():
  // checksummed and fsynced like the others.
  void add_file(const std::string& file) { add_checksum(file); }
  const std::string& tmp_dir() const { return tmp_; }
  // Writes checksums.json, fsyncs, replaces <dir> atomically.
  void commit();

 private:
  std::string dir_, tmp_;
  nlohmann::json sums_ = nlohmann::json::object();
  void add_checksum(const std::string& file);
};

// Verifies checksums.json against the files; throws naming the first bad file.
void verify_checkpoint(const std::string& dir);
nlohmann::json read_json(const std::string& path);
uint32_t file_crc32(const std::string& path);

}  // namespace llama3::io
