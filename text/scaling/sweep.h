// IsoFLOPs sweeps (Llama 3 paper, 3.2.1): for each compute budget C and each model shape
// of a grid, train for D = C / flops_per_token tokens (6N + attention accounting of
// LlamaConfig::flops_per_token; C / 6N when attention is negligible) with the Trainer and
// record the held-out eval loss, plus the loss on held-out math problems as a downstream
// NLL proxy. The results feed fit_scaling (fit.h).
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "text/scaling/fit.h"

namespace llama3::scaling {

struct ModelShape {
  int64_t dim = 64, n_layers = 1, n_heads = 4, n_kv_heads = 2;
  // The budgets this shape runs at; empty: all. Lets a grid shift with the budget, as the
  // paper's does, instead of spending time on shapes far from every optimum.
  std::vector<double> budgets;
  bool runs_at(double budget) const;
};

struct SweepConfig {
  std::string data_dir;            // holds manifest.json (from `llama3 data demo`)
  std::vector<double> budgets;     // FLOPs
  std::vector<ModelShape> models;  // the same grid at every budget
  int64_t seq_len = 64, batch = 8;
  double lr = 3e-3, min_lr_ratio = 0.1, warmup_frac = 0.05, weight_decay = 0.1;
  int64_t eval_batches = 16;
  int64_t min_steps = 5;  // shapes whose budget gives fewer steps are skipped
  uint64_t seed = 0;
  double target_budget = 0;  // budget to extrapolate to in `scaling fit`

  // Errors name the file and field.
  static SweepConfig from_json(const nlohmann::json& j, const std::string& where);
  nlohmann::json to_json() const;
};

struct SweepOptions {
  std::string out_dir;  // sweep.json (rewritten after every run) and math_eval.shard go here
  std::function<void(const std::string&)> log;  // progress messages; may be empty
};

// Runs every (budget, shape) pair not already in out_dir/sweep.json for the same config,
// so an interrupted sweep resumes. Returns all runs.
std::vector<SweepRun> run_sweep(const SweepConfig& cfg, const SweepOptions& opts);

// Reads the runs (and the config, if present) of a sweep.json.
std::vector<SweepRun> read_sweep(const std::string& path, SweepConfig* cfg = nullptr);

}  // namespace llama3::scaling
