// How the stages of a recipe share the ranks of `mpirun -np N llama3 run`. Every rank runs
// the runner. A training stage whose `parallel` layout uses N ranks runs on all of them:
// the Trainer drives text::ParallelLlama, checkpoints are distributed, and every eval is
// computed on rank 0 from the gathered model and broadcast, so all ranks take the same
// branches (long-context increments depend on eval results). Every other stage (data,
// averaging, evals, single-rank training) runs on rank 0 while the others wait. Only rank 0
// writes files, apart from the checkpoint pieces each rank contributes.
#pragma once

#include <functional>
#include <memory>

#include "recipes/recipe.h"
#include "runtime/dist/communicator.h"
#include "text/train/trainer.h"

namespace llama3::recipes {

class StageComm {
 public:
  // world: the run's ranks (null or one rank: a single process); all_ranks: this stage runs
  // on every rank of it.
  StageComm(std::shared_ptr<dist::Communicator> world, bool all_ranks);

  bool lead() const { return !group_ || group_->rank() == 0; }  // writes files and metrics
  void sync() const;                                           // barrier over the stage's ranks
  // f() on rank 0, its value broadcast to the stage's ranks (f() itself when single).
  double shared(const std::function<double()>& f) const;
  // The stage's ranks (null when it runs in this process alone).
  const std::shared_ptr<dist::Communicator>& group() const { return group_; }

 private:
  std::shared_ptr<dist::Communicator> group_;
};

// The Trainer layout of training stage `s` on the ranks of `world` (disabled when the
// stage's layout has one rank). Validates the layout against the model and the batch
// (rows of one micro-batch over dp x pipeline micro-batches, sequence over 2 x cp).
text::TrainerParallel trainer_parallel(const Stage& s, const text::LlamaConfig& model, int64_t seq_len,
                                       int64_t micro_batch_rows, std::shared_ptr<dist::Communicator> world);

}  // namespace llama3::recipes
