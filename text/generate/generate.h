// Autoregressive generation with a KV cache: a prompt is run once (prefill), then each new
// token costs one position through the model, attending to the cached keys and values
// (GQA: n_kv_heads cached heads shared by groups of query heads). Batched: every active
// sequence advances together, each at its own position. Sampling: greedy, or temperature
// with top-k and top-p (nucleus) filtering; a sequence stops at any stop id or its budget.
// Inference only (no autograd); runs on the model's device through the op API, with the
// cache-attention on the host.
#pragma once

#include <cstdint>
#include <vector>

#include "text/model/llama.h"

namespace llama3::text {

struct SamplingOptions {
  bool greedy = false;
  float temperature = 1.0f;  // <= 0 means greedy
  int64_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // 1: off
  int64_t max_new_tokens = 64;
  uint64_t seed = 0;
  std::vector<int32_t> stop_ids;  // generation ends after emitting one of these
};

struct Generation {
  std::vector<int32_t> tokens;  // new tokens, the stop token excluded
  bool stopped = false;         // ended on a stop id (else on the budget or context)
};

struct GenerateStats {
  int64_t new_tokens = 0;
  double prefill_s = 0, decode_s = 0;
};

// KV cache of one batch: per layer, keys and values (B, L, Hkv, Dh) f32 on the host.
class KvCache {
 public:
  KvCache(const LlamaConfig& c, int64_t batch, int64_t max_len);
  int64_t length(int64_t b) const { return len_[size_t(b)]; }
  int64_t max_len() const { return max_len_; }
  float* k(int64_t layer, int64_t b, int64_t pos);
  float* v(int64_t layer, int64_t b, int64_t pos);
  void set_length(int64_t b, int64_t n) { len_[size_t(b)] = n; }

 private:
  int64_t n_layers_, batch_, max_len_, kv_dim_;
  std::vector<std::vector<float>> k_, v_;
  std::vector<int64_t> len_;
};

// The projection weights of a model in bf16 precision, converted once for a generation call:
// q/k/v and gate/up fused into one matrix each (one GEMM instead of three / two), in bf16 so
// a decode step, which reads every weight for a handful of tokens, moves half the bytes and
// converts nothing (ops::linear would otherwise cast each f32 weight on every call). An f32
// model decodes from its own weights instead, so generation never doubles its memory.
// On the CPU each matrix is also packed in panels (cpu_pack_bf16_panels) for the decode GEMM.
struct DecodeWeight {
  Tensor w;  // (n, k) bf16, or the packed panels (1-D) when `packed`
  int64_t n = 0, k = 0;
  bool packed = false;
};
struct DecodeWeights {
  explicit DecodeWeights(const LlamaModel& m);
  struct Layer {
    DecodeWeight qkv, o, gate_up, down;
  };
  std::vector<Layer> layers;
  DecodeWeight lm_head;
};

// x (..., k) times a decode weight: (..., n) f32.
Tensor decode_linear(const Tensor& x, const DecodeWeight& w, ops::Precision prec);

// Runs tokens (R, T) for the cache rows `rows` (each row appends T positions after its
// current length) and returns the logits of each row's last new position (R, V). `dw`
// (optional, from the same model) supplies pre-converted projection weights.
Tensor forward_cached(const LlamaModel& m, KvCache& cache, const std::vector<int64_t>& rows,
                      const std::vector<int32_t>& tokens, int64_t T,
                      const DecodeWeights* dw = nullptr);

// Generates a continuation of each prompt.
std::vector<Generation> generate(const LlamaModel& m,
                                 const std::vector<std::vector<int32_t>>& prompts,
                                 const SamplingOptions& opt, GenerateStats* stats = nullptr);

// Picks a token from logits (V) under the options (exposed for tests).
int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& opt, Rng& rng);

}  // namespace llama3::text
