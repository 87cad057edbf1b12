// Per-stage metrics of a run: MetricsWriter appends one JSON object per line to
// STAGE_DIR/metrics.jsonl and mirrors every numeric field as a TensorBoard scalar in
// STAGE_DIR/tb/. The readers (RunDir, `llama3 plot|report`) load them back.
//
// metrics.jsonl is append-only and flushed after each line, so a killed run keeps what it
// logged. A resumed stage appends again, so a step can appear twice (the steps between the
// last checkpoint and the kill are redone): readers take, per field, the LAST value logged
// for a step. A line cut short by a kill (the file's last line only) is ignored by readers
// and cut off by the next MetricsWriter before it appends.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace llama3::log {

class EventWriter;

struct MetricsOptions {
  bool tensorboard = true;  // also write STAGE_DIR/tb/events.out.tfevents.*
};

class MetricsWriter {
 public:
  // Creates stage_dir if needed and appends to its metrics.jsonl.
  MetricsWriter(const std::string& stage_dir, const std::string& stage_name,
                const MetricsOptions& opts = {});
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  // Writes {"stage": name, "step": step, ...fields} as one line; numeric fields (not
  // "stage"/"step") also go to TensorBoard, tagged with their key.
  void log(int64_t step, const nlohmann::json& fields);
  void flush();

  const std::string& jsonl_path() const { return path_; }
  std::string events_path() const;

 private:
  std::string stage_, path_;
  std::FILE* f_ = nullptr;
  std::unique_ptr<EventWriter> events_;
};

// One field's values by step, ascending, the last value logged for each step.
using Series = std::vector<std::pair<int64_t, double>>;

struct StageMetrics {
  std::string name;
  std::string dir;
  bool finished = false;                 // listed in state.json's "finished"
  std::map<std::string, Series> series;  // numeric fields of metrics.jsonl ("step" excluded)
  std::map<std::string, double> final;   // final.json, or the last value of each series
  bool final_from_json = false;          // whether `final` came from final.json
};

// Reads a metrics.jsonl (see the header comment for duplicate steps and a torn last line).
// Errors name the file and line.
std::map<std::string, Series> read_metrics_jsonl(const std::string& path);

// The stages of a run directory: those in state.json's "finished" list in order, then any
// other subdirectory with a metrics.jsonl (a stage in progress), by name.
std::vector<StageMetrics> read_run(const std::string& run_dir);

}  // namespace llama3::log
