// `llama3 train`: single-process pre-training of a Llama 3 flavour on token shards built by
// `llama3 data demo|tokenize` (a manifest.json), with a progress line (step, loss, tokens/s,
// % of this machine's GEMM peak, ETA), periodic eval loss and resumable checkpoints.
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "cli/flags.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/io/checkpoint.h"
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
    "                    [--seed 0] [--out runs/train] [--resume]\n"
    "  DIR holds manifest.json (from `llama3 data demo`); the model's vocab is the tokenizer's.";

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

std::string eta(double s) {
  if (!(s >= 0) || s > 1e7) return "?";
  int64_t t = int64_t(s);
  return t >= 3600 ? fmt::format("{}h{:02}m", t / 3600, t % 3600 / 60) : fmt::format("{}m{:02}s", t / 60, t % 60);
}
}  // namespace

int cmd_train(const Args& args) {
  Flags f(args,
          {"--data", "--flavour", "--steps", "--batch", "--seq", "--accum", "--lr", "--min-lr", "--warmup",
           "--decay", "--weight-decay", "--clip", "--precision", "--eval-every", "--eval-batches",
           "--ckpt-every", "--seed", "--out"},
          {"--checkpointing", "--resume"}, kUsage);
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
  fs::create_directories(out);

  text::Trainer trainer(model, tc, train, eval.get());
  const std::string ckpt = out + "/checkpoint";
  if (f.has("--resume") && fs::exists(ckpt)) {
    trainer.load(ckpt);
    spdlog::info("resumed from {} at step {}", ckpt, trainer.steps_done());
  }
  const double peak = cpu_gemm_peak_flops(precision == "bf16", 2048);
  spdlog::info("model {} ({:.1f}M params), {} steps of {} x {} x {} tokens, {} , GEMM peak {:.0f} GFLOP/s",
               f.str("--flavour", "tiny"), double(cfg.num_params()) / 1e6, tc.steps, lc.batch_size, seq,
               tc.grad_accum, precision, peak / 1e9);
  double elapsed = 0;
  int64_t timed = 0;
  trainer.on_step = [&](const text::StepStats& s) {
    elapsed += s.seconds;
    ++timed;
    const double per = elapsed / double(timed);
    spdlog::info("step {}/{}  loss {:.4f}  lr {:.2e}  gnorm {:.3f}  {:.0f} tok/s  {:.0f}% of GEMM peak  ETA {}{}",
                 s.step, s.total, s.loss, s.lr, s.grad_norm, s.tokens_per_s, 100.0 * s.flops_per_s / peak,
                 eta(per * double(s.total - s.step)), s.skipped ? "  (update skipped: non-finite)" : "");
  };
  trainer.on_eval = [&](int64_t step, double loss) {
    spdlog::info("eval step {}: loss {:.4f} (ppl {:.1f})", step, loss, std::exp(loss));
  };
  double last_eval = std::nan("");
  auto log_eval = trainer.on_eval;
  trainer.on_eval = [&](int64_t step, double loss) {
    last_eval = loss;
    log_eval(step, loss);
  };
  trainer.run();
  spdlog::info("saved {}", ckpt);
  nlohmann::json final_metrics = {{"steps", trainer.steps_done()}, {"tokens", trainer.tokens_seen()},
                                  {"skipped_steps", trainer.skipped_steps()}};
  if (eval) {
    if (std::isnan(last_eval)) last_eval = trainer.evaluate();
    const double h = unigram_entropy(eval->loader_config().sources[0].shards);
    final_metrics["eval_loss"] = last_eval;
    final_metrics["eval_unigram_entropy"] = h;
    spdlog::info("held-out loss {:.4f} nats/token vs unigram entropy {:.4f} of the same text", last_eval, h);
  }
  std::ofstream(out + "/final.json") << final_metrics.dump(2) << "\n";
  return 0;
}

}  // namespace llama3::cli
