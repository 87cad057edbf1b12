#include "text/model/config.h"

#include <cmath>

#include "runtime/core/error.h"

namespace llama3::text {

int64_t LlamaConfig::ffn_hidden() const {
  if (ffn_hidden_override) return *ffn_hidden_override;
  int64_t h = 4 * dim;
  h = int64_t(2 * h / 3);
  if (ffn_dim_multiplier) h = int64_t(*ffn_dim_multiplier * double(h));
  return multiple_of * ((h + multiple_of - 1) / multiple_of);
}

void LlamaConfig::validate() const {
  LLAMA3_CHECK(dim > 0 && n_layers > 0 && n_heads > 0 && n_kv_heads > 0 && vocab_size > 0,
               "model config: dim {}, n_layers {}, n_heads {}, n_kv_heads {}, vocab_size {} must "
               "all be positive",
               dim, n_layers, n_heads, n_kv_heads, vocab_size);
  LLAMA3_CHECK(dim % n_heads == 0, "model config: dim {} is not divisible by n_heads {} ({} % {} = {})",
               dim, n_heads, dim, n_heads, dim % n_heads);
  LLAMA3_CHECK(n_heads % n_kv_heads == 0,
               "model config: n_heads {} is not divisible by n_kv_heads {} ({} % {} = {})", n_heads,
               n_kv_heads, n_heads, n_kv_heads, n_heads % n_kv_heads);
  LLAMA3_CHECK(head_dim() % 2 == 0, "model config: head_dim {} (dim {} / n_heads {}) must be even for RoPE",
               head_dim(), dim, n_heads);
  LLAMA3_CHECK(multiple_of > 0, "model config: multiple_of {} must be positive", multiple_of);
  LLAMA3_CHECK(norm_eps > 0 && rope_theta > 0, "model config: norm_eps {} and rope_theta {} must be positive",
               norm_eps, rope_theta);
  LLAMA3_CHECK(max_seq_len > 0, "model config: max_seq_len {} must be positive", max_seq_len);
  if (rope_scaling)
    LLAMA3_CHECK(rope_scaling->factor > 0 && rope_scaling->high_freq_factor > rope_scaling->low_freq_factor,
                 "model config: rope_scaling factor {} must be positive and high_freq_factor {} > "
                 "low_freq_factor {}",
                 rope_scaling->factor, rope_scaling->high_freq_factor, rope_scaling->low_freq_factor);
}

int64_t LlamaConfig::num_params() const {
  const int64_t hd = head_dim();
  const int64_t attn = dim * n_heads * hd * 2 + dim * n_kv_heads * hd * 2;
  const int64_t mlp = 3 * dim * ffn_hidden();
  return n_layers * (attn + mlp + 2 * dim) + dim + 2 * vocab_size * dim;
}

double LlamaConfig::flops_per_token(int64_t seq_len) const {
  // Matmul parameters (the input embedding is a lookup, the output head is a matmul).
  const double matmul = double(num_params() - vocab_size * dim - n_layers * 2 * dim - dim);
  // Attention scores and values: 2 matmuls of T x T x head_dim per head, x3 for fwd+bwd,
  // halved by the causal mask (PaLM-style accounting without the halving would use 12).
  const double attn = 6.0 * double(n_layers) * double(seq_len) * double(dim);
  return 6.0 * matmul + attn;
}

nlohmann::json LlamaConfig::to_hf_json() const {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"model_type", "llama"},
                      {"hidden_size", dim},
                      {"num_hidden_layers", n_layers},
                      {"num_attention_heads", n_heads},
                      {"num_key_value_heads", n_kv_heads},
                      {"head_dim", head_dim()},
                      {"intermediate_size", ffn_hidden()},
                      {"vocab_size", vocab_size},
                      {"rms_norm_eps", norm_eps},
                      {"rope_theta", rope_theta},
                      {"max_position_embeddings", max_seq_len},
                      {"hidden_act", "silu"},
                      {"attention_bias", false},
                      {"mlp_bias", false},
                      {"tie_word_embeddings", false},
                      {"torch_dtype", "float32"},
                      {"llama3_multiple_of", multiple_of}};
  if (ffn_dim_multiplier) j["llama3_ffn_dim_multiplier"] = *ffn_dim_multiplier;
  if (rope_scaling)
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_scaling->factor},
                         {"low_freq_factor", rope_scaling->low_freq_factor},
                         {"high_freq_factor", rope_scaling->high_freq_factor},
                         {"original_max_position_embeddings", rope_scaling->original_max_position}};
  else
    j["rope_scaling"] = nullptr;
  return j;
}

LlamaConfig LlamaConfig::from_hf_json(const nlohmann::json& j, const std::string& source) {
  LlamaConfig c;
  auto get = [&](const char* key) -> const nlohmann::json& {
    LLAMA3_CHECK(j.contains(key), "{}: missing field '{}'", source, key);
    return j.at(key);
  };
  try {
    c.dim = get("hidden_size").get<int64_t>();
    c.n_layers = get("num_hidden_layers").get<int64_t>();
    c.n_heads = get("num_attention_heads").get<int64_t>();
    c.n_kv_heads = j.value("num_key_value_heads", c.n_heads);
    c.vocab_size = get("vocab_size").get<int64_t>();
    c.norm_eps = j.value("rms_norm_eps", 1e-5);
    c.rope_theta = j.value("rope_theta", 500000.0);
    c.max_seq_len = j.value("max_position_embeddings", int64_t(8192));
    c.multiple_of = j.value("llama3_multiple_of", int64_t(256));
    if (j.contains("llama3_ffn_dim_multiplier")) c.ffn_dim_multiplier = j["llama3_ffn_dim_multiplier"].get<double>();
    c.ffn_hidden_override = get("intermediate_size").get<int64_t>();
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
      const auto& r = j["rope_scaling"];
      RopeScaling s;
      s.factor = r.value("factor", 8.0);
      s.low_freq_factor = r.value("low_freq_factor", 1.0);
      s.high_freq_factor = r.value("high_freq_factor", 4.0);
      s.original_max_position = r.value("original_max_position_embeddings", int64_t(8192));
      c.rope_scaling = s;
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: wrong type in model config: {}", source, e.what());
  }
  try {
    c.validate();
  } catch (const Error& e) {
    fail("{}: {}", source, e.what());
  }
  return c;
}

LlamaConfig llama3_flavour(const std::string& name) {
  LlamaConfig c;
  c.rope_theta = 500000.0;
  c.norm_eps = 1e-5;
  if (name == "debug") {
    c.dim = 64, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = 512;
    c.multiple_of = 16, c.max_seq_len = 128;
  } else if (name == "tiny") {
    c.dim = 256, c.n_layers = 4, c.n_heads = 8, c.n_kv_heads = 2, c.vocab_size = 4096;
    c.multiple_of = 64, c.max_seq_len = 512;
  } else if (name == "125M") {
    c.dim = 768, c.n_layers = 12, c.n_heads = 12, c.n_kv_heads = 4, c.vocab_size = 32768;
    c.multiple_of = 256, c.max_seq_len = 2048;
  } else if (name == "1B") {
    c.dim = 2048, c.n_layers = 16, c.n_heads = 32, c.n_kv_heads = 8, c.vocab_size = 128256;
    c.multiple_of = 256, c.ffn_dim_multiplier = 1.5, c.max_seq_len = 8192;
  } else if (name == "8B") {
    c.dim = 4096, c.n_layers = 32, c.n_heads = 32, c.n_kv_heads = 8, c.vocab_size = 128256;
    c.multiple_of = 1024, c.ffn_dim_multiplier = 1.3, c.max_seq_len = 8192;
  } else if (name == "70B") {
    c.dim = 8192, c.n_layers = 80, c.n_heads = 64, c.n_kv_heads = 8, c.vocab_size = 128256;
    c.multiple_of = 4096, c.ffn_dim_multiplier = 1.3, c.max_seq_len = 8192;
  } else if (name == "405B") {
    c.dim = 16384, c.n_layers = 126, c.n_heads = 128, c.n_kv_heads = 8, c.vocab_size = 128256;
    c.multiple_of = 4096, c.ffn_dim_multiplier = 1.2, c.max_seq_len = 8192;
  } else {
    fail("unknown model flavour '{}' (known: debug, tiny, 125M, 1B, 8B, 70B, 405B)", name);
  }
  return c;
}

std::vector<std::string> llama3_flavours() { return {"debug", "tiny", "125M", "1B", "8B", "70B", "405B"}; }

std::vector<double> rope_inv_freq(const LlamaConfig& c) {
  const int64_t hd = c.head_dim();
  std::vector<double> f(hd / 2);
  for (int64_t i = 0; i < hd / 2; ++i) f[i] = 1.0 / std::pow(c.rope_theta, double(2 * i) / double(hd));
  if (!c.rope_scaling) return f;
  const RopeScaling& s = *c.rope_scaling;
  const double old = double(s.original_max_position);
  const double low_wavelen = old / s.low_freq_factor, high_wavelen = old / s.high_freq_factor;
  for (auto& x : f) {
    const double wavelen = 2 * M_PI / x;
    if (wavelen < high_wavelen) continue;
    if (wavelen > low_wavelen) {
      x /= s.factor;
    } else {
      const double smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      x = (1 - smooth) * x / s.factor + smooth * x;
    }
  }
  return f;
}

}  // namespace llama3::text
