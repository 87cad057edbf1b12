#include "recipes/stage_comm.h"

namespace llama3::recipes {

StageComm::StageComm(std::shared_ptr<dist::Communicator> world, bool all_ranks) {
  if (all_ranks && world && world->size() > 1) group_ = std::move(world);
}

void StageComm::sync() const {
  if (group_) group_->barrier();
}

double StageComm::shared(const std::function<double()>& f) const {
  if (!group_) return f();
  Tensor t = Tensor::from_vector(std::vector<double>{group_->rank() == 0 ? f() : 0.0}, {1});
  group_->broadcast(t, 0);
  return t.item();
}

text::TrainerParallel trainer_parallel(const Stage& s, const text::LlamaConfig& c, int64_t seq_len,
                                       int64_t micro_batch_rows, std::shared_ptr<dist::Communicator> world) {
  text::TrainerParallel tp;
  const Layout L = layout_of(s);
  if (L.world() == 1) return tp;
  LLAMA3_CHECK(world && world->size() == L.world(),
               "stage '{}': layout needs {} ranks, this run has {} (launch with mpirun -np {})", s.name(), L.world(),
               world ? world->size() : 1, L.world());
  tp.world = std::move(world);
  tp.dims.dp_shard = int(L.dp_shard), tp.dims.tp = int(L.tp), tp.dims.pp = int(L.pp), tp.dims.cp = int(L.cp);
  tp.dims.dp_replicate = int(L.dp_replicate);
  tp.microbatches = s.parallel().microbatches() > 0 ? s.parallel().microbatches() : 1;
  tp.virtual_stages = s.parallel().virtual_stages() > 0 ? s.parallel().virtual_stages() : 1;
  tp.overlap = !s.parallel().no_overlap();
  dist::ModelShape ms;
  ms.n_heads = c.n_heads, ms.n_kv_heads = c.n_kv_heads, ms.n_layers = c.n_layers, ms.ffn_hidden = c.ffn_hidden();
  ms.vocab = c.vocab_size, ms.seq_len = seq_len, ms.global_batch = micro_batch_rows;
  ms.microbatches = tp.microbatches, ms.virtual_stages = tp.virtual_stages;
  try {
    dist::validate_for_model(tp.dims, ms);
  } catch (const Error& e) {
    fail("stage '{}' (micro-batch of {} rows x seq {}): {}", s.name(), micro_batch_rows, seq_len, e.what());
  }
  return tp;
}

}  // namespace llama3::recipes
