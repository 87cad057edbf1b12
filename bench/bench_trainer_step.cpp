// The product's training step timed as a user runs it: text::Trainer driving text::LlamaModel
// (the recipe runner's single-process path), where bench_cuda_step times a step composed from
// runtime/ops to the model's pattern. Same 1B-class model by default (the "1B" flavour: dim
// 2048, 16 layers, 32 heads, 8 kv heads, FFN 8192, vocab 128256), bf16 mixed precision with
// AdamW's bf16 weight copies, gradient clipping at 1.0 (the paper's setting, which
// bench_cuda_step leaves out: one more pass over the gradients for their norm), the learning
// rate from the trainer's schedule, synthetic batches from the host (uploaded every step, as
// the loader's are), and the losses and gradient norm read back after every step. It prints
// the same figures as bench_cuda_step (tokens/s; MFU of record and PaLM's, against the same
// 989 TFLOP/s dense bf16 peak, with the same FLOP count) so that gpu-check.sh can put the
// two side by side.
//
//   bench_trainer_step [--flavour 1B] [--seq 4096] [--batch 1] [--accum 8] [--steps 2]
//                      [--warmup 2] [--graph] [--docs N] [--precision bf16|f32]
//                      [--device cuda|cpu] [--vocab V] [--layers L]
//
// --graph: TrainerConfig::cuda_graph (the first step of a layout runs eagerly, the next is
// captured, then replayed; on a GPU the warm-up goes on past --warmup until the capture, so
// the timed steps are replays). --docs N: N documents per
// row (document-masked attention, as pre-training packs them); default one per row, as
// bench_cuda_step. --device cpu with --flavour debug: the smoke test that keeps it building
// and running on CPU-only CI (tests/integration/test_bench_trainer_step_cpu.sh).
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include "runtime/backend/backend.h"
#include "runtime/core/allocator.h"
#include "runtime/core/error.h"
#include "runtime/core/rng.h"
#include "runtime/cuda/cuda_backend.h"
#include "text/train/trainer.h"

using namespace llama3;

namespace {

struct Config {
  std::string flavour = "1B";
  int64_t seq = 4096, batch = 1, accum = 8, steps = 2, warmup = 2, docs = 1, vocab = 0, layers = 0;
  bool graph = false;
  ops::Precision precision = ops::Precision::bf16;
  Device device = Device::cuda(0);
};

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      LLAMA3_CHECK(i + 1 < argc, "{} needs a value", a);
      return argv[++i];
    };
    auto count = [&](int64_t lo) {
      const std::string v = value();
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      LLAMA3_CHECK(end != v.c_str() && *end == '\0' && n >= lo, "{} {}: want an integer >= {}", a,
                   v, lo);
      return int64_t(n);
    };
    if (a == "--flavour")
      c.flavour = value();
    else if (a == "--seq")
      c.seq = count(1);
    else if (a == "--batch")
      c.batch = count(1);
    else if (a == "--accum")
      c.accum = count(1);
    else if (a == "--steps")
      c.steps = count(1);
    else if (a == "--warmup")
      c.warmup = count(0);
    else if (a == "--docs")
      c.docs = count(1);
    else if (a == "--vocab")
      c.vocab = count(2);
    else if (a == "--layers")
      c.layers = count(1);
    else if (a == "--graph")
      c.graph = true;
    else if (a == "--precision") {
      const std::string p = value();
      LLAMA3_CHECK(p == "bf16" || p == "f32", "--precision {}: want bf16 or f32", p);
      c.precision = p == "bf16" ? ops::Precision::bf16 : ops::Precision::f32;
    } else if (a == "--device") {
      const std::string d = value();
      LLAMA3_CHECK(d == "cuda" || d == "cpu", "--device {}: want cuda or cpu", d);
      c.device = d == "cpu" ? Device::cpu() : Device::cuda(0);
    } else {
      fail("unknown argument {} (see the header of bench/bench_trainer_step.cpp)", a);
    }
  }
  LLAMA3_CHECK(c.docs <= c.seq, "--docs {} exceeds --seq {}", c.docs, c.seq);
  return c;
}

// Random tokens (a function of the batch number only), targets the next token, and `docs`
// equal documents per row when docs > 1.
class SyntheticSource : public text::BatchSource {
 public:
  SyntheticSource(int64_t B, int64_t T, int64_t V, int64_t docs)
      : B_(B), T_(T), V_(V), docs_(docs) {}
  data::Batch next() override {
    Rng rng(17, uint64_t(pos_++));
    data::Batch b;
    b.batch_size = B_, b.seq_len = T_;
    b.tokens.resize(size_t(B_ * T_));
    for (auto& t : b.tokens) t = int32_t(rng.below(uint64_t(V_)));
    b.targets.resize(b.tokens.size());
    for (size_t i = 0; i < b.tokens.size(); ++i)
      b.targets[i] = (i + 1) % size_t(T_) == 0 ? int32_t(rng.below(uint64_t(V_))) : b.tokens[i + 1];
    if (docs_ > 1) {
      b.doc_ids.resize(b.tokens.size());
      for (size_t i = 0; i < b.doc_ids.size(); ++i)
        b.doc_ids[i] = int32_t(int64_t(i % size_t(T_)) * docs_ / T_);
    }
    return b;
  }
  nlohmann::json state() const override { return {{"pos", pos_}}; }
  void restore(const nlohmann::json& s) override { pos_ = s.at("pos").get<int64_t>(); }

 private:
  int64_t B_, T_, V_, docs_, pos_ = 0;
};

constexpr int64_t kMoreWarmup = 4;  // --graph: warm-up steps beyond --warmup, at most

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int run(const Config& c) {
  text::LlamaConfig mc = text::llama3_flavour(c.flavour);
  if (c.vocab > 0) mc.vocab_size = c.vocab;
  if (c.layers > 0) mc.n_layers = c.layers;
  mc.max_seq_len = std::max(mc.max_seq_len, c.seq);
  const double t0 = now();
  text::LlamaModel model(mc, 1);
  model.options().precision = c.precision;
  model.to(c.device);
  const int64_t n_params = mc.num_params(), n_embed = mc.vocab_size * mc.dim;
  fmt::print(
      "model: flavour {} ({} layers, dim {}, vocab {}), {:.1f} M parameters, on {}; init "
      "{:.1f} s\n",
      c.flavour, mc.n_layers, mc.dim, mc.vocab_size, double(n_params) / 1e6, c.device.str(),
      now() - t0);

  text::TrainerConfig tc;
  tc.steps = c.warmup + kMoreWarmup + c.steps;
  tc.grad_accum = c.accum;
  tc.adamw.lr = 3e-4f;  // max_grad_norm 1.0 and weight decay 0.1: the defaults (the paper's)
  tc.schedule.peak = 3e-4f, tc.schedule.warmup = 1, tc.schedule.total = tc.steps;
  tc.cuda_graph = c.graph;
  SyntheticSource src(c.batch, c.seq, mc.vocab_size, c.docs);
  text::Trainer trainer(model, tc, src);

  // The FLOP count of bench_cuda_step: 6 x every parameter but the lookup table x tokens, and
  // causal attention at half its matrix (mfu_full: the whole matrix, PaLM's definition).
  const double tokens = double(c.batch * c.seq * c.accum);
  const double model_flops = 6.0 * double(n_params - n_embed) * tokens;
  const double attn_flops = 3.0 * 4.0 * double(mc.n_layers) * double(c.batch * c.accum) *
                            double(c.seq) * double(c.seq) * double(mc.dim) / 2.0;
  // --graph on a GPU: the warm-up goes on until a step has run as a graph (the capture), so
  // that every timed step is a replay. In bf16 the first two steps run eagerly: the second is
  // the first to read AdamW's bf16 weight copies (another layout). At most 4 steps more.
  const bool want_replay = c.graph && !c.device.is_cpu();
  double total = 0, loss = 0;
  int64_t graph_steps = 0, timed_steps = 0, s = 0;
  bool captured = false;
  while (timed_steps < c.steps) {
    ++s;
    const double ts = now();
    const text::StepStats st = trainer.step();
    const double dt = now() - ts;
    const bool timed = s > c.warmup && (!want_replay || captured || s > c.warmup + kMoreWarmup);
    captured = captured || st.graph;
    LLAMA3_CHECK(!st.skipped, "step {} skipped its update (loss {}, gradient norm {})", s, st.loss,
                 st.grad_norm);
    if (timed) total += dt, ++timed_steps, graph_steps += st.graph ? 1 : 0;
    loss = st.loss;
    fmt::print("step {} loss {:.4f} norm {:.3f} {:.1f} ms{}{}\n", s, st.loss, st.grad_norm,
               dt * 1e3, st.graph ? " (graph)" : "", timed ? "" : " (warm-up)");
    std::fflush(stdout);
  }
  const double per = total / double(c.steps);
  const double mfu = (model_flops + attn_flops) / per / 989e12;
  const double mfu_full = (model_flops + 2.0 * attn_flops) / per / 989e12;
  const double peak_gib =
      c.device.is_cpu()
          ? 0.0
          : double(backend_for(c.device).allocator().stats().peak_in_use) / double(1ull << 30);
  fmt::print(
      "trainer step {:.1f} ms, {:.0f} tokens/s, MFU {:.1f}% of 989 TFLOP/s ({:.1f}% PaLM's); "
      "{} of {} timed steps replayed as graphs; peak device memory {:.1f} GiB\n",
      per * 1e3, tokens / per, mfu * 100, mfu_full * 100, graph_steps, c.steps, peak_gib);
  fmt::print(
      "RESULT llama3_trainer{} seq={} batch={} accum={} docs={} tokens_per_s={:.0f} mfu={:.4f} "
      "mfu_full={:.4f} step_ms={:.1f} loss={:.4f} graph_steps={} after_steps={}\n",
      c.graph ? "_graph" : "", c.seq, c.batch, c.accum, c.docs, tokens / per, mfu, mfu_full,
      per * 1e3, loss, graph_steps, s);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Config c = parse(argc, argv);
    if (!c.device.is_cpu() && !cuda_init()) {
      fmt::print("SKIP: no CUDA device (cuda_init() returned false)\n");
      return 0;
    }
    return run(c);
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_trainer_step: {}\n", e.what());
    return 1;
  }
}
