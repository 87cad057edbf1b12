// bench_parallel: one training step of a Llama 3 flavour under a 4D layout (run it with
// `mpirun -np N`), reporting tokens/s and the bytes each rank sent per step - counted by the
// Communicators (ring-algorithm bytes, see runtime/dist/communicator.h) - against the
// analytic volume of that layout computed here from the shapes alone. bench/bench_parallel.sh
// runs the layouts and divides by the single-process tokens/s on the same cores.
//
// Exposed communication: the Communicators add the wall time each rank spends blocked in
// waits (CommStats::wait_s: every blocking collective, and Work::wait of the asynchronous
// ones). Reported per step and as a fraction of the step time, mean and max over ranks, and
// separately the part spent in the pipeline group's waits (pp_wait: receives of activations
// and gradients, sends completed at the end) and in the context-parallel group's (cp_wait:
// K/V gathers and their reduce-scatters, and the gradient all-reduce) and in the tp group's
// (tp_wait: the row-parallel forward all-reduces, the input-gradient all-reduces of the
// column-parallel layers, the vocabulary-parallel embedding and loss); --no-overlap makes
// FSDP's collectives and the K/V gathers blocking, posts each pipeline receive only where it
// is consumed, and all-reduces the column-parallel input gradients after their node instead
// of during the weight-gradient GEMM, and all-reduces the row-parallel outputs whole after
// their GEMM instead of slice by slice during it, for comparison; --no-tp-overlap turns off
// only the two tp parts, --no-tp-forward-overlap only the row-parallel one, and
// --no-cp-backward-overlap issues the dK/dV reduce-scatters in their own node (blocking)
// instead of as soon as the attention backward has produced them. On oversubscribed cores a wait
// also contains the time a peer rank spends computing (it is not scheduled), so the fraction is an
// upper bound on the communication the compute did not hide.
//
// Analytic bytes per rank and step (4-byte elements; ring factors a(n) = 2(n-1)/n for an
// all-reduce, g(n) = (n-1)/n for all-gather / reduce-scatter of the full size; M
// micro-batches; A = activation elements Bm * T_local * D; R = 2 when blocks are recomputed
// (FSDP or --checkpointing), else 1):
//   FSDP   per block and micro-batch: (R gathers + 1 reduce-scatter) x g(ds) x padded block
//          params; root (embedding / norm / head): 1 gather + 1 reduce-scatter per step
//   HSDP   a(dr) x this rank's shard params (gradient all-reduce)
//   TP     per block and micro-batch: 2R forward all-reduces + 5 backward all-reduces of A;
//          vocabulary parallel: embedding all-reduce of A (first stage), and in the loss the
//          row max (4 bytes/row), sum-exp and target logit (8 bytes/row: f32) and dh (A)
//          (last stage)
//   CP     per block and micro-batch: K and V gathers (R times) and their reduce-scatters,
//          each g(cp) x Bm x T x Hkv_local x Dh; plus a(cp) x shard params
//   PP     A per micro-batch and model chunk forward (not the last stage) and backward (not
//          the first)
//   scalars (token counts, loss, gradient norm) are left out: 8-byte all-reduces.
#include <chrono>
#include <cmath>
#include <cstdio>

#include "bench/args.h"
#include "runtime/dist/parallel_dims.h"
#include "runtime/optim/adamw.h"
#include "text/model/parallelize.h"

using namespace llama3;

namespace {
using bench::arg;
using bench::flag;
double g(int n) {
  return n <= 1 ? 0.0 : double(n - 1) / n;
}
double a(int n) {
  return 2 * g(n);
}
}  // namespace

int main(int argc, char** argv) try {
  dist::ParallelDims d;
  d.dp_replicate = int(arg(argc, argv, "--dp-replicate", 1));
  d.dp_shard = int(arg(argc, argv, "--dp-shard", 1));
  d.cp = int(arg(argc, argv, "--cp", 1));
  d.tp = int(arg(argc, argv, "--tp", 1));
  d.pp = int(arg(argc, argv, "--pp", 1));
  text::LlamaConfig cfg = text::llama3_flavour("debug");
  cfg.dim = arg(argc, argv, "--dim", 128);
  cfg.n_heads = arg(argc, argv, "--heads", 8);
  cfg.n_kv_heads = arg(argc, argv, "--kv-heads", 4);
  cfg.n_layers = arg(argc, argv, "--layers", 4);
  cfg.vocab_size = arg(argc, argv, "--vocab", 2048);
  const int64_t B = arg(argc, argv, "--batch", 8), T = arg(argc, argv, "--seq", 128);
  const int64_t steps = arg(argc, argv, "--steps", 3);
  cfg.max_seq_len = std::max(cfg.max_seq_len, T);
  text::ParallelizeOptions po;
  po.microbatches = arg(argc, argv, "--microbatches", 1);
  po.virtual_stages = int(arg(argc, argv, "--virtual-stages", 1));
  po.activation_checkpointing = flag(argc, argv, "--checkpointing");
  po.overlap = !flag(argc, argv, "--no-overlap");
  po.tp_overlap = !flag(argc, argv, "--no-tp-overlap");  // FSDP/PP/CP overlap without the TP part
  // Without the row-parallel forward part / with the dK/dV reduce-scatters in their node.
  po.tp_forward_overlap = !flag(argc, argv, "--no-tp-forward-overlap");
  po.cp_backward_overlap = !flag(argc, argv, "--no-cp-backward-overlap");
  po.verbose = false;

  auto world = dist::world_communicator();
  auto groups = dist::make_process_groups(d, world);
  text::LlamaModel model(cfg, 0);
  text::ParallelLlama par(model, groups, po);
  optim::AdamW opt(par.optimizer_params(), {});
  opt.set_norm_reduction(par.norm_reduction());

  std::vector<std::shared_ptr<dist::Communicator>> comms = {
      groups.world,        groups.tp, groups.cp, groups.dp_shard,
      groups.dp_replicate, groups.pp, groups.dp};
  const int dp_r = groups.dp->rank(), dp = groups.dp->size();
  const int64_t bl = B / dp;
  Rng rng(1);
  std::vector<int32_t> tok(size_t(B * T));
  for (auto& x : tok) x = int32_t(rng.below(uint64_t(cfg.vocab_size)));
  Tensor tokens = Tensor::from_vector(tok, {B, T}).narrow(0, dp_r * bl, bl).contiguous();
  auto step = [&] {
    par.forward_backward(tokens, tokens, Tensor());
    opt.step(1e-3f);
    opt.zero_grad();
  };
  step();  // warm-up
  for (auto& c : comms) c->reset_stats();
  world->barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < steps; ++s) step();
  double waited = 0;  // before the closing barrier, whose wait is only the slowest rank's lag
  for (auto& c : comms) waited += c->stats().wait_s;
  const double pp_waited = groups.pp->stats().wait_s, cp_waited = groups.cp->stats().wait_s;
  const double tp_waited = groups.tp->stats().wait_s;
  world->barrier();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int64_t measured = 0;
  for (auto& c : comms) measured += c->stats().bytes_sent;
  const double per_step = double(measured) / double(steps);

  // Analytic volume of this rank.
  const int64_t M = po.microbatches, Bm = bl / M, Tl = T / d.cp, D = cfg.dim, Dh = cfg.head_dim();
  const double A = double(Bm * Tl * D) * 4;
  const bool fsdp = d.dp_shard > 1;
  const double R = (fsdp || po.activation_checkpointing) ? 2 : 1;
  int64_t layers = 0;  // over this rank's model chunks (V of them when interleaved)
  for (auto [l0, l1] : par.chunks()) layers += l1 - l0;
  double shard_params = 0, block_padded = 0, root_padded = 0;
  for (auto& p : par.optimizer_params()) shard_params += double(p.tensor->numel());
  for (auto& p : par.optimizer_params()) {
    const double padded = double(p.tensor->numel()) * d.dp_shard;
    if (p.name.rfind("model.layers.", 0) == 0)
      block_padded += padded;
    else
      root_padded += padded;
  }
  double analytic = 0;
  if (fsdp)
    analytic += (M * (R + 1) * g(d.dp_shard) * block_padded + 2 * g(d.dp_shard) * root_padded) * 4;
  analytic += a(d.dp_replicate) * shard_params * 4;
  analytic += layers * M * (2 * R + 5) * a(d.tp) * A;
  const double kv = double(Bm * T * (cfg.n_kv_heads / d.tp) * Dh) * 4;
  analytic += layers * M * 2 * (R + 1) * g(d.cp) * kv + a(d.cp) * shard_params * 4;
  if (d.tp > 1) {
    const double rows = double(Bm * Tl);
    if (groups.coords.pp == 0) analytic += M * a(d.tp) * A;
    if (groups.coords.pp == d.pp - 1) analytic += M * a(d.tp) * (A + rows * 4 + rows * 8);
  }
  if (d.pp > 1) {
    const int64_t stages = int64_t(d.pp) * po.virtual_stages;
    for (int k = 0; k < po.virtual_stages; ++k) {
      const int64_t stage = int64_t(k) * d.pp + groups.coords.pp;
      if (stage != stages - 1) analytic += M * A;  // activation to the next stage
      if (stage != 0) analytic += M * A;           // gradient to the previous stage
    }
  }

  // Worst rank's deviation from its analytic volume.
  const double dev =
      analytic > 0 ? std::fabs(per_step - analytic) / analytic : (per_step > 0 ? 1.0 : 0.0);
  Tensor w = Tensor::from_vector(std::vector<double>{dev, per_step, analytic}, {3});
  Tensor worst = w.clone();
  world->all_reduce(worst, dist::ReduceOp::max);
  const double frac = waited / secs;
  const double n = double(steps);
  Tensor fmax = Tensor::from_vector(
      std::vector<double>{frac, waited / n, pp_waited / n, cp_waited / n, tp_waited / n}, {5});
  Tensor fsum = fmax.clone();
  world->all_reduce(fmax, dist::ReduceOp::max);
  world->all_reduce(fsum, dist::ReduceOp::sum);
  const auto wmax = fmax.to_vector<double>(), wsum = fsum.to_vector<double>();
  if (world->rank() == 0)
    std::printf(
        "RESULT layout=\"%s\" ranks=%d tokens_per_s=%.1f bytes_per_rank_step=%.0f analytic=%.0f "
        "max_rank_deviation=%.4f overlap=%d step_ms=%.1f wait_ms_per_step_mean=%.1f "
        "wait_frac_mean=%.3f "
        "wait_frac_max=%.3f pp_wait_ms_per_step_mean=%.1f pp_wait_ms_per_step_max=%.1f "
        "cp_wait_ms_per_step_mean=%.1f tp_wait_ms_per_step_mean=%.1f "
        "tp_wait_ms_per_step_max=%.1f\n",
        d.str().c_str(), world->size(), double(B * T * steps) / secs, per_step, analytic,
        worst.to_vector<double>()[0], int(po.overlap), 1e3 * secs / double(steps),
        1e3 * wsum[1] / world->size(), wsum[0] / world->size(), wmax[0],
        1e3 * wsum[2] / world->size(), 1e3 * wmax[2], 1e3 * wsum[3] / world->size(),
        1e3 * wsum[4] / world->size(), 1e3 * wmax[4]);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_parallel: error: %s\n", e.what());
  if (dist::mpi_active()) dist::abort_all(1);
  return 1;
}
