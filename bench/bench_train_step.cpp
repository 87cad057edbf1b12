// Training-step benchmark (issue 2 config): Llama, dim 512, 8 layers, 8 heads, 2 kv heads,
// FFN 1536, vocab 8192, seq 512, batch 8, AdamW, on this machine's threads. Measures the
// GEMM ceiling in the same run (oneDNN, f32 and bf16) and prints tokens/s, useful GFLOP/s
// (6 x params x tokens + attention), % of the ceiling, and peak RSS, as one JSON line per
// precision, for bench/run_train_step.sh to compare with the PyTorch peer.
//
// usage: bench_train_step [--precision f32|bf16] [--steps N] [--warmup N] [--batch B] [--seq T]
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/cpu/cpu_backend.h"
#include "runtime/optim/adamw.h"
#include "text/model/llama.h"

using namespace llama3;
using clk = std::chrono::steady_clock;

namespace {

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string precision = "f32";
  int steps = 5, warmup = 2;
  int64_t B = 8, T = 512;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--precision") precision = v;
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--warmup") warmup = std::stoi(v);
    else if (k == "--batch") B = std::stoll(v);
    else if (k == "--seq") T = std::stoll(v);
    else { std::fprintf(stderr, "unknown option %s\n", k.c_str()); return 2; }
  }
  text::LlamaConfig c;
  c.dim = 512, c.n_layers = 8, c.n_heads = 8, c.n_kv_heads = 2, c.vocab_size = 8192;
  c.ffn_hidden_override = 1536, c.max_seq_len = T;
  text::LlamaModel model(c, 0);
  model.options().precision = precision == "bf16" ? ops::Precision::bf16 : ops::Precision::f32;
  optim::AdamW opt(model.named_parameters(), {.lr = 1e-4f});
  Rng rng(1);
  std::vector<int32_t> tok(B * T), tgt(B * T);
  for (auto& t : tok) t = int32_t(rng.below(c.vocab_size));
  for (auto& t : tgt) t = int32_t(rng.below(c.vocab_size));
  Tensor tokens = Tensor::from_vector(tok, {B, T}), targets = Tensor::from_vector(tgt, {B, T});
  const double ceiling = cpu_gemm_peak_flops(precision == "bf16", 2048);
  double total = 0;
  for (int s = 0; s < warmup + steps; ++s) {
    auto t0 = clk::now();
    Tensor loss = model.loss(tokens, targets);
    loss.backward();
    opt.step(1e-4f);
    opt.zero_grad();
    double sec = std::chrono::duration<double>(clk::now() - t0).count();
    if (s >= warmup) total += sec;
  }
  const double step_s = total / steps;
  const double tps = double(B * T) / step_s;
  const double flops = c.flops_per_token(T) * double(B * T) / step_s;
  std::printf("{\"impl\": \"llama3\", \"precision\": \"%s\", \"threads\": %d, \"tokens_per_s\": %.1f, "
              "\"gflops\": %.1f, \"ceiling_gflops\": %.1f, \"pct_of_ceiling\": %.1f, \"peak_rss_mb\": %.0f, "
              "\"step_s\": %.3f}\n",
              precision.c_str(), cpu_threads(), tps, flops / 1e9, ceiling / 1e9, 100 * flops / ceiling,
              peak_rss_mb(), step_s);
}
