#include "recipes/metrics_sink.h"

#include <chrono>
#include <map>
#include <memory>
#include <mutex>

#include "runtime/log/metrics.h"

namespace llama3::recipes {

// One MetricsWriter (metrics.jsonl + TensorBoard events) per stage directory for the
// process's lifetime, so a stage's events go to one event file per run attempt.
void write_metrics(const std::string& stage_dir, const std::string& stage, int64_t step,
                   const nlohmann::json& fields) {
  static std::mutex mu;
  static auto* writers = new std::map<std::string, std::unique_ptr<log::MetricsWriter>>();
  std::lock_guard<std::mutex> lock(mu);
  auto& w = (*writers)[stage_dir];
  if (!w) w = std::make_unique<log::MetricsWriter>(stage_dir, stage);
  nlohmann::json j = fields;
  if (!j.contains("time"))
    j["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  w->log(step, j);
}

}  // namespace llama3::recipes
