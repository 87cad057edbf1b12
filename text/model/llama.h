// The Llama 3 text model: token embedding, n_layers pre-norm blocks (RMSNorm -> GQA
// attention with RoPE and the causal/document mask -> residual; RMSNorm -> SwiGLU FFN ->
// residual), final RMSNorm and an untied output head. Parameter names are HF's
// (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`), so checkpoints load in
// HF transformers. The model knows nothing of parallelism or devices.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "runtime/nn/layers.h"
#include "runtime/nn/registry.h"
#include "text/model/config.h"

namespace llama3::text {

struct ModelOptions {
  ops::Precision precision = ops::Precision::f32;  // GEMM inputs (mixed precision: bf16)
  bool activation_checkpointing = false;            // recompute each block in backward
  int64_t ce_chunk = 0;  // rows per cross-entropy chunk; 0: Backend::cross_entropy_chunk
};

class Attention : public nn::Module {
 public:
  Attention(const LlamaConfig& c, Rng& rng);
  // x (B, T, D) -> (B, T, D); plus residual (B, T, D) when given, added by the o
  // projection's GEMM (nn::Linear::plus).
  Tensor operator()(const Tensor& x, const Tensor& inv_freq, const Tensor& pos,
                    const AttentionParams& p, ops::Precision prec,
                    const Tensor& residual = Tensor()) const;
  nn::Linear &q_proj, &k_proj, &v_proj, &o_proj;
  int64_t n_heads, n_kv_heads, head_dim;
  // Optional differentiable transform of the rotated keys and of the values (B, T, Hkv, Dh)
  // before attention (unset: identity). A parallelize step uses it (e.g. to gather keys of
  // other sequence chunks, with AttentionParams::q_pos); the model attaches no meaning to it.
  std::function<Tensor(const Tensor&)> kv_hook;
  // Optional asynchronous form of kv_hook (takes precedence; same results): called with the
  // rotated keys or the values, it starts the transform (e.g. a transfer) and returns the
  // function that completes it. The projections then run in the order V, K, Q, so V's
  // transform proceeds while K and Q are computed and K's while Q is.
  std::function<std::function<Tensor()>(const Tensor&)> kv_hook_async;
};

class Mlp : public nn::Module {
 public:
  Mlp(const LlamaConfig& c, Rng& rng);
  // x (B, T, D) -> (B, T, D); plus residual when given, added by the down projection's GEMM.
  Tensor operator()(const Tensor& x, ops::Precision prec, const Tensor& residual = Tensor()) const;
  nn::Linear &gate_proj, &up_proj, &down_proj;
};

class Block : public nn::Module {
 public:
  Block(const LlamaConfig& c, Rng& rng);
  Tensor operator()(const Tensor& x, const Tensor& inv_freq, const Tensor& pos,
                    const AttentionParams& p, ops::Precision prec) const;
  nn::RMSNorm& input_layernorm;
  Attention& self_attn;
  nn::RMSNorm& post_attention_layernorm;
  Mlp& mlp;
};

class LlamaModel : public nn::Module {
 public:
  // Weights drawn from N(0, 0.02) (output projections scaled by 1/sqrt(2 n_layers)),
  // norms at one; deterministic for a seed.
  LlamaModel(const LlamaConfig& cfg, uint64_t seed);

  // Final-normed hidden states (B*T, D) for tokens (B, T) int32; doc_ids (B, T) int32
  // (optional) restricts attention to the token's own document.
  Tensor hidden(const Tensor& tokens, const Tensor& doc_ids = Tensor()) const;
  // Mean next-token cross-entropy over targets >= 0 (B, T), never materialising full logits.
  // n_valid: the number of targets >= 0 when the caller knows it from host data (0: counted
  // from the targets, a read back from the device, or on the device in a captured step).
  Tensor loss(const Tensor& tokens, const Tensor& targets, const Tensor& doc_ids = Tensor(),
              int64_t n_valid = 0) const;
  // Logits (B, T, V) (inference and tests).
  Tensor logits(const Tensor& tokens, const Tensor& doc_ids = Tensor()) const;

  const LlamaConfig& config() const { return cfg_; }
  ModelOptions& options() { return opts_; }
  const ModelOptions& options() const { return opts_; }
  // Rows per cross-entropy chunk on `device`: options().ce_chunk when set, else the backend's
  // choice for this vocabulary.
  int64_t ce_chunk_rows(const Device& device) const;
  const Tensor& inv_freq() const { return inv_freq_; }
  // Blocks and heads, for the parallelize step and generation.
  std::vector<Block*> blocks() const;
  nn::Embedding& embed_tokens() const { return *embed_; }
  nn::RMSNorm& norm() const { return *norm_; }
  nn::Linear& lm_head() const { return *head_; }
  // Moves parameters to a device (keeps names).
  void to(Device d);

 private:
  LlamaConfig cfg_;
  ModelOptions opts_;
  Tensor inv_freq_;  // (head_dim / 2) f32
  // Positions 0..T-1 on the weights' device per length T, kept for the model's life: made
  // once, not uploaded every step (an upload cannot be part of a captured step, and a
  // captured step reads them at their address on every replay, whatever ran in between).
  mutable std::map<int64_t, Tensor> pos_;
  nn::Embedding* embed_;
  std::vector<Block*> blocks_;
  nn::RMSNorm* norm_;
  nn::Linear* head_;
};

// Registers "text.llama3" (config: HF config.json fields, or {"flavour": name, ...}).
void register_text_models(nn::Registry& r);

}  // namespace llama3::text
