// The runner's one way of writing metrics: a line of RUN/<stage>/metrics.jsonl per call
// ({"stage", "step", "time", ...fields}). Kept to this one function so switching to
// runtime/log's MetricsWriter (JSONL + TensorBoard) is a one-line change.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace llama3::recipes {

void write_metrics(const std::string& stage_dir, const std::string& stage, int64_t step,
                   const nlohmann::json& fields);

}  // namespace llama3::recipes
