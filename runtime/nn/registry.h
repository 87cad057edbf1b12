// The module registry: maps names (`text.llama3`, `vision.vit`, ...) to builders taking a
// JSON config. Each library exposes an explicit register_*(Registry&) - no static
// initialisation - and duplicate or unknown names are errors listing what is registered.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/nn/module.h"

namespace llama3::nn {

class Registry {
 public:
  using Builder = std::function<std::unique_ptr<Module>(const nlohmann::json& config)>;
  void add(const std::string& name, Builder b);
  std::unique_ptr<Module> build(const std::string& name, const nlohmann::json& config) const;
  bool contains(const std::string& name) const { return builders_.count(name) != 0; }
  std::string names() const;  // "a, b, c"

 private:
  std::map<std::string, Builder> builders_;
};

}  // namespace llama3::nn
