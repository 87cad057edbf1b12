// `llama3 train`: pre-training of a Llama 3 flavour on token shards built by
// `llama3 data demo|tokenize` (a manifest.json), with a progress line (step, loss, tokens/s,
// % of this machine's GEMM peak, ETA), periodic eval loss and resumable checkpoints. OUT is a
// stage directory of the run-directory contract (docs/observability.md): metrics.jsonl,
// TensorBoard events in tb/, final.json and checkpoint/. Under `mpirun -np N` with
// --parallel LAYOUT the same trainer runs the 4D layout (docs/parallelism.md); rank 0 alone
// logs and writes metrics, checkpoints are distributed.
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "cli/flags.h"
#include "runtime/backend/backend.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/dist/communicator.h"
#include "runtime/io/checkpoint.h"
#include "runtime/log/metrics.h"
#include "runtime/log/progress.h"
#include "text/data/build.h"
#include "text/data/shard.h"
#include "text/train/loader_source.h"

namespace fs = std::filesystem;

namespace llama3::cli {

namespace {
constexpr const char* kUsage =
    "usage: llama3 train --data DIR [--flavour tiny] [--steps 200] [--batch 8] [--seq 256]\n"
    "                    [--accum 1] [--lr 3e-3] [--min-lr 3e-4] [--warmup 20] [--decay cosine]\n"
    "                    [--weight-decay 0.1] [--clip 1.0] [--precision f32|bf16]\n"
    "                    [--checkpointing] [--eval-every 50] [--eval-batches 4] [--ckpt-every 0]\n"
    "                    [--seed 0] [--out runs/train] [--stage train] [--resume]\n"
    "                    [--device cpu|cuda [--cuda-graph]]\n"
    "                    [--parallel tp=2,pp=2,... [--microbatches 1] [--virtual-stages 1] [--timeout 300]\n"
    "                     [--no-overlap]]\n"
    "  DIR holds manifest.json (from `llama3 data demo`); the model's vocab is the tokenizer's.\n"
    "  --batch is the global batch of one micro-batch; --accum micro-batches make a step.\n"
    "  --parallel (under mpirun -np N): degrees of dp_replicate, dp_shard, cp, tp, pp (product N);\n"
    "  --microbatches: pipeline micro-batches per micro-batch; --timeout: seconds a collective may\n"
    "  wait for a peer before the run fails; --no-overlap: blocking FSDP collectives (no overlap).\n"
    "  --device cuda: the model on this rank's GPU; a layout then communicates over NCCL.\n"
    "  --cuda-graph (one process on cuda): the step is captured as a CUDA graph on its second\n"
    "  step and replayed from then on (same results; see docs/cuda.md).";

// Entropy (nats/token) of the unigram distribution of the shards' tokens: the loss a model
// that ignores context entirely would reach on that text.
double unigram_entropy(const std::vector<std::string>& shards) {
  std::vector<double> counts;
  double n = 0;
  for (const auto& path : shards) {
    data::Shard s = data::Shard::load(path);
    if (counts.size() < s.vocab_size()) counts.resize(s.vocab_size(), 0.0);
    for (int64_t d = 0; d < s.n_docs(); ++d)
      for (int32_t t : s.doc(d)) counts[size_t(t)] += 1, n += 1;
  }
  double h = 0;
  for (double c : counts)
    if (c > 0) h -= c / n * std::log(c / n);
  return h;
}

}  // namespace

int cmd_train(const Args& args) {
  Flags f(args,
          {"--data", "--flavour", "--steps", "--batch", "--seq", "--accum", "--lr", "--min-lr", "--warmup",
           "--decay", "--weight-decay", "--clip", "--precision", "--eval-every", "--eval-batches",
           "--ckpt-every", "--seed", "--out", "--stage", "--parallel", "--microbatches", "--virtual-stages",
           "--timeout", "--device"},
          {"--checkpointing", "--resume", "--no-overlap", "--cuda-graph"}, kUsage);
  dist::CommOptions co;
  co.timeout_s = f.real("--timeout", 300.0);
  auto world = dist::world_communicator(co);
  LLAMA3_CHECK(world->size() == 1 || f.has("--parallel"),
               "launched with {} ranks: give --parallel with a layout of {} ranks (e.g. dp_shard={})", world->size(),
               world->size(), world->size());
  const bool rank0 = world->rank() == 0;
  if (!rank0) spdlog::set_level(spdlog::level::warn);
  const std::string data_dir = f.required("--data");
  const std::string out = f.str("--out", "runs/train");
  const std::string manifest_path = data_dir + "/manifest.json";
  const nlohmann::json manifest = io::read_json(manifest_path);

  text::LlamaConfig cfg = text::llama3_flavour(f.str("--flavour", "tiny"));
  LLAMA3_CHECK(manifest.contains("vocab_size"), "{}: missing field 'vocab_size'", manifest_path);
  cfg.vocab_size = manifest["vocab_size"].get<int64_t>();
  const int64_t seq = f.integer("--seq", 256);
  cfg.max_seq_len = std::max(cfg.max_seq_len, seq);
  const uint64_t seed = uint64_t(f.integer("--seed", 0));
  text::LlamaModel model(cfg, seed);
  const std::string precision = f.str("--precision", "f32");
  LLAMA3_CHECK(precision == "f32" || precision == "bf16", "--precision must be f32 or bf16, got '{}'", precision);
  model.options().precision = precision == "bf16" ? ops::Precision::bf16 : ops::Precision::f32;
  model.options().activation_checkpointing = f.has("--checkpointing");
  // The device of the model; under --parallel, CUDA tensors communicate over NCCL (its unique
  // id bootstrapped over the MPI world).
  const std::string device_name = f.str("--device", "cpu");
  LLAMA3_CHECK(device_name == "cpu" || device_name == "cuda", "--device must be cpu or cuda, got '{}'",
               device_name);
  Device device = Device::cpu();
  if (device_name == "cuda") {
    LLAMA3_CHECK(cuda_init(), "--device cuda: no CUDA device (or this build has no CUDA)");
    device = Device::cuda(dist::local_device_index(cuda_device_count()));
    model.to(device);
  }

  data::LoaderConfig lc;
  lc.sources = data::read_manifest_sources(manifest_path);
  lc.seq_len = seq;
  lc.batch_size = f.integer("--batch", 8);
  lc.seed = seed + 1;
  text::LoaderSource train(lc);
  std::unique_ptr<text::LoaderSource> eval;
  if (manifest.contains("eval")) {
    data::LoaderConfig ec = lc;
    ec.sources = {data::SourceSpec{"eval", manifest["eval"]["shards"].get<std::vector<std::string>>(), 1.0}};
    for (auto& s : ec.sources[0].shards)
      if (fs::path(s).is_relative() && !fs::exists(s)) s = (fs::path(data_dir) / s).string();
    ec.seed = 12345;
    eval = std::make_unique<text::LoaderSource>(ec);
  }

  text::TrainerConfig tc;
  tc.steps = f.integer("--steps", 200);
  tc.grad_accum = f.integer("--accum", 1);
  tc.adamw.lr = float(f.real("--lr", 3e-3));
  tc.adamw.weight_decay = float(f.real("--weight-decay", 0.1));
  tc.adamw.max_grad_norm = float(f.real("--clip", 1.0));
  tc.schedule.peak = tc.adamw.lr;
  tc.schedule.min_lr = float(f.real("--min-lr", tc.adamw.lr * 0.1));
  tc.schedule.warmup = f.integer("--warmup", std::min<int64_t>(20, tc.steps / 10));
  tc.schedule.total = tc.steps;
  tc.schedule.decay = optim::decay_from_name(f.str("--decay", "cosine"));
  tc.eval_every = eval ? f.integer("--eval-every", 50) : 0;
  tc.eval_batches = f.integer("--eval-batches", 4);
  tc.ckpt_every = f.integer("--ckpt-every", 0);
  tc.out_dir = out;
  tc.cuda_graph = f.has("--cuda-graph");
  LLAMA3_CHECK(!tc.cuda_graph || (device_name == "cuda" && !f.has("--parallel")),
               "--cuda-graph needs --device cuda in one process (no --parallel layout)");
  if (f.has("--parallel")) {
    tc.parallel.world = world;
    tc.parallel.dims = dist::ParallelDims::parse(f.str("--parallel"));
    tc.parallel.microbatches = f.integer("--microbatches", 1);
    tc.parallel.virtual_stages = int(f.integer("--virtual-stages", 1));
    tc.parallel.overlap = !f.has("--no-overlap");
    tc.parallel.dims.validate(world->size());
    dist::ModelShape ms;
    ms.n_heads = cfg.n_heads, ms.n_kv_heads = cfg.n_kv_heads, ms.n_layers = cfg.n_layers;
    ms.ffn_hidden = cfg.ffn_hidden(), ms.vocab = cfg.vocab_size, ms.seq_len = seq;
    ms.global_batch = lc.batch_size, ms.microbatches = tc.parallel.microbatches;
    ms.virtual_stages = tc.parallel.virtual_stages;
    // Bad layouts fail here, before any work, with the numbers in the message.
    dist::validate_for_model(tc.parallel.dims, ms);
    tc.parallel.world = dist::communicator_for_device(world, device);  // NCCL for CUDA tensors
    if (rank0) spdlog::info("layout {} on {} ranks", tc.parallel.dims.str(), world->size());
  }
  fs::create_directories(out);

  text::Trainer trainer(model, tc, train, eval.get());
  const std::string ckpt = out + "/checkpoint";
  if (f.has("--resume") && fs::exists(ckpt)) {
    trainer.load(ckpt);
    spdlog::info("resumed from {} at step {}", ckpt, trainer.steps_done());
  }
  // The progress line's percentage: on GPUs MFU, against the cards' datasheet peak, one card a
  // rank (the step's FLOP/s count the whole world's tokens; 0 for a card not in the table: no
  // percentage); on the CPU, of the GEMM peak measured here (a benchmark: rank 0 only).
  const bool bf16 = precision == "bf16";
  const double peak = device.is_cpu() ? (rank0 ? cpu_gemm_peak_flops(bf16, 2048) : 1.0)
                                      : cuda_peak_flops(device.index, bf16) * double(world->size());
  std::string peak_text = fmt::format("GEMM peak {:.0f} GFLOP/s", peak / 1e9);
  if (!device.is_cpu())
    peak_text = peak > 0
                    ? fmt::format("{}: MFU of {} x {:.1f} TFLOP/s", backend_for(device).name(),
                                  world->size(), peak / double(world->size()) / 1e12)
                    : fmt::format("{}: peak not known, no MFU shown", backend_for(device).name());
  spdlog::info("model {} ({:.1f}M params), {} steps of {} x {} x {} tokens, {}, {}",
               f.str("--flavour", "tiny"), double(cfg.num_params()) / 1e6, tc.steps, lc.batch_size,
               seq, tc.grad_accum, precision, peak_text);
  const std::string stage = f.str("--stage", "train");
  // Rank 0 alone writes metrics and draws the progress line.
  std::unique_ptr<log::MetricsWriter> metrics_w;
  std::unique_ptr<log::ProgressLine> progress_w;
  if (rank0) {
    metrics_w = std::make_unique<log::MetricsWriter>(out, stage);
    log::ProgressOptions po;
    po.stage = stage;
    po.total_steps = tc.steps;
    po.peak_flops = peak;
    if (!device.is_cpu()) po.peak_name = "MFU";
    progress_w = std::make_unique<log::ProgressLine>(po);
  }
  double elapsed = 0;  // training seconds so far, continued across resumes
  if (rank0 && trainer.steps_done() > 0 && fs::exists(metrics_w->jsonl_path())) {
    const auto logged = log::read_metrics_jsonl(metrics_w->jsonl_path());
    if (auto it = logged.find("time"); it != logged.end())
      for (const auto& [step, t] : it->second)
        if (step <= trainer.steps_done()) elapsed = t;
  }
  double last_loss = std::nan(""), last_eval = std::nan("");
  trainer.on_step = [&](const text::StepStats& s) {
    elapsed += s.seconds;
    last_loss = s.loss;
    if (!rank0) return;
    auto& metrics = *metrics_w;
    auto& progress = *progress_w;
    if (s.skipped) progress.message(fmt::format("step {}: update skipped (non-finite loss or gradient)", s.step));
    nlohmann::json m = {{"tokens", s.tokens},   {"time", elapsed},
                        {"loss", s.loss},       {"lr", s.lr},
                        {"grad_norm", s.grad_norm}, {"tokens_per_s", s.tokens_per_s}};
    // (On a GPU "mfu", in percent, when the card's peak is known; on the CPU the GEMM peak's.)
    if (peak > 0) m[device.is_cpu() ? "pct_gemm_peak" : "mfu"] = 100.0 * s.flops_per_s / peak;
    metrics.log(s.step, m);
    progress.update({.step = s.step, .loss = s.loss, .lr = s.lr, .tokens_per_s = s.tokens_per_s,
                     .flops_per_s = s.flops_per_s, .step_seconds = s.seconds});
  };
  trainer.on_eval = [&](int64_t step, double loss) {
    last_eval = loss;
    if (!rank0) return;
    auto& metrics = *metrics_w;
    auto& progress = *progress_w;
    metrics.log(step, {{"eval_loss", loss}, {"eval_ppl", std::exp(loss)}});
    progress.message(fmt::format("eval step {}: loss {:.4f} (ppl {:.1f})", step, loss, std::exp(loss)));
  };
  trainer.run();
  spdlog::info("saved {}; metrics in {}/metrics.jsonl, TensorBoard events in {}/tb", ckpt, out, out);
  nlohmann::json final_metrics = {{"steps", trainer.steps_done()}, {"tokens", trainer.tokens_seen()},
                                  {"time", elapsed}, {"skipped_steps", trainer.skipped_steps()}};
  if (!std::isnan(last_loss)) final_metrics["loss"] = last_loss;
  if (eval) {
    if (std::isnan(last_eval)) last_eval = trainer.evaluate();  // collective under a layout
    if (!rank0) return 0;
    const double h = unigram_entropy(eval->loader_config().sources[0].shards);
    final_metrics["eval_loss"] = last_eval;
    final_metrics["eval_unigram_entropy"] = h;
    spdlog::info("held-out loss {:.4f} nats/token vs unigram entropy {:.4f} of the same text", last_eval, h);
  }
  if (rank0) std::ofstream(out + "/final.json") << final_metrics.dump(2) << "\n";
  return 0;
}

}  // namespace llama3::cli
