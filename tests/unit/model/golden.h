// The golden test's fixture (golden_test.cpp on the CPU, golden_device_test.cpp on CUDA): a
// small Llama 3 with GQA, the document mask and Llama 3.1 RoPE scaling, one batch, and the
// PyTorch reference (tests/reference/llama_ref.py) run on the same weights and batch.
//
// The reference runs under /usr/bin/python3 from LLAMA3_SOURCE_DIR; the environment variables
// LLAMA3_PYTHON and LLAMA3_SOURCE_DIR override both (gpu-check.sh on a GPU machine, whose
// Python with PyTorch and checkout live elsewhere).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "runtime/autograd/autograd.h"
#include "runtime/core/rng.h"
#include "runtime/io/safetensors.h"
#include "runtime/optim/adamw.h"
#include "text/model/llama.h"

namespace llama3::golden {

namespace fs = std::filesystem;

inline text::LlamaConfig golden_config() {
  text::LlamaConfig c;
  c.dim = 64, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = 97;
  c.multiple_of = 16, c.max_seq_len = 64;
  // original context 64: head_dim 16 has frequencies kept, interpolated and divided.
  c.rope_scaling = text::RopeScaling{8.0, 1.0, 4.0, 64};
  return c;
}

// max |a - b| / max |b|.
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - double(b[i])));
    den = std::max(den, std::abs(double(b[i])));
  }
  return num / std::max(den, 1e-30);
}

// ||a - b|| / ||b|| (the parity suite's normalised error, whose bf16 bound is 1e-2).
inline double norm_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
    den += double(b[i]) * double(b[i]);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

inline std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

struct Golden : ::testing::Test {
  fs::path dir;
  text::LlamaConfig cfg = golden_config();
  Tensor tokens, targets, doc_ids;
  optim::AdamWConfig ocfg{.lr = 1e-2f,
                          .beta1 = 0.9f,
                          .beta2 = 0.95f,
                          .eps = 1e-8f,
                          .weight_decay = 0.1f,
                          .max_grad_norm = 1.0f};
  io::TensorMap ref;

  void SetUp() override {
    dir = fs::temp_directory_path() / ("llama3_golden_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const int64_t B = 2, T = 24;
    Rng rng(5);
    std::vector<int32_t> tk(B * T), tg(B * T), dc(B * T);
    for (int64_t i = 0; i < B * T; ++i) tk[i] = int32_t(rng.below(cfg.vocab_size));
    for (int64_t i = 0; i < B * T; ++i)
      tg[i] = (i % 7 == 3) ? -1 : int32_t(rng.below(cfg.vocab_size));
    for (int64_t t = 0; t < T; ++t) dc[t] = t < 9 ? 0 : (t < 17 ? 1 : 2);  // three documents
    for (int64_t t = 0; t < T; ++t) dc[T + t] = t < 13 ? 0 : 1;            // two documents
    tokens = Tensor::from_vector(tk, {B, T});
    targets = Tensor::from_vector(tg, {B, T});
    doc_ids = Tensor::from_vector(dc, {B, T});
  }
  void TearDown() override { fs::remove_all(dir); }

  // Gradient accumulation over two micro-batches (the batch, then its tokens shifted by one;
  // each loss's gradient seeded with 1/2) on `dev`, with the in-place gradient sums
  // (autograd::set_in_place_accumulation) on or off. Returns every parameter's gradient (on the
  // CPU); second_extra: how many more sums the second backward did in place than the first (the
  // leaves' own, Node::accumulate_into).
  std::vector<std::vector<float>> accumulated_grads(const Device& dev, ops::Precision prec,
                                                    bool in_place, int64_t& second_extra) {
    text::LlamaModel m(cfg, 3);
    m.to(dev);
    m.options().precision = prec;
    std::vector<int32_t> tv = tokens.to_vector<int32_t>(), sv(tv.size());
    for (size_t i = 0; i < tv.size(); ++i) sv[i] = tv[(i + 1) % tv.size()];
    const Tensor tokens2 = Tensor::from_vector(sv, tokens.shape());
    autograd::set_in_place_accumulation(in_place);
    const int64_t n0 = autograd::in_place_accumulations();
    // Seeded with 1/2, as the trainer seeds each of grad_accum micro-batches.
    auto half = [](const Tensor& l) { return Tensor::full(l.shape(), 0.5, l.dtype(), l.device()); };
    Tensor l1 = m.loss(tokens, targets, doc_ids);
    l1.backward(half(l1));
    const int64_t n1 = autograd::in_place_accumulations();
    Tensor l2 = m.loss(tokens2, targets, doc_ids);
    l2.backward(half(l2));
    second_extra = (autograd::in_place_accumulations() - n1) - (n1 - n0);
    autograd::set_in_place_accumulation(true);
    std::vector<std::vector<float>> g;
    for (auto& p : m.named_parameters())
      g.push_back(p.tensor->grad().to(Device::cpu()).to_vector<float>());
    return g;
  }

  // One backward of the batch on `dev`. Returns every parameter's gradient (on the CPU);
  // counted: how far `counter` (one of autograd's statistics) moved during it.
  std::vector<std::vector<float>> one_backward(const Device& dev, ops::Precision prec,
                                               int64_t (*counter)(), int64_t& counted) {
    text::LlamaModel m(cfg, 11);
    m.to(dev);
    m.options().precision = prec;
    const int64_t n0 = counter();
    m.loss(tokens, targets, doc_ids).backward();
    counted = counter() - n0;
    std::vector<std::vector<float>> g;
    for (auto& p : m.named_parameters())
      g.push_back(p.tensor->grad().to(Device::cpu()).to_vector<float>());
    return g;
  }
  // In bf16 mixed precision the RMSNorm backward that completes the residual stream's
  // gradient also writes its bf16 rounding for the o/down projection's bf16 GEMMs (two a
  // layer) instead of their own casts: the same gradients bit for bit. In f32 no GEMM wants
  // one.
  void expect_bf16_copies_equal_casts(const Device& dev, ops::Precision prec) {
    int64_t off = -1, on = -1;
    autograd::set_bf16_grad_copies(false);
    const auto a = one_backward(dev, prec, autograd::bf16_grad_copies, off);
    autograd::set_bf16_grad_copies(true);
    const auto b = one_backward(dev, prec, autograd::bf16_grad_copies, on);
    EXPECT_EQ(off, 0);
    EXPECT_EQ(on, prec == ops::Precision::bf16 ? 2 * cfg.n_layers : 0);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(b[i], a[i]) << i;
  }

  // m's weights must be on the CPU (as constructed).
  void run_reference(const text::LlamaModel& m) {
    io::TensorMap w;
    for (auto& p : m.named_parameters()) w[p.name] = *p.tensor;
    io::save_safetensors((dir / "model.safetensors").string(), w);
    io::save_safetensors((dir / "batch.safetensors").string(),
                         {{"tokens", tokens}, {"targets", targets}, {"doc_ids", doc_ids}});
    std::ofstream(dir / "config.json") << cfg.to_hf_json().dump();
    nlohmann::json tr = {{"lr", ocfg.lr},
                         {"beta1", ocfg.beta1},
                         {"beta2", ocfg.beta2},
                         {"eps", ocfg.eps},
                         {"weight_decay", ocfg.weight_decay},
                         {"max_grad_norm", ocfg.max_grad_norm},
                         {"steps", 5}};
    std::ofstream(dir / "train.json") << tr.dump();
    const std::string cmd = env_or("LLAMA3_PYTHON", "/usr/bin/python3") + " " +
                            env_or("LLAMA3_SOURCE_DIR", LLAMA3_SOURCE_DIR) +
                            "/tests/reference/llama_ref.py " + dir.string();
    ASSERT_EQ(std::system(cmd.c_str()), 0) << "reference failed: " << cmd;
    ref = io::load_safetensors((dir / "ref.safetensors").string());
  }
};

}  // namespace llama3::golden
