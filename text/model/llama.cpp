#include "text/model/llama.h"

#include <cmath>

#include "runtime/autograd/autograd.h"

namespace llama3::text {

namespace {
// A Module that only names its children ("model", "layers").
class Container : public nn::Module {
 public:
  template <typename M>
  M& add(const std::string& name, std::unique_ptr<M> m) {
    return register_module(name, std::move(m));
  }
};
}  // namespace

Attention::Attention(const LlamaConfig& c, Rng& rng)
    : q_proj(register_module("q_proj", std::make_unique<nn::Linear>(c.dim, c.n_heads * c.head_dim(), 0.02, rng))),
      k_proj(register_module("k_proj", std::make_unique<nn::Linear>(c.dim, c.n_kv_heads * c.head_dim(), 0.02, rng))),
      v_proj(register_module("v_proj", std::make_unique<nn::Linear>(c.dim, c.n_kv_heads * c.head_dim(), 0.02, rng))),
      o_proj(register_module("o_proj", std::make_unique<nn::Linear>(c.n_heads * c.head_dim(), c.dim,
                                                                    0.02 / std::sqrt(2.0 * c.n_layers), rng))),
      n_heads(c.n_heads),
      n_kv_heads(c.n_kv_heads),
      head_dim(c.head_dim()) {}

Tensor Attention::operator()(const Tensor& x, const Tensor& inv_freq, const Tensor& pos,
                             const AttentionParams& p, ops::Precision prec,
                             const Tensor& residual) const {
  const int64_t B = x.size(0), T = x.size(1);
  // Head counts come from the projections' shapes, so a layer holding a slice of the heads
  // (a tensor-parallel shard) runs unchanged.
  const int64_t hq = q_proj.weight.size(0) / head_dim, hkv = k_proj.weight.size(0) / head_dim;
  // bf16 q/k/v/attention activations where the backend prefers them (see Backend).
  const bool act16 = ops::bf16_activations(prec, x.device());
  // (x may be the bf16 output of the norm: its three gradients sum in f32.)
  auto proj = [&](const nn::Linear& l, int64_t heads) {
    return ops::reshape(l(x, prec, act16, true), {B, T, heads, head_dim});
  };
  Tensor q, k, v;
  if (kv_hook_async) {
    // Independent projections, reordered so the hook's work on V and K runs meanwhile.
    auto v_done = kv_hook_async(proj(v_proj, hkv));
    auto k_done = kv_hook_async(ops::rope(proj(k_proj, hkv), inv_freq, pos));
    q = ops::rope(proj(q_proj, hq), inv_freq, pos);
    k = k_done();
    v = v_done();
  } else {
    q = proj(q_proj, hq), k = proj(k_proj, hkv), v = proj(v_proj, hkv);
    q = ops::rope(q, inv_freq, pos);
    k = ops::rope(k, inv_freq, pos);
    if (kv_hook) k = kv_hook(k), v = kv_hook(v);
  }
  Tensor o = ops::reshape(ops::attention(q, k, v, p), {B, T, hq * head_dim});
  return residual.defined() ? o_proj.plus(o, residual, prec) : o_proj(o, prec);
}

Mlp::Mlp(const LlamaConfig& c, Rng& rng)
    : gate_proj(register_module("gate_proj", std::make_unique<nn::Linear>(c.dim, c.ffn_hidden(), 0.02, rng))),
      up_proj(register_module("up_proj", std::make_unique<nn::Linear>(c.dim, c.ffn_hidden(), 0.02, rng))),
      down_proj(register_module("down_proj", std::make_unique<nn::Linear>(c.ffn_hidden(), c.dim,
                                                                          0.02 / std::sqrt(2.0 * c.n_layers), rng))) {}

Tensor Mlp::operator()(const Tensor& x, ops::Precision prec, const Tensor& residual) const {
  // bf16 gate/up/SwiGLU activations where the backend prefers them (see Backend).
  const bool act16 = ops::bf16_activations(prec, x.device());
  Tensor a = ops::swiglu(gate_proj(x, prec, act16, true), up_proj(x, prec, act16, true));
  return residual.defined() ? down_proj.plus(a, residual, prec) : down_proj(a, prec);
}

Block::Block(const LlamaConfig& c, Rng& rng)
    : input_layernorm(register_module("input_layernorm", std::make_unique<nn::RMSNorm>(c.dim, float(c.norm_eps)))),
      self_attn(register_module("self_attn", std::make_unique<Attention>(c, rng))),
      post_attention_layernorm(
          register_module("post_attention_layernorm", std::make_unique<nn::RMSNorm>(c.dim, float(c.norm_eps)))),
      mlp(register_module("mlp", std::make_unique<Mlp>(c, rng))) {}

Tensor Block::operator()(const Tensor& x, const Tensor& inv_freq, const Tensor& pos,
                         const AttentionParams& p, ops::Precision prec) const {
  // Where the backend prefers bf16 activations the norms write bf16: their outputs only feed
  // bf16 GEMMs, which would otherwise each cast them (three times for q/k/v, twice for
  // gate/up).
  const bool act16 = ops::bf16_activations(prec, x.device());
  // The residual adds happen in the o and down projections' GEMMs (Linear::plus).
  Tensor h = self_attn(input_layernorm(x, act16), inv_freq, pos, p, prec, x);
  return mlp(post_attention_layernorm(h, act16), prec, h);
}

LlamaModel::LlamaModel(const LlamaConfig& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  Rng rng(seed);
  auto model = std::make_unique<Container>();
  embed_ = &model->add("embed_tokens", std::make_unique<nn::Embedding>(cfg_.vocab_size, cfg_.dim, 0.02, rng));
  auto layers = std::make_unique<Container>();
  for (int64_t i = 0; i < cfg_.n_layers; ++i)
    blocks_.push_back(&layers->add(std::to_string(i), std::make_unique<Block>(cfg_, rng)));
  model->add("layers", std::move(layers));
  norm_ = &model->add("norm", std::make_unique<nn::RMSNorm>(cfg_.dim, float(cfg_.norm_eps)));
  register_module("model", std::move(model));
  head_ = &register_module("lm_head", std::make_unique<nn::Linear>(cfg_.dim, cfg_.vocab_size, 0.02, rng));
  std::vector<float> f;
  for (double x : rope_inv_freq(cfg_)) f.push_back(float(x));
  inv_freq_ = Tensor::from_vector(f, {int64_t(f.size())});
}

std::vector<Block*> LlamaModel::blocks() const { return blocks_; }

void LlamaModel::to(Device d) {
  for (auto& p : named_parameters()) {
    bool rg = p.tensor->requires_grad();
    *p.tensor = p.tensor->to(d).detach();
    p.tensor->set_requires_grad(rg);
  }
  inv_freq_ = inv_freq_.to(d);
}

Tensor LlamaModel::hidden(const Tensor& tokens, const Tensor& doc_ids) const {
  LLAMA3_CHECK(tokens.dim() == 2 && tokens.dtype() == DType::i32, "model: tokens {} must be (B, T) int32",
               tokens.str());
  const int64_t B = tokens.size(0), T = tokens.size(1);
  LLAMA3_CHECK(T <= cfg_.max_seq_len, "model: sequence length {} exceeds max_seq_len {}", T, cfg_.max_seq_len);
  const Device dev = embed_->weight.device();
  Tensor& cached = pos_[T];
  if (!cached.defined() || !(cached.device() == dev)) {
    std::vector<int32_t> pv(T);
    for (int64_t i = 0; i < T; ++i) pv[i] = int32_t(i);
    cached = Tensor::from_vector(pv, {T}, dev);
  }
  const Tensor pos = cached;
  AttentionParams ap;
  ap.causal = true;
  // Mixed precision: attention may use bf16 products with f32 accumulation (tensor cores
  // on CUDA); the CPU backend ignores it.
  if (opts_.precision == ops::Precision::bf16) ap.compute = AttnCompute::bf16;
  if (doc_ids.defined()) ap.doc_ids = doc_ids.to(dev);
  Tensor h = (*embed_)(tokens.to(dev));  // (B, T, D)
  const ops::Precision prec = opts_.precision;
  for (Block* b : blocks_) {
    if (opts_.activation_checkpointing) {
      h = autograd::checkpoint(
          [b, this, pos, ap, prec](const std::vector<Tensor>& in) { return (*b)(in[0], inv_freq_, pos, ap, prec); },
          {h});
    } else {
      h = (*b)(h, inv_freq_, pos, ap, prec);
    }
  }
  h = (*norm_)(h);
  return ops::reshape(h, {B * T, cfg_.dim});
}

int64_t LlamaModel::ce_chunk_rows(const Device& device) const {
  return opts_.ce_chunk > 0 ? opts_.ce_chunk : backend_for(device).cross_entropy_chunk(cfg_.vocab_size);
}

Tensor LlamaModel::loss(const Tensor& tokens, const Tensor& targets, const Tensor& doc_ids,
                        int64_t n_valid) const {
  Tensor h = hidden(tokens, doc_ids);
  ops::CrossEntropyOptions o;
  o.chunk = ce_chunk_rows(h.device());
  o.precision = opts_.precision;
  o.n_valid = n_valid;
  return ops::linear_cross_entropy(h, head_->weight, targets.to(h.device()).view({-1}), o);
}

Tensor LlamaModel::logits(const Tensor& tokens, const Tensor& doc_ids) const {
  Tensor h = hidden(tokens, doc_ids);
  Tensor l = ops::linear(h, head_->weight, opts_.precision);
  return ops::reshape(l, {tokens.size(0), tokens.size(1), cfg_.vocab_size});
}

void register_text_models(nn::Registry& r) {
  r.add("text.llama3", [](const nlohmann::json& j) -> std::unique_ptr<nn::Module> {
    LlamaConfig c = j.contains("flavour") ? llama3_flavour(j["flavour"].get<std::string>())
                                          : LlamaConfig::from_hf_json(j);
    return std::make_unique<LlamaModel>(c, j.value("seed", uint64_t(0)));
  });
}

}  // namespace llama3::text
