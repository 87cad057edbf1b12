// Llama 3 model configuration: the shapes of every flavour from a debug model to the
// paper's 405B, derived sizes computed once (head_dim, ffn_hidden), validation with the
// numbers in the message, and conversion to/from HF `config.json`.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace llama3::text {

struct RopeScaling {  // Llama 3.1 frequency scaling
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position = 8192;
};

struct LlamaConfig {
  int64_t dim = 256;
  int64_t n_layers = 4;
  int64_t n_heads = 8;
  int64_t n_kv_heads = 2;
  int64_t vocab_size = 8192;
  int64_t multiple_of = 64;
  std::optional<double> ffn_dim_multiplier;
  double norm_eps = 1e-5;
  double rope_theta = 500000.0;
  std::optional<RopeScaling> rope_scaling;
  int64_t max_seq_len = 512;
  std::optional<int64_t> ffn_hidden_override;  // exact FFN size (HF intermediate_size)

  int64_t head_dim() const { return dim / n_heads; }
  // hidden = 4*dim; hidden = int(2*hidden/3); hidden = int(multiplier*hidden); round up.
  int64_t ffn_hidden() const;
  // Throws naming the field and values (dim % heads, heads % kv heads, ...).
  void validate() const;
  // Parameter count (embedding and output head included).
  int64_t num_params() const;
  // Training FLOPs per token at sequence length T: 6 * (matmul params) + attention.
  double flops_per_token(int64_t seq_len) const;

  nlohmann::json to_hf_json() const;
  static LlamaConfig from_hf_json(const nlohmann::json& j, const std::string& source = "config");
};

// debug, tiny, 125M, 1B, 8B, 70B, 405B. Throws listing the flavours when unknown.
LlamaConfig llama3_flavour(const std::string& name);
std::vector<std::string> llama3_flavours();

// Inverse RoPE frequencies (head_dim / 2), with Llama 3.1 scaling when configured.
std::vector<double> rope_inv_freq(const LlamaConfig& c);

}  // namespace llama3::text
