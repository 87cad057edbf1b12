// `llama3 parallel`: trains a Llama 3 flavour on synthetic tokens under a 4D layout
// (launched by `mpirun -np N`), printing each step's global loss. With --dump it writes the
// updated full weights and losses (rank 0); with --reference it compares them with a dump
// of the single-process run (`--plain`: LlamaModel::loss + AdamW, no parallel code) and
// fails beyond --tol relative error. This is what tests/integration/test_parallel_*.sh run.
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "cli/flags.h"
#include "runtime/autograd/autograd.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/io/safetensors.h"
#include "runtime/optim/adamw.h"
#include "text/model/parallelize.h"

namespace llama3::cli {

namespace {
constexpr const char* kUsage =
    "usage: mpirun -np N llama3 parallel [--dp-replicate 1] [--dp-shard 1] [--cp 1] [--tp 1] [--pp 1]\n"
    "          [--microbatches 1] [--virtual-stages 1] [--checkpointing] [--no-overlap] [--flavour debug]\n"
    "          [--device cpu|cuda]\n"
    "          [--layers L] [--ce-chunk ROWS] [--precision f32|bf16]\n"
    "          [--batch 8] [--seq 32] [--steps 5] [--lr 1e-2] [--clip 1.0] [--eps 1e-8] [--docs] [--seed 0]\n"
    "          [--plain] [--dump FILE] [--reference FILE] [--tol 1e-5] [--loss-tol TOL] [--timeout 60]\n"
    "          [--save DIR] [--load DIR]\n"
    "          [--inject-hang RANK] [--inject-abort RANK]\n"
    "  --batch is the global batch; every data-parallel rank takes batch / dp rows. --steps is the\n"
    "  last step: a run that --load's a checkpoint of step k continues with step k + 1. --save\n"
    "  writes a distributed checkpoint (one file per rank with slice metadata) after the last step.\n"
    "  --tol bounds the weights' relative error against --reference, and the losses' unless\n"
    "  --loss-tol is given. --device cuda puts the model on this rank's GPU (node-local rank\n"
    "  modulo the visible GPUs) and runs the layout over NCCL (unique id bootstrapped over MPI).";

struct Batch {
  Tensor tokens, targets, docs;  // (B, T) int32
};

// Deterministic synthetic global batch of step `step`: random tokens, next-token targets
// (the last position of every row is ignored, -1), optional random document boundaries.
Batch synthetic_batch(int64_t B, int64_t T, int64_t vocab, uint64_t seed, int64_t step, bool docs) {
  Rng rng(seed * 1000003 + 17, uint64_t(step) * 1000000);
  std::vector<int32_t> seq(size_t(B * (T + 1))), tok(size_t(B * T)), tgt(size_t(B * T)), doc(size_t(B * T));
  for (auto& x : seq) x = int32_t(rng.below(uint64_t(vocab)));
  for (int64_t b = 0; b < B; ++b) {
    int32_t d = 0;
    for (int64_t t = 0; t < T; ++t) {
      tok[size_t(b * T + t)] = seq[size_t(b * (T + 1) + t)];
      tgt[size_t(b * T + t)] = t + 1 < T ? seq[size_t(b * (T + 1) + t + 1)] : -1;
      if (docs && t > 0 && rng.below(8) == 0) ++d;
      doc[size_t(b * T + t)] = d;
    }
  }
  Batch out;
  out.tokens = Tensor::from_vector(tok, {B, T});
  out.targets = Tensor::from_vector(tgt, {B, T});
  if (docs) out.docs = Tensor::from_vector(doc, {B, T});
  return out;
}

double max_rel_diff(const Tensor& a, const Tensor& b) {
  auto x = a.to_vector<float>(), y = b.to_vector<float>();
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num = std::max(num, double(std::fabs(x[i] - y[i])));
    den = std::max(den, double(std::fabs(y[i])));
  }
  return num / std::max(den, 1e-30);
}
}  // namespace

int cmd_parallel(const Args& args) {
  Flags f(args,
          {"--dp-replicate", "--dp-shard", "--cp", "--tp", "--pp", "--microbatches", "--virtual-stages",
           "--flavour", "--layers", "--batch", "--seq", "--steps", "--lr", "--clip", "--eps", "--seed", "--dump",
           "--reference", "--tol", "--loss-tol", "--timeout", "--save", "--load", "--inject-hang",
           "--inject-abort", "--ce-chunk", "--precision", "--device"},
          {"--checkpointing", "--docs", "--plain", "--no-overlap"}, kUsage);
  dist::ParallelDims dims;
  dims.dp_replicate = int(f.integer("--dp-replicate", 1));
  dims.dp_shard = int(f.integer("--dp-shard", 1));
  dims.cp = int(f.integer("--cp", 1));
  dims.tp = int(f.integer("--tp", 1));
  dims.pp = int(f.integer("--pp", 1));
  text::LlamaConfig cfg = text::llama3_flavour(f.str("--flavour", "debug"));
  cfg.n_layers = f.integer("--layers", cfg.n_layers);
  const int64_t B = f.integer("--batch", 8), T = f.integer("--seq", 32), steps = f.integer("--steps", 5);
  const uint64_t seed = uint64_t(f.integer("--seed", 0));
  const bool docs = f.has("--docs"), plain = f.has("--plain");
  text::ParallelizeOptions popt;
  popt.microbatches = f.integer("--microbatches", 1);
  popt.virtual_stages = int(f.integer("--virtual-stages", 1));
  popt.activation_checkpointing = f.has("--checkpointing");
  popt.overlap = !f.has("--no-overlap");  // FSDP collectives blocking instead of overlapped

  dist::CommOptions co;
  co.timeout_s = f.real("--timeout", 60.0);
  auto world = dist::world_communicator(co);
  // Bad layouts fail here, before any model is built, with the numbers in the message.
  dims.validate(world->size());
  dist::ModelShape ms;
  ms.n_heads = cfg.n_heads, ms.n_kv_heads = cfg.n_kv_heads, ms.n_layers = cfg.n_layers;
  ms.ffn_hidden = cfg.ffn_hidden(), ms.vocab = cfg.vocab_size, ms.seq_len = T, ms.global_batch = B;
  ms.microbatches = popt.microbatches, ms.virtual_stages = popt.virtual_stages;
  dist::validate_for_model(dims, ms);
  LLAMA3_CHECK(!plain || world->size() == 1, "--plain is the single-process reference; world size is {}",
               world->size());

  cfg.max_seq_len = std::max(cfg.max_seq_len, T);
  text::LlamaModel model(cfg, seed);
  // The device: every tensor of the step lives there; CUDA tensors take the NCCL communicator.
  const std::string device_name = f.str("--device", "cpu");
  LLAMA3_CHECK(device_name == "cpu" || device_name == "cuda",
               "--device must be cpu or cuda, got '{}'", device_name);
  Device device = Device::cpu();
  if (device_name == "cuda") {
    LLAMA3_CHECK(cuda_init(), "--device cuda: no CUDA device (or this build has no CUDA)");
    device = Device::cuda(dist::local_device_index(cuda_device_count()));
    model.to(device);
  }
  // Rows per cross-entropy chunk (also the vocabulary-parallel one's under tp).
  model.options().ce_chunk = f.integer("--ce-chunk", model.options().ce_chunk);
  // Mixed precision (bf16 GEMM inputs, f32 accumulation and master weights), in the plain
  // run and under the layout alike (the vocabulary-parallel loss included).
  const std::string precision = f.str("--precision", "f32");
  LLAMA3_CHECK(precision == "f32" || precision == "bf16",
               "--precision must be f32 or bf16, got '{}'", precision);
  model.options().precision = precision == "bf16" ? ops::Precision::bf16 : ops::Precision::f32;
  optim::AdamWConfig oc;
  oc.lr = float(f.real("--lr", 1e-2));
  oc.max_grad_norm = float(f.real("--clip", 1.0));
  oc.eps = float(f.real("--eps", 1e-8));
  const int rank = world->rank();

  std::unique_ptr<text::ParallelLlama> par;
  std::unique_ptr<optim::AdamW> opt;
  dist::ProcessGroups groups;
  if (plain) {
    model.options().activation_checkpointing = popt.activation_checkpointing;
    opt = std::make_unique<optim::AdamW>(model.named_parameters(), oc);
  } else {
    groups = dist::make_process_groups(dims, dist::communicator_for_device(world, device));
    par = std::make_unique<text::ParallelLlama>(model, groups, popt);
    opt = std::make_unique<optim::AdamW>(par->optimizer_params(), oc);
    opt->set_norm_reduction(par->norm_reduction());
  }
  if (rank == 0)
    spdlog::info("layout {} on {} ranks ({}, {}), global batch {} x seq {}, {}",
                 plain ? "plain" : dims.str(), world->size(),
                 plain ? world->backend() : groups.world->backend(), device.str(), B, T, precision);

  int64_t first_step = 1;
  if (f.has("--load")) {
    std::map<std::string, std::string> info;
    std::map<std::string, Tensor> full = dist::load_full(f.str("--load"), &info);
    const int64_t step = std::stoll(info.at("step"));
    if (plain) {
      std::map<std::string, Tensor> moments;
      for (auto& np : model.named_parameters()) {
        LLAMA3_CHECK(full.count(np.name), "checkpoint has no '{}'", np.name);
        np.tensor->detach().copy_(full.at(np.name));
        for (const char* pre : {"exp_avg.", "exp_avg_sq."}) moments[pre + np.name] = full.at(pre + np.name);
      }
      opt->load_state(moments, step);
    } else {
      par->load_full(full, opt.get(), step);
    }
    first_step = step + 1;
    if (rank == 0) spdlog::info("loaded {} at step {} (written by {})", f.str("--load"), step, info["layout"]);
  }
  const int hang_rank = int(f.integer("--inject-hang", -1)), abort_rank = int(f.integer("--inject-abort", -1));
  std::vector<double> losses;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t step = first_step; step <= steps; ++step) {
    if (step == 2 && rank == hang_rank) {
      std::fprintf(stderr, "rank %d: injected hang\n", rank);
      std::this_thread::sleep_for(std::chrono::hours(1));
    }
    if (step == 2 && rank == abort_rank) {
      std::fprintf(stderr, "rank %d: injected abort\n", rank);
      std::abort();
    }
    Batch gb = synthetic_batch(B, T, cfg.vocab_size, seed, step, docs);
    double loss;
    if (plain) {
      Tensor l = model.loss(gb.tokens, gb.targets, gb.docs);
      loss = l.item();
      l.backward();
    } else {
      const int dp_r = groups.dp->rank(), dp = groups.dp->size();
      const int64_t bl = B / dp;
      Tensor docs_l = docs ? gb.docs.narrow(0, dp_r * bl, bl).contiguous() : Tensor();
      loss = par->forward_backward(gb.tokens.narrow(0, dp_r * bl, bl).contiguous(),
                                   gb.targets.narrow(0, dp_r * bl, bl).contiguous(), docs_l);
    }
    const double norm = opt->step(oc.lr);
    opt->zero_grad();
    losses.push_back(loss);
    if (rank == 0) std::printf("step %lld loss %.8f grad_norm %.6f\n", (long long)step, loss, norm);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (rank == 0) std::printf("tokens/s %.1f\n", double(B * T * (steps - first_step + 1)) / secs);
  if (f.has("--save")) {
    std::vector<dist::Piece> pieces;
    if (plain) {
      auto st = opt->state_tensors();
      for (auto& np : model.named_parameters())
        for (const std::string& n : {np.name, "exp_avg." + np.name, "exp_avg_sq." + np.name}) {
          dist::Piece pc;
          pc.name = n;
          pc.full_shape = np.tensor->shape();
          pc.data = (n == np.name ? np.tensor->detach() : st.at(n))
                        .contiguous()
                        .view({-1})
                        .to(Device::cpu());
          pieces.push_back(pc);
        }
    } else {
      pieces = par->checkpoint_pieces(opt.get());
    }
    dist::save_pieces(f.str("--save"), rank, pieces,
                      {{"step", std::to_string(steps)}, {"layout", plain ? "plain" : dims.str()}});
    if (!plain) groups.world->barrier();
    if (rank == 0) spdlog::info("saved {} pieces of rank 0 to {}", pieces.size(), f.str("--save"));
  }
  std::fflush(stdout);

  std::map<std::string, Tensor> weights;
  if (plain) {
    for (auto& np : model.named_parameters())
      weights[np.name] = np.tensor->detach().to(Device::cpu());
  } else {
    weights = par->full_state_dict();
  }
  if (rank != 0) return 0;
  std::vector<float> lv(losses.begin(), losses.end());
  if (f.has("--dump")) {
    io::TensorMap m(weights.begin(), weights.end());
    m["__losses__"] = Tensor::from_vector(lv, {int64_t(lv.size())});
    io::save_safetensors(f.str("--dump"), m);
  }
  if (f.has("--reference")) {
    // --tol bounds the weights (and the losses unless --loss-tol gives their own bound).
    const double tol = f.real("--tol", 1e-5), loss_tol = f.real("--loss-tol", tol);
    io::TensorMap ref = io::load_safetensors(f.str("--reference"));
    double worst = 0, loss_err = 0;
    std::string worst_name;
    for (auto& [name, t] : ref) {
      Tensor mine = name == "__losses__" ? Tensor::from_vector(lv, {int64_t(lv.size())}) : weights.at(name);
      // A resumed run compares the losses of the steps it ran.
      if (name == "__losses__") t = t.narrow(0, first_step - 1, int64_t(lv.size())).contiguous();
      LLAMA3_CHECK(mine.shape() == t.shape(), "{}: shape {} vs reference {}", name, shape_str(mine.shape()),
                   shape_str(t.shape()));
      if (name == "__losses__") {
        loss_err = max_rel_diff(mine, t);  // max over steps |a - b| / max |b|
        continue;
      }
      const double r = max_rel_diff(mine, t);
      if (r > worst) worst = r, worst_name = name;
    }
    LLAMA3_CHECK(ref.size() == weights.size() + 1, "reference has {} tensors, this run {}", ref.size() - 1,
                 weights.size());
    if (!f.has("--loss-tol") && loss_err > worst) worst = loss_err, worst_name = "__losses__";
    std::printf(
        "max relative difference vs reference: %.3g (%s), tolerance %.1g; "
        "losses %.3g, tolerance %.1g\n",
        worst, worst_name.c_str(), tol, loss_err, loss_tol);
    LLAMA3_CHECK(worst <= tol, "layout {} differs from the reference: {} has relative error {:.3g} > {:.1g}",
                 dims.str(), worst_name, worst, tol);
    LLAMA3_CHECK(loss_err <= loss_tol,
                 "layout {} differs from the reference: losses have relative error {:.3g} > {:.1g}",
                 dims.str(), loss_err, loss_tol);
  }
  return 0;
}

}  // namespace llama3::cli
