// Generation benchmark: KV-cache greedy decoding of a flavour with random weights (tiny,
// 125M), batch 1 and batch 16, prompts of 16 tokens, 64 new tokens each (no early stop).
// Prints one JSON line per batch size: decode tokens/s (new tokens / decode time) and
// end-to-end tokens/s (prefill included), for comparison with bench/generate_peer.py.
//
// --precision bf16 decodes with bf16 weights (the model's bf16 mixed precision; compare with
// generate_peer.py --dtype bf16).
//
// usage: bench_generate [--flavour tiny] [--batch 1,16] [--prompt 16] [--new 64] [--reps 2]
//                       [--precision f32|bf16]
#include <chrono>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/core/rng.h"
#include "text/generate/generate.h"

using namespace llama3;

int main(int argc, char** argv) {
  std::string flavour = "tiny", batches = "1,16", precision = "f32";
  int64_t prompt = 16, n_new = 64, reps = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--flavour")
      flavour = v;
    else if (k == "--batch")
      batches = v;
    else if (k == "--prompt")
      prompt = std::stoll(v);
    else if (k == "--new")
      n_new = std::stoll(v);
    else if (k == "--reps")
      reps = std::stoll(v);
    else if (k == "--precision" && (v == "f32" || v == "bf16"))
      precision = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  text::LlamaConfig c = text::llama3_flavour(flavour);
  text::LlamaModel m(c, 1);
  if (precision == "bf16") m.options().precision = ops::Precision::bf16;
  std::stringstream ss(batches);
  std::string tokb;
  while (std::getline(ss, tokb, ',')) {
    const int64_t B = std::stoll(tokb);
    Rng rng(7);
    std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(B));
    for (auto& p : prompts)
      for (int64_t t = 0; t < prompt; ++t) p.push_back(int32_t(rng.below(uint64_t(c.vocab_size))));
    text::SamplingOptions so;
    so.greedy = true;
    so.max_new_tokens = n_new;
    double best_decode = 0, best_total = 0;
    for (int64_t r = 0; r < reps; ++r) {
      text::GenerateStats st;
      text::generate(m, prompts, so, &st);
      // The first new token comes from the prefill; decode steps make the rest.
      const double decode_tokens = double(st.new_tokens - B);
      best_decode = std::max(best_decode, decode_tokens / st.decode_s);
      best_total = std::max(best_total, double(st.new_tokens) / (st.prefill_s + st.decode_s));
    }
    std::printf(
        "{\"impl\": \"llama3\", \"flavour\": \"%s\", \"precision\": \"%s\", \"batch\": %lld, "
        "\"prompt\": %lld, \"new\": %lld, "
        "\"decode_tokens_per_s\": %.1f, \"total_tokens_per_s\": %.1f}\n",
        flavour.c_str(), precision.c_str(), (long long)B, (long long)prompt, (long long)n_new,
        best_decode, best_total);
    std::fflush(stdout);
  }
  return 0;
}
