// The golden test on CUDA (issue 7): the model on cuda:0 against the same PyTorch reference as
// the CPU (tests/reference/llama_ref.py, f32 on the CPU) - logits, loss, every parameter
// gradient and the first five AdamW losses - in f32 within the CPU's bounds, and in bf16
// mixed precision (bf16 GEMM inputs, tensor-core attention, bf16 activations) within bf16's
// 1e-2. Skips without a CUDA device; runs on the emulated device in unit_cuda_emu
// (tests/unit/cuda_emu/golden_emu.cpp) and on a GPU in gpu-check.sh.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "runtime/cuda/cuda_backend.h"
#include "runtime/optim/adamw.h"
#include "tests/unit/model/golden.h"
#include "text/model/llama.h"

using namespace llama3;

namespace {

struct GoldenCudaCase {
  ops::Precision precision;
  // Bounds on the normalised error ||ours - reference|| / ||reference|| (the parity suite's
  // measure) of the logits and of each gradient, on the relative error of the loss, and on
  // that of each of the five training losses. In bf16 the five AdamW steps (lr 1e-2 on one
  // batch) compound the roundings of every step: the fifth loss was 6.9e-3 off on the
  // emulated device and 1.06e-2 on an H200 (2026-11-28) while the first four, the logits
  // and the gradients held 1e-2; its bound is twice the single-pass one.
  double logits, grads, loss, train_loss;
};

class GoldenOnCuda : public golden::Golden, public ::testing::WithParamInterface<GoldenCudaCase> {};

TEST_P(GoldenOnCuda, LogitsGradientsAndFirstFiveLossesMatchPyTorch) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device";
  const GoldenCudaCase c = GetParam();
  text::LlamaModel model(cfg, 11);
  ASSERT_NO_FATAL_FAILURE(run_reference(model));  // from the CPU weights
  model.to(Device::cuda(0));
  model.options().precision = c.precision;

  Tensor logits = model.logits(tokens, doc_ids);
  EXPECT_EQ(logits.device(), Device::cuda(0));
  const double logits_err = golden::norm_err(
      logits.to(Device::cpu()).to(DType::f32).to_vector<float>(), ref["logits"].to_vector<float>());
  std::printf("logits normalised error %.2e\n", logits_err);
  EXPECT_LT(logits_err, c.logits);

  Tensor loss = model.loss(tokens, targets, doc_ids);
  EXPECT_NEAR(loss.item(), ref["loss"].item(), c.loss * std::abs(ref["loss"].item()));
  loss.backward();
  double worst = 0;
  for (auto& p : model.named_parameters()) {
    SCOPED_TRACE(p.name);
    ASSERT_TRUE(p.tensor->grad().defined());
    const double e = golden::norm_err(p.tensor->grad().to(Device::cpu()).to_vector<float>(),
                                      ref["grad." + p.name].to_vector<float>());
    worst = std::max(worst, e);
    EXPECT_LT(e, c.grads);
  }
  std::printf("largest gradient normalised error %.2e\n", worst);
  model.zero_grad();

  optim::AdamW opt(model.named_parameters(), ocfg);
  const std::vector<double> ref_losses = ref["train_losses"].to_vector<double>();
  for (int step = 0; step < 5; ++step) {
    Tensor l = model.loss(tokens, targets, doc_ids);
    const double got = l.item(), want = ref_losses[size_t(step)];
    std::printf("step %d loss %.6f reference %.6f relative error %.2e\n", step, got, want,
                std::abs(got - want) / std::abs(want));
    EXPECT_NEAR(got, want, c.train_loss * std::abs(want)) << "step " << step;
    l.backward();
    opt.step(ocfg.lr);
    opt.zero_grad();
  }
}

// Gradient accumulation on the device (Backend::accumulate_weight_grads_in_place): the second
// micro-batch's linear dW GEMMs (beta 1, 7 per layer), the norms' weight sums (2 per layer and
// the final one), the embedding rows and the classifier's dW add into the leaves' gradients
// instead of fresh gradients and separate adds, with the
// same gradients up to rounding: normalised
// errors about 1e-7 on the emulated device (its reference GEMM adds C in another order); on a
// GPU the atomics of the attention dQ and the embedding backward differ between any two runs,
// which bf16 roundings downstream can amplify, hence 1e-2 for bf16. Counting a micro-batch
// twice gives errors near 1.
TEST_P(GoldenOnCuda, AccumulatedGradientsAddIntoTheLeaves) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device";
  const ops::Precision prec = GetParam().precision;
  int64_t extra_a = -1, extra_b = -1;
  const auto a = accumulated_grads(Device::cuda(0), prec, false, extra_a);
  const auto b = accumulated_grads(Device::cuda(0), prec, true, extra_b);
  EXPECT_EQ(extra_a, 0);
  // the layers' weights and norms, the final norm, the table, the classifier
  EXPECT_EQ(extra_b, 9 * cfg.n_layers + 3);
  ASSERT_EQ(a.size(), b.size());
  const double bound = prec == ops::Precision::f32 ? 1e-5 : 1e-2;
  for (size_t i = 0; i < a.size(); ++i) EXPECT_LT(golden::norm_err(b[i], a[i]), bound) << i;
}

// The bf16 roundings of completed gradients (Golden::expect_bf16_copies_equal_casts) on the
// device. (T = 24: one key block, so the attention backward adds in a fixed order on a GPU.)
TEST_P(GoldenOnCuda, Bf16GradientCopiesEqualTheCasts) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device";
  expect_bf16_copies_equal_casts(Device::cuda(0), GetParam().precision);
}

// The projections' input gradients summed by the norm (ops::set_bf16_projection_grads, a
// candidate): in bf16 the q/k/v and gate/up projections write bf16 dx and the norms' backward
// adds them in f32 (two parts beyond the first at the attention norm, one at the MLP's, per
// layer), the gradients within bf16's bound of the f32 sums'; in f32 nothing changes.
TEST_P(GoldenOnCuda, Bf16ProjectionGradsSummedByTheNorm) {
  if (!cuda_init()) GTEST_SKIP() << "no CUDA device";
  const ops::Precision prec = GetParam().precision;
  int64_t off = -1, on = -1;
  ops::set_bf16_projection_grads(false);  // (whatever LLAMA3_BF16_PROJ_GRADS says)
  const auto a = one_backward(Device::cuda(0), prec, autograd::grad_parts_taken, off);
  ops::set_bf16_projection_grads(true);
  const auto b = one_backward(Device::cuda(0), prec, autograd::grad_parts_taken, on);
  ops::set_bf16_projection_grads(false);
  EXPECT_EQ(off, 0);
  EXPECT_EQ(on, prec == ops::Precision::bf16 ? 3 * cfg.n_layers : 0);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (prec == ops::Precision::f32)
      EXPECT_EQ(b[i], a[i]) << i;
    else
      EXPECT_LT(golden::norm_err(b[i], a[i]), 1e-2) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Precisions, GoldenOnCuda,
    ::testing::Values(GoldenCudaCase{ops::Precision::f32, 1e-5, 1e-4, 1e-5, 1e-5},
                      GoldenCudaCase{ops::Precision::bf16, 1e-2, 1e-2, 1e-2, 2e-2}),
    [](const auto& info) {
      return std::string(info.param.precision == ops::Precision::f32 ? "f32" : "bf16");
    });

}  // namespace
