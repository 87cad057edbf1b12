// The vocabulary-parallel cross-entropy chunked over rows must equal its unchunked form and
// the model's own fused cross-entropy (ops::linear_cross_entropy): loss and the gradients of
// h and of the head, on a single-rank group (the tp-split arithmetic is covered by the
// multi-rank equivalence tests), with ignored targets and a last chunk shorter than the rest.
#include "text/model/vocab_parallel.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "runtime/backend/backend.h"
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
    // Same bf16 operands, f32 GEMM accumulation and bf16 dlogits: only the order of the
    // softmax arithmetic (one fused row kernel, here the Backend::vocab_* kernels with the
    // statistics all-reduced between them) and of the dW accumulation over chunks separates
    // the two.
    EXPECT_LT(rel_err(vp.loss, fused16.loss), 1e-6);
    EXPECT_LT(rel_err(vp.dh, fused16.dh), 1e-6);
    EXPECT_LT(rel_err(vp.dw, fused16.dw), 1e-6);
    // The bf16 rounding of the operands moves the loss by 5.7e-4 relative here: the f32
    // path is far outside the bound above.
    EXPECT_GT(rel_err(vp.loss, fused32.loss), 1e-4);
  }
}

// The Backend::vocab_* kernels on the CPU against an f64 log-softmax: logits (C, V) split into
// two vocabulary shards, their statistics combined as the all-reduces do (max of the shard
// maxima, sum of the shard sums and target logits), must give every row's cross-entropy and
// each shard's dlogits = scale * (softmax - onehot) of the whole row; rows with target -1
// give 0 (and valid 0). f32 with the fast exponential: within 1e-5 relative.
TEST(VocabParallel, ShardKernelsMatchF64Softmax) {
  const int64_t C = 9, V = 70, half = 33;  // shards of 33 and 37 columns
  Rng rng(5);
  std::vector<float> lv(size_t(C * V));
  for (auto& x : lv) x = float(rng.normal()) * 4.f;
  std::vector<int32_t> tv(static_cast<size_t>(C));
  for (int64_t i = 0; i < C; ++i) tv[size_t(i)] = i % 4 == 2 ? -1 : int32_t((i * 29 + 3) % V);
  const Tensor logits = Tensor::from_vector(lv, {C, V}), tg = Tensor::from_vector(tv, {C});
  Backend& be = backend_for(Device::cpu());
  const float scale = 0.3f;
  // The shards' columns [v0, v0 + w).
  const int64_t v0s[2] = {0, half}, ws[2] = {half, V - half};
  Tensor shard[2], mx[2], se[2], tl[2];
  for (int r = 0; r < 2; ++r) {
    shard[r] = logits.narrow(1, v0s[r], ws[r]).contiguous();
    mx[r] = Tensor::empty({C}, DType::f32), se[r] = Tensor::empty({C}, DType::f32),
    tl[r] = Tensor::empty({C}, DType::f32);
    be.vocab_shard_max(shard[r], mx[r]);
  }
  std::vector<float> m0 = mx[0].to_vector<float>(), m1 = mx[1].to_vector<float>(),
                     gm(static_cast<size_t>(C));
  for (int64_t i = 0; i < C; ++i) gm[size_t(i)] = std::max(m0[size_t(i)], m1[size_t(i)]);
  const Tensor gmax = Tensor::from_vector(gm, {C});
  for (int r = 0; r < 2; ++r) be.vocab_shard_stats(shard[r], gmax, tg, v0s[r], se[r], tl[r]);
  Tensor sum = se[0].clone(), tsum = tl[0].clone();
  be.axpy(1.f, se[1], sum);
  be.axpy(1.f, tl[1], tsum);
  Tensor loss = Tensor::empty({C}, DType::f32), valid = Tensor::empty({C}, DType::f32);
  be.vocab_row_loss(gmax, sum, tsum, tg, loss, valid);
  Tensor dl[2];
  for (int r = 0; r < 2; ++r) {
    dl[r] = shard[r].clone();
    be.vocab_shard_dlogits(dl[r], gmax, sum, tg, v0s[r], scale);
  }
  const std::vector<float> lo = loss.to_vector<float>(), va = valid.to_vector<float>();
  const std::vector<float> d0 = dl[0].to_vector<float>(), d1 = dl[1].to_vector<float>();
  double max_err = 0, max_ref = 0;
  for (int64_t i = 0; i < C; ++i) {
    const float* row = lv.data() + i * V;
    double m = row[0], s = 0;
    for (int64_t j = 0; j < V; ++j) m = std::max(m, double(row[j]));
    for (int64_t j = 0; j < V; ++j) s += std::exp(double(row[j]) - m);
    const bool ok = tv[size_t(i)] >= 0;
    const double ref_loss = ok ? std::log(s) + m - row[tv[size_t(i)]] : 0.0;
    EXPECT_EQ(va[size_t(i)], ok ? 1.f : 0.f) << "row " << i;
    EXPECT_NEAR(lo[size_t(i)], ref_loss, 1e-5 * std::max(1.0, std::abs(ref_loss))) << "row " << i;
    for (int64_t j = 0; j < V; ++j) {
      const double ref =
          ok ? scale * (std::exp(double(row[j]) - m) / s - (j == tv[size_t(i)] ? 1.0 : 0.0)) : 0.0;
      const double got =
          j < half ? d0[size_t(i * half + j)] : d1[size_t(i * (V - half) + j - half)];
      max_err = std::max(max_err, std::abs(got - ref));
      max_ref = std::max(max_ref, std::abs(ref));
    }
  }
  EXPECT_LT(max_err / max_ref, 1e-5);
  // A row without a target is all zeros in dlogits.
  for (int64_t j = 0; j < half; ++j) EXPECT_EQ(d0[size_t(2 * half + j)], 0.f);
}
