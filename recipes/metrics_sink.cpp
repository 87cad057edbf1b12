#include "recipes/metrics_sink.h"

#include <chrono>
#include <filesystem>
#include <fstream>

#include "runtime/core/error.h"

namespace llama3::recipes {

void write_metrics(const std::string& stage_dir, const std::string& stage, int64_t step,
                   const nlohmann::json& fields) {
  std::filesystem::create_directories(stage_dir);
  nlohmann::json j = {{"stage", stage}, {"step", step}};
  j["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  for (auto& [k, v] : fields.items()) j[k] = v;
  const std::string path = stage_dir + "/metrics.jsonl";
  std::ofstream f(path, std::ios::app);
  if (!f) fail("metrics: cannot open {}", path);
  f << j.dump() << '\n';
}

}  // namespace llama3::recipes
