// The staged recipe runner behind `llama3 run`: executes a validated recipe's stages in
// order into a run directory, records finished stages in state.json, skips them on rerun,
// and resumes an interrupted stage from its latest checkpoint. Layout (docs/recipes.md):
//   RUN/recipe.textproto          the resolved recipe (overrides applied)
//   RUN/state.json                {"finished": [stage, ...], "seconds": {stage: s}}
//   RUN/<stage>/metrics.jsonl     one JSON object per step / eval
//   RUN/<stage>/checkpoint/       resumable trainer state (weights, optimizer, data position)
//   RUN/<stage>/model/            the stage's output model (what init_from reads)
//   RUN/<stage>/final.json        the stage's final metrics {name: number}
#pragma once

#include <iosfwd>
#include <memory>
#include <string>

#include "recipes/recipe.h"
#include "runtime/core/tensor.h"

namespace llama3::dist {
class Communicator;
}

namespace llama3::recipes {

struct RunOptions {
  std::string run_dir;
  std::string only;  // run just this stage (its inputs must be finished)
  std::string from;  // rerun this stage and every later one from scratch
  bool quiet = false;
  // The ranks of `mpirun -np N llama3 run` (null: one process); recipes/stage_comm.h says
  // which stages run on which ranks.
  std::shared_ptr<dist::Communicator> world;
  // Where the text training stages (pretrain, long context, annealing) run, in one process:
  // their model, trainer and evaluations (`llama3 run --device cuda`; the backend must be
  // registered, cuda_init). Every other stage runs on the CPU, and checkpoints are the same
  // files either way.
  Device device = Device::cpu();
  bool cuda_graph = false;  // on a GPU: TrainerConfig::cuda_graph for those stages
};

// The --dry-run plan: per stage kind, parameters, tokens, FLOPs and estimated time on this
// machine (FLOPs / (measured GEMM peak x kEfficiency)).
inline constexpr double kEfficiency = 0.25;
void print_plan(const LoadedRecipe& recipe, std::ostream& out);

void run_recipe(const LoadedRecipe& recipe, const RunOptions& opts);

// The table of every finished stage's final.json, as printed at the end of a run.
std::string final_table(const LoadedRecipe& recipe, const std::string& run_dir);

// LR of the update that ends at `tokens_after` stage tokens: linear warm-up to peak over
// warmup_tokens, then cosine/linear/constant to min_lr at decay_tokens (0: total_tokens).
// Annealing stages (linear, min 0) thus give the last update an LR of exactly 0.
float token_lr(const Stage& s, int64_t tokens_after);

// Global batch (tokens) and sequence length in force at `tokens` stage tokens.
struct BatchAt {
  int64_t batch_tokens, seq_len, micro_batch_tokens;
  int64_t grad_accum() const { return batch_tokens / micro_batch_tokens; }
  int64_t micro_batch_size() const { return micro_batch_tokens / seq_len; }
};
BatchAt batch_at(const Stage& s, int64_t tokens);

}  // namespace llama3::recipes
