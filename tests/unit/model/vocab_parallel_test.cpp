// The vocabulary-parallel cross-entropy chunked over rows must equal its unchunked form and
// the model's own fused cross-entropy (ops::linear_cross_entropy): loss and the gradients of
// h and of the head, on a single-rank group (the tp-split arithmetic is covered by the
// multi-rank equivalence tests), with ignored targets and a last chunk shorter than the rest.
#include "text/model/vocab_parallel.h"

#include <gtest/gtest.h>

#include <cmath>

#include "runtime/core/rng.h"
#include "runtime/dist/communicator.h"
#include "runtime/ops/ops.h"

using namespace llama3;

namespace {
double rel_err(const Tensor& a, const Tensor& b) {
  auto x = a.to_vector<float>(), y = b.to_vector<float>();
  EXPECT_EQ(x.size(), y.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num = std::max(num, std::abs(double(x[i]) - double(y[i])));
    den = std::max(den, std::abs(double(y[i])));
  }
  return num / std::max(den, 1e-30);
}

struct Result {
  Tensor loss, dh, dw;
};

template <class F>
Result run(const std::vector<float>& hv, const std::vector<float>& wv, int64_t N, int64_t V,
           int64_t D, F loss_fn) {
  Tensor h = Tensor::from_vector(hv, {N, D}), w = Tensor::from_vector(wv, {V, D});
  h.set_requires_grad(true);
  w.set_requires_grad(true);
  Tensor l = loss_fn(h, w);
  l.backward();
  return {l.detach(), h.grad(), w.grad()};
}
// Random h (N, D) and w (V, D) values and targets, every fifth ignored (-1).
Tensor problem(int64_t N, int64_t V, int64_t D, uint64_t seed, std::vector<float>& hv,
               std::vector<float>& wv) {
  Rng rng(seed);
  hv.assign(size_t(N * D), 0.f), wv.assign(size_t(V * D), 0.f);
  for (auto& x : hv) x = float(rng.normal());
  for (auto& x : wv) x = float(rng.normal()) * 0.5f;
  std::vector<int32_t> tv(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) tv[size_t(i)] = i % 5 == 3 ? -1 : int32_t(rng.below(uint64_t(V)));
  return Tensor::from_vector(tv, {N});
}
}  // namespace

TEST(VocabParallel, ChunkedCrossEntropyEqualsUnchunkedAndFused) {
  const int64_t N = 23, V = 37, D = 16;
  std::vector<float> hv, wv;
  const Tensor targets = problem(N, V, D, 7, hv, wv);
  auto tp = dist::single_rank_communicator("tp");

  const Result whole = run(hv, wv, N, V, D, [&](const Tensor& h, const Tensor& w) {
    return text::vocab_parallel_cross_entropy(h, w, targets, *tp, 0);
  });
  ops::CrossEntropyOptions o;
  const Result fused = run(hv, wv, N, V, D, [&](const Tensor& h, const Tensor& w) {
    return ops::linear_cross_entropy(h, w, targets, o);
  });
  EXPECT_LT(rel_err(whole.loss, fused.loss), 1e-6);
  EXPECT_LT(rel_err(whole.dh, fused.dh), 1e-5);
  EXPECT_LT(rel_err(whole.dw, fused.dw), 1e-5);
  for (int64_t chunk : {1, 5, 8, 22, 23, 100}) {
    const Result c = run(hv, wv, N, V, D, [&](const Tensor& h, const Tensor& w) {
      return text::vocab_parallel_cross_entropy(h, w, targets, *tp, chunk);
    });
    SCOPED_TRACE(chunk);
    // Rows are independent: the loss and dh are the same per row; dW sums the chunks' parts.
    EXPECT_LT(rel_err(c.loss, whole.loss), 1e-7);
    EXPECT_LT(rel_err(c.dh, whole.dh), 1e-6);
    EXPECT_LT(rel_err(c.dw, whole.dw), 1e-5);
  }
}

// Mixed precision: the bf16 path must be the single-process bf16 cross-entropy (bf16 GEMM
// operands, f32 accumulation), chunked or not, and measurably not the f32 one (so the
// comparison would notice a path that silently stayed f32).
TEST(VocabParallel, Bf16CrossEntropyEqualsFusedBf16) {
  const int64_t N = 23, V = 37, D = 64;
  std::vector<float> hv, wv;
  const Tensor targets = problem(N, V, D, 11, hv, wv);
  auto tp = dist::single_rank_communicator("tp");

  ops::CrossEntropyOptions o32, o16;
  o16.precision = ops::Precision::bf16;
  const Result fused16 = run(hv, wv, N, V, D, [&](const Tensor& h, const Tensor& w) {
    return ops::linear_cross_entropy(h, w, targets, o16);
  });
  const Result fused32 = run(hv, wv, N, V, D, [&](const Tensor& h, const Tensor& w) {
    return ops::linear_cross_entropy(h, w, targets, o32);
  });
  for (int64_t chunk : {0, 5, 23}) {
    SCOPED_TRACE(chunk);
    const Result vp = run(hv, wv, N, V, D, [&](const Tensor& h, const Tensor& w) {
      return text::vocab_parallel_cross_entropy(h, w, targets, *tp, chunk, ops::Precision::bf16);
    });
    EXPECT_EQ(vp.dh.dtype(), DType::f32);
    EXPECT_EQ(vp.dw.dtype(), DType::f32);
    // Same bf16 operands, f32 GEMM accumulation and bf16 dlogits: only the softmax
    // arithmetic (the fused kernel's fast exp in f32, here exp in f64 with the sum
    // all-reduced) separates the two. Measured on this CPU: loss and dh bit-identical, dW
    // 9e-8 apart with 5-row chunks.
    EXPECT_LT(rel_err(vp.loss, fused16.loss), 1e-6);
    EXPECT_LT(rel_err(vp.dh, fused16.dh), 1e-6);
    EXPECT_LT(rel_err(vp.dw, fused16.dw), 1e-6);
    // The bf16 rounding of the operands moves the loss by 5.7e-4 relative here: the f32
    // path is far outside the bound above.
    EXPECT_GT(rel_err(vp.loss, fused32.loss), 1e-4);
  }
}
