// Golden test: the Llama 3 model against a PyTorch reference (tests/reference/llama_ref.py)
// on the same weights and batch, with GQA, the document mask and Llama 3.1 RoPE scaling on:
// logits, loss, every parameter gradient, and the first 5 AdamW training losses.
#include <gtest/gtest.h>

#include <cmath>

#include "runtime/autograd/autograd.h"
#include "runtime/optim/adamw.h"
#include "tests/unit/model/golden.h"
#include "text/model/llama.h"

using namespace llama3;

using golden::Golden;
using golden::rel_err;

TEST_F(Golden, LogitsGradientsAndFirstFiveLossesMatchPyTorch) {
  text::LlamaModel model(cfg, 11);
  ASSERT_NO_FATAL_FAILURE(run_reference(model));

  Tensor logits = model.logits(tokens, doc_ids);
  EXPECT_LT(rel_err(logits.to_vector<float>(), ref["logits"].to_vector<float>()), 1e-5);

  Tensor loss = model.loss(tokens, targets, doc_ids);
  EXPECT_NEAR(loss.item(), ref["loss"].item(), 1e-5 * std::abs(ref["loss"].item()));
  loss.backward();
  for (auto& p : model.named_parameters()) {
    SCOPED_TRACE(p.name);
    ASSERT_TRUE(p.tensor->grad().defined());
    EXPECT_LT(rel_err(p.tensor->grad().to_vector<float>(), ref["grad." + p.name].to_vector<float>()), 1e-4);
  }
  model.zero_grad();

  optim::AdamW opt(model.named_parameters(), ocfg);
  std::vector<double> ref_losses = ref["train_losses"].to_vector<double>();
  for (int step = 0; step < 5; ++step) {
    Tensor l = model.loss(tokens, targets, doc_ids);
    EXPECT_NEAR(l.item(), ref_losses[step], 1e-5 * std::abs(ref_losses[step])) << "step " << step;
    l.backward();
    opt.step(ocfg.lr);
    opt.zero_grad();
  }
}

TEST_F(Golden, ActivationCheckpointingGivesIdenticalGradients) {
  text::LlamaModel a(cfg, 3), b(cfg, 3);
  b.options().activation_checkpointing = true;
  a.loss(tokens, targets, doc_ids).backward();
  b.loss(tokens, targets, doc_ids).backward();
  auto pa = a.named_parameters(), pb = b.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(pa[i].tensor->grad().to_vector<float>(), pb[i].tensor->grad().to_vector<float>()) << pa[i].name;
}

// Gradient sums done in place (the q/k/v and gate/up projections' dx GEMMs adding into one
// another's pending sum, the norms' dx into the residual stream's) give the very gradients of
// separate adds, in f32 and in bf16 mixed precision, and do happen.
// The bf16 roundings of completed gradients on the CPU (Backend's default: the sum, then a
// cast) equal the consumers' casts, in f32 (none) and bf16.
TEST_F(Golden, Bf16GradientCopiesEqualTheCasts) {
  for (auto prec : {ops::Precision::f32, ops::Precision::bf16}) {
    SCOPED_TRACE(prec == ops::Precision::f32 ? "f32" : "bf16");
    expect_bf16_copies_equal_casts(Device::cpu(), prec);
  }
}

TEST_F(Golden, InPlaceGradientSumsEqualSeparateAdds) {
  for (auto prec : {ops::Precision::f32, ops::Precision::bf16}) {
    SCOPED_TRACE(prec == ops::Precision::f32 ? "f32" : "bf16");
    text::LlamaModel a(cfg, 3), b(cfg, 3);
    a.options().precision = b.options().precision = prec;
    autograd::set_in_place_accumulation(false);
    const int64_t n0 = autograd::in_place_accumulations();
    a.loss(tokens, targets, doc_ids).backward();
    EXPECT_EQ(autograd::in_place_accumulations(), n0);
    autograd::set_in_place_accumulation(true);
    b.loss(tokens, targets, doc_ids).backward();
    // per layer: q/k/v (2 sums), gate/up (1), both norms' dx into the residual stream (2)
    EXPECT_GE(autograd::in_place_accumulations() - n0, 5 * cfg.n_layers);
    auto pa = a.named_parameters(), pb = b.named_parameters();
    for (size_t i = 0; i < pa.size(); ++i)
      EXPECT_EQ(pa[i].tensor->grad().to_vector<float>(), pb[i].tensor->grad().to_vector<float>())
          << pa[i].name;
  }
}

// Gradient accumulation over micro-batches on the CPU: the weight gradients add separately
// (Backend::accumulate_weight_grads_in_place is false there; the leaves' in-place sums run on
// CUDA: GoldenOnCuda.AccumulatedGradientsAddIntoTheLeaves), and the in-place sums of the
// activations' gradients leave the accumulated gradients bitwise unchanged.
TEST_F(Golden, AccumulatedGradientsEqualSeparateAdds) {
  for (auto prec : {ops::Precision::f32, ops::Precision::bf16}) {
    SCOPED_TRACE(prec == ops::Precision::f32 ? "f32" : "bf16");
    int64_t extra_a = -1, extra_b = -1;
    const auto a = accumulated_grads(Device::cpu(), prec, false, extra_a);
    const auto b = accumulated_grads(Device::cpu(), prec, true, extra_b);
    EXPECT_EQ(extra_a, 0);
    EXPECT_EQ(extra_b, 0);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "parameter " << i;
  }
}

// ce_chunk 0 leaves the rows per cross-entropy chunk to the backend (CPU: 1024); a set value
// is used as given.
TEST(ModelOptions, CrossEntropyChunkIsTheBackendsUnlessSet) {
  text::LlamaModel m(golden::golden_config(), 1);
  EXPECT_EQ(m.options().ce_chunk, 0);
  EXPECT_EQ(m.ce_chunk_rows(Device::cpu()), 1024);
  m.options().ce_chunk = 48;
  EXPECT_EQ(m.ce_chunk_rows(Device::cpu()), 48);
}

TEST(ModelConfig, FlavoursHaveThePapersShapes) {
  auto c = text::llama3_flavour("8B");
  EXPECT_EQ(c.dim, 4096);
  EXPECT_EQ(c.n_layers, 32);
  EXPECT_EQ(c.n_heads, 32);
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_EQ(c.ffn_hidden(), 14336);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(text::llama3_flavour("70B").ffn_hidden(), 28672);
  EXPECT_EQ(text::llama3_flavour("405B").ffn_hidden(), 53248);
  EXPECT_EQ(text::llama3_flavour("405B").n_layers, 126);
  EXPECT_NEAR(double(c.num_params()) / 1e9, 8.03, 0.01);
}

TEST(ModelConfig, RejectsIndivisibleHeadsWithTheNumbers) {
  auto c = text::llama3_flavour("tiny");
  c.dim = 250;
  try {
    c.validate();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dim 250 is not divisible by n_heads 8"), std::string::npos) << e.what();
  }
  c = text::llama3_flavour("tiny");
  c.n_kv_heads = 3;
  try {
    c.validate();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("n_heads 8 is not divisible by n_kv_heads 3"), std::string::npos) << e.what();
  }
}

TEST(ModelConfig, HfJsonRoundTripsAndNamesTheSource) {
  auto c = text::llama3_flavour("tiny");
  auto back = text::LlamaConfig::from_hf_json(c.to_hf_json());
  EXPECT_EQ(back.ffn_hidden(), c.ffn_hidden());
  EXPECT_EQ(back.n_kv_heads, c.n_kv_heads);
  auto j = c.to_hf_json();
  j.erase("hidden_size");
  try {
    text::LlamaConfig::from_hf_json(j, "run/config.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("run/config.json: missing field 'hidden_size'"), std::string::npos);
  }
}

TEST(Model, ParameterNamesAreHfNames) {
  text::LlamaModel m(text::llama3_flavour("debug"), 0);
  auto ps = m.named_parameters();
  EXPECT_EQ(ps.front().name, "model.embed_tokens.weight");
  EXPECT_EQ(ps[1].name, "model.layers.0.input_layernorm.weight");
  EXPECT_EQ(ps[2].name, "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(ps.back().name, "lm_head.weight");
  EXPECT_EQ(m.num_parameters(), m.config().num_params());
}
