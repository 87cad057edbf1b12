// Scratch directories for the data tests: one per (test file tag, process), removed when the
// test binary exits, and a helper to write a file into one.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>

namespace llama3::testing {

inline std::filesystem::path scratch_dir(const std::string& tag) {
  struct Dir {
    std::filesystem::path path;
    explicit Dir(std::filesystem::path p) : path(std::move(p)) { std::filesystem::create_directories(path); }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static std::map<std::string, std::unique_ptr<Dir>> dirs;
  auto& d = dirs[tag];
  if (!d)
    d = std::make_unique<Dir>(std::filesystem::temp_directory_path() /
                              ("llama3_unit_" + tag + "_" + std::to_string(::getpid())));
  return d->path;
}

inline std::string write_scratch_file(const std::string& tag, const std::string& name,
                                      const std::string& content) {
  std::string p = (scratch_dir(tag) / name).string();
  std::ofstream(p, std::ios::binary | std::ios::trunc) << content;
  return p;
}

}  // namespace llama3::testing
