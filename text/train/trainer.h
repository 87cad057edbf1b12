// The pre-training loop: micro-batches with gradient accumulation, AdamW with an LR
// schedule and clipping, periodic eval loss, atomic checkpoints (weights with HF names +
// config.json + optimizer + step/tokens/data position), exact resume, and NaN/inf
// detection that skips the update and reports it.
//
// With a parallel layout (TrainerConfig::parallel, every rank of the world constructing
// its Trainer alike) the same loop drives text::ParallelLlama: every rank reads the same
// global batches from its own copy of the source and keeps its data-parallel rows, the
// step is ParallelLlama::forward_backward, evaluation its forward_loss, checkpoints are
// distributed (one piece file per rank, docs/parallelism.md) and load under any layout.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/dist/parallel_dims.h"
#include "runtime/optim/adamw.h"
#include "runtime/optim/lr_schedule.h"
#include "text/data/loader.h"
#include "text/model/llama.h"

namespace llama3::text {
class ParallelLlama;
}

namespace llama3::text {

// Where batches come from. MixingLoader is one; tests use synthetic sources.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual data::Batch next() = 0;
  virtual nlohmann::json state() const = 0;
  virtual void restore(const nlohmann::json& state) = 0;
};

// The layout a Trainer trains under. No world, or a world of one rank: the plain
// single-process step (LlamaModel::loss + AdamW).
struct TrainerParallel {
  std::shared_ptr<dist::Communicator> world;
  dist::ParallelDims dims;      // must multiply to world->size()
  int64_t microbatches = 1;     // pipeline micro-batches per trainer micro-batch
  int virtual_stages = 1;       // 1: 1F1B, V > 1: interleaved 1F1B
  bool overlap = true;          // FSDP collectives overlap compute (ParallelizeOptions::overlap)
  bool enabled() const { return world && world->size() > 1; }
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
  TrainerParallel parallel;
  // bf16 mixed precision in one process: AdamW writes bf16 copies of the weight matrices
  // with each update and the step's GEMMs use them instead of casting every weight
  // (optim::AdamW::enable_bf16_copies; bit-identical results). false: cast each step.
  bool bf16_weight_copies = true;
  // CUDA graphs, in one process on a cuda device: the whole step (every micro-batch's forward
  // and backward, the gradient norm and clipping, the skip decision and AdamW) is captured
  // once and then replayed with one launch per step, only the batch and the learning rate
  // uploaded before and the losses and norm read after. A step layout (micro-batches, their
  // shape, document ids or not, bf16 copies written; not the number of targets >= 0, which
  // the captured loss counts on the device) first runs one eager step, the next step of that
  // layout is captured; a batch of another layout runs eagerly and the one after captures
  // again. Losses and weights equal the eager step's
  // (the norm is reported in f32). A step that cannot be captured (host code reading the
  // device, e.g. a gradient hook) is reported once and the run goes on eagerly. Ignored on
  // cpu and under a parallel layout.
  bool cuda_graph = false;
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
  bool graph = false;      // the step ran as a replay of the captured step (cuda_graph)
};

struct BatchTensors;

class Trainer {
 public:
  // Under a parallel layout this applies it to `model` (collective over the world): the
  // model keeps only this rank's slices afterwards; use full_model() for a whole copy.
  Trainer(LlamaModel& model, const TrainerConfig& cfg, BatchSource& train,
          BatchSource* eval = nullptr);
  ~Trainer();

  StepStats step();
  // Mean loss over cfg.eval_batches batches of the eval source, always the same batches.
  double evaluate();
  // Runs until cfg.steps, calling on_step / on_eval, checkpointing as configured.
  void run();

  // Collective under a layout: every rank writes its pieces (rank-NNNNN.safetensors),
  // rank 0 config.json, trainer_state.json and the checksums of all files.
  void save(const std::string& dir);
  // Restores weights, optimizer, step counters and the data position from a checkpoint,
  // single-process (model.safetensors) or distributed (rank-*.safetensors) - written under
  // any layout: the tensors are reassembled and resliced for this one.
  void load(const std::string& dir);

  // The whole model with the current weights: the model itself in a single process; under
  // a layout a copy gathered from every rank (collective: every rank must call it at the
  // same point; cached until the next step).
  LlamaModel& full_model();
  bool parallel() const { return par_ != nullptr; }
  // Rank in the world (0 in a single process): callers write files and logs on rank 0 only.
  int rank() const;

  int64_t steps_done() const { return step_; }
  int64_t tokens_seen() const { return tokens_; }
  int64_t skipped_steps() const { return skipped_; }
  optim::AdamW& optimizer() { return *opt_; }
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
  std::unique_ptr<ParallelLlama> par_;
  std::unique_ptr<optim::AdamW> opt_;
  std::unique_ptr<LlamaModel> full_;  // full_model() under a layout
  int64_t full_step_ = -1;
  int64_t step_ = 0, tokens_ = 0, skipped_ = 0;

  StepStats parallel_step(float lr);
  // Runs this step as a CUDA graph when cfg_.cuda_graph allows: fills st's loss, grad_norm,
  // skipped and returns true; false when the step must run eagerly (first of its layout).
  struct CapturedStep;
  std::unique_ptr<CapturedStep> graph_;
  std::string warm_key_;  // the layout of the last eager step a graph may follow
  bool graph_step(const std::vector<data::Batch>& batches, float lr, StepStats& st);
  // This rank's data-parallel rows of `batches` (each (B, T)), in micro-batch order.
  BatchTensors local_rows(const std::vector<data::Batch>& batches) const;
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
