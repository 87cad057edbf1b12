#include "runtime/nn/registry.h"

#include "runtime/core/error.h"

namespace llama3::nn {

void Registry::add(const std::string& name, Builder b) {
  LLAMA3_CHECK(!builders_.count(name), "module '{}' registered twice (registered: {})", name,
               names());
  builders_.emplace(name, std::move(b));
}

std::unique_ptr<Module> Registry::build(const std::string& name, const nlohmann::json& config) const {
  auto it = builders_.find(name);
  LLAMA3_CHECK(it != builders_.end(), "unknown module '{}' (registered: {})", name, names());
  return it->second(config);
}

std::string Registry::names() const {
  std::string s;
  for (auto& [n, b] : builders_) s += (s.empty() ? "" : ", ") + n;
  return s.empty() ? "none" : s;
}

}  // namespace llama3::nn
