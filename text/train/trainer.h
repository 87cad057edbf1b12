// The single-process pre-training loop: micro-batches with gradient accumulation, AdamW
// with an LR schedule and clipping, periodic eval loss, atomic checkpoints (weights with HF
// names + config.json + optimizer + step/tokens/data position), exact resume, and NaN/inf
// detection that skips the update and reports it.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/optim/adamw.h"
#include "runtime/optim/lr_schedule.h"
#include "text/data/loader.h"
#include "text/model/llama.h"

namespace llama3::text {

// Where batches come from. MixingLoader is one; tests use synthetic sources.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual data::Batch next() = 0;
  virtual nlohmann::json state() const = 0;
  virtual void restore(const nlohmann::json& state) = 0;
};

struct TrainerConfig {
  int64_t steps = 100;       // optimizer steps
  int64_t grad_accum = 1;    // micro-batches per step
  optim::AdamWConfig adamw;
  optim::LrSchedule schedule;  // in steps
  int64_t eval_every = 0;      // 0: never
  int64_t eval_batches = 4;
  int64_t ckpt_every = 0;      // 0: only at the end
  std::string out_dir;         // checkpoints go to out_dir/checkpoint
  int64_t log_every = 1;
  // When set, the LR of the next update (given steps and tokens done) instead of `schedule`:
  // the recipe runner schedules in tokens while the batch size ramps.
  std::function<float(int64_t steps_done, int64_t tokens_done)> lr_fn;
};

struct StepStats {
  int64_t step = 0;      // steps done after this one
  int64_t total = 0;
  double loss = 0;       // mean over the step's micro-batches
  double grad_norm = 0;
  float lr = 0;
  int64_t tokens = 0;    // tokens seen so far
  double seconds = 0;    // wall time of this step
  double tokens_per_s = 0;
  double flops_per_s = 0;  // useful model FLOP/s of this step
  bool skipped = false;    // update skipped: non-finite loss or gradient
};

class Trainer {
 public:
  Trainer(LlamaModel& model, const TrainerConfig& cfg, BatchSource& train,
          BatchSource* eval = nullptr);

  StepStats step();
  // Mean loss over cfg.eval_batches batches of the eval source, always the same batches.
  double evaluate();
  // Runs until cfg.steps, calling on_step / on_eval, checkpointing as configured.
  void run();

  void save(const std::string& dir);
  // Restores weights, optimizer, step counters and the data position from a checkpoint.
  void load(const std::string& dir);

  int64_t steps_done() const { return step_; }
  int64_t tokens_seen() const { return tokens_; }
  int64_t skipped_steps() const { return skipped_; }
  optim::AdamW& optimizer() { return opt_; }
  // Micro-batches per step from the next step on (a batch-size ramp).
  void set_grad_accum(int64_t n);
  // Caller state saved in and restored from trainer_state.json ("extra"), so a caller's
  // position (e.g. the recipe runner's increment) is as atomic as the checkpoint.
  nlohmann::json extra_state = nlohmann::json::object();

  std::function<void(const StepStats&)> on_step;
  std::function<void(int64_t step, double eval_loss)> on_eval;

 private:
  LlamaModel& model_;
  TrainerConfig cfg_;
  BatchSource& train_;
  BatchSource* eval_;
  nlohmann::json eval_start_;
  optim::AdamW opt_;
  int64_t step_ = 0, tokens_ = 0, skipped_ = 0;
};

// Writes weights (HF names) + config.json of a model into an existing checkpoint writer
// directory layout; used by the trainer and by averaging/export.
void save_model(const LlamaModel& model, const std::string& dir);
// Loads a model saved by save_model/Trainer::save: verifies checksums, config and every
// tensor's name and shape, naming the file and tensor at fault.
std::unique_ptr<LlamaModel> load_model(const std::string& dir);

// Batch tensors for the model: tokens/targets/doc_ids as (B, T) int32.
struct BatchTensors {
  Tensor tokens, targets, doc_ids;
};
BatchTensors to_tensors(const data::Batch& b);

}  // namespace llama3::text
