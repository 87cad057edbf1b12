// Every differentiable op's backward against central finite differences, in f64.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>

#include "runtime/autograd/autograd.h"
#include "runtime/ops/ops.h"

using namespace llama3;

namespace {

Tensor randn(const Shape& s, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> n(0.0, scale);
  std::vector<double> v(shape_numel(s));
  for (auto& x : v) x = n(g);
  return Tensor::from_vector(v, s);
}

// Checks d(sum(f(inputs) * r))/d(input) for every input that requires grad.
void gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
               std::vector<Tensor> inputs, double tol = 1e-6, double eps = 1e-6) {
  for (auto& t : inputs) t.zero_grad();
  Tensor out = f(inputs);
  Tensor r = randn(out.shape(), 99);
  Tensor loss = ops::dot(out, r);
  loss.backward();
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (!inputs[k].requires_grad()) continue;
    Tensor g = inputs[k].grad();
    ASSERT_TRUE(g.defined()) << "input " << k << " got no gradient";
    std::vector<double> analytic = g.to_vector<double>();
    double* p = inputs[k].data<double>();
    double max_err = 0, max_ref = 0;
    for (int64_t i = 0; i < inputs[k].numel(); ++i) {
      const double orig = p[i];
      autograd::NoGradGuard ng;
      p[i] = orig + eps;
      double lp = ops::dot(f(inputs), r).item();
      p[i] = orig - eps;
      double lm = ops::dot(f(inputs), r).item();
      p[i] = orig;
      double numeric = (lp - lm) / (2 * eps);
      max_err = std::max(max_err, std::abs(numeric - analytic[i]));
      max_ref = std::max(max_ref, std::abs(numeric));
    }
    EXPECT_LT(max_err, tol * std::max(1.0, max_ref))
        << "input " << k << ": max |numeric - analytic| = " << max_err << " (max |grad| " << max_ref
        << ")";
  }
}

Tensor param(const Shape& s, uint64_t seed, double scale = 1.0) {
  Tensor t = randn(s, seed, scale);
  t.set_requires_grad(true);
  return t;
}

}  // namespace

TEST(GradCheck, Embedding) {
  Tensor ids = Tensor::from_vector<int32_t>({1, 3, 3, 0, 4, 1}, {2, 3});
  gradcheck([&](const std::vector<Tensor>& in) { return ops::embedding(in[0], ids); },
            {param({5, 4}, 1)});
}

TEST(GradCheck, Linear) {
  gradcheck([](const std::vector<Tensor>& in) { return ops::linear(in[0], in[1]); },
            {param({2, 3, 5}, 1), param({4, 5}, 2)});
}

TEST(GradCheck, LinearResidual) {
  gradcheck([](const std::vector<Tensor>& in) { return ops::linear_residual(in[0], in[1], in[2]); },
            {param({2, 3, 5}, 1), param({4, 5}, 2), param({2, 3, 4}, 21)});
  // The residual also feeds another op: its two gradients sum.
  gradcheck(
      [](const std::vector<Tensor>& in) {
        return ops::swiglu(ops::linear_residual(in[0], in[1], in[2]), in[2]);
      },
      {param({6, 5}, 22), param({4, 5}, 23), param({6, 4}, 24)});
}

// On CPU gemm_add is the GEMM then the add: linear_residual gives the very bits of
// add(residual, linear), forward and backward, in f32 and in bf16 mixed precision.
TEST(LinearResidual, EqualsAddOfLinearBitwise) {
  for (auto prec : {ops::Precision::f32, ops::Precision::bf16}) {
    auto run = [&](bool fused) {
      Tensor x = randn({2, 7, 24}, 31).to(DType::f32), w = randn({16, 24}, 32).to(DType::f32),
             r = randn({2, 7, 16}, 33).to(DType::f32);
      for (Tensor* t : {&x, &w, &r}) t->set_requires_grad(true);
      Tensor y = fused ? ops::linear_residual(x, w, r, prec) : ops::add(r, ops::linear(x, w, prec));
      Tensor z = ops::swiglu(y, r);  // r's gradient sums two contributions
      ops::dot(z, randn(z.shape(), 34).to(DType::f32)).backward();
      return std::vector<Tensor>{y, x.grad(), w.grad(), r.grad()};
    };
    const auto a = run(true), b = run(false);
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_EQ(a[i].to_vector<float>(), b[i].to_vector<float>())
          << "tensor " << i << " (output, dx, dw, dresidual), precision " << int(prec);
  }
}

TEST(LinearResidual, RejectsAResidualOfAnotherShapeOrDtype) {
  Tensor x = randn({3, 5}, 41), w = randn({4, 5}, 42);
  try {
    ops::linear_residual(x, w, randn({3, 5}, 43));
    FAIL() << "a (3, 5) residual for a (3, 4) output was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("residual"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[3, 4]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ops::linear_residual(x, w, randn({3, 4}, 44).to(DType::f32)), std::exception);
}

TEST(GradCheck, RmsNorm) {
  gradcheck([](const std::vector<Tensor>& in) { return ops::rmsnorm(in[0], in[1], 1e-5f); },
            {param({6, 8}, 3), param({8}, 4)});
}

TEST(GradCheck, Rope) {
  Tensor inv = Tensor::from_vector<double>({1.0, 0.1, 0.01}, {3});
  Tensor pos = Tensor::from_vector<int32_t>({0, 1, 2, 7}, {4});
  gradcheck([&](const std::vector<Tensor>& in) { return ops::rope(in[0], inv, pos); },
            {param({2, 4, 3, 6}, 5)});
}

struct AttnCase {
  int64_t B, T, H, Hkv, D;
  bool causal, docs;
};

class AttentionGrad : public ::testing::TestWithParam<AttnCase> {};

TEST_P(AttentionGrad, MatchesFiniteDifferences) {
  AttnCase c = GetParam();
  AttentionParams p;
  p.causal = c.causal;
  if (c.docs) {
    std::vector<int32_t> d(c.B * c.T);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < c.T; ++t) d[b * c.T + t] = int32_t(t * (b + 2) / c.T);  // 2-3 docs
    p.doc_ids = Tensor::from_vector(d, {c.B, c.T});
  }
  gradcheck([&](const std::vector<Tensor>& in) { return ops::attention(in[0], in[1], in[2], p); },
            {param({c.B, c.T, c.H, c.D}, 6), param({c.B, c.T, c.Hkv, c.D}, 7),
             param({c.B, c.T, c.Hkv, c.D}, 8)});
}

// T=70 crosses the 64-key tile and the 32-row query tile boundaries.
INSTANTIATE_TEST_SUITE_P(Masks, AttentionGrad,
                         ::testing::Values(AttnCase{1, 5, 2, 1, 4, true, false},
                                           AttnCase{2, 6, 4, 2, 3, true, true},
                                           AttnCase{1, 7, 2, 2, 4, false, true},
                                           AttnCase{1, 5, 2, 1, 4, false, false},
                                           AttnCase{1, 70, 2, 1, 2, true, true}));

TEST(GradCheck, SwiGlu) {
  gradcheck([](const std::vector<Tensor>& in) { return ops::swiglu(in[0], in[1]); },
            {param({3, 7}, 9), param({3, 7}, 10)});
}

TEST(GradCheck, AddAndScale) {
  gradcheck([](const std::vector<Tensor>& in) { return ops::scale(ops::add(in[0], in[1]), -0.7f); },
            {param({3, 4}, 11), param({3, 4}, 12)});
}

TEST(GradCheck, Reshape) {
  gradcheck(
      [](const std::vector<Tensor>& in) {
        return ops::linear(ops::reshape(in[0], {4, 3}), in[1]);
      },
      {param({2, 6}, 13), param({2, 3}, 14)});
}

TEST(GradCheck, LinearCrossEntropyChunked) {
  Tensor targets = Tensor::from_vector<int32_t>({2, -1, 0, 6, 3, 3, 1}, {7});
  for (int64_t chunk : {1, 3, 16}) {
    ops::CrossEntropyOptions o;
    o.chunk = chunk;
    gradcheck(
        [&](const std::vector<Tensor>& in) {
          return ops::linear_cross_entropy(in[0], in[1], targets, o);
        },
        {param({7, 5}, 15), param({8, 5}, 16)});
  }
}

TEST(GradCheck, CheckpointRecomputesBlock) {
  Tensor w = param({4, 4}, 17);
  auto block = [&](const std::vector<Tensor>& in) {
    return ops::add(in[0], ops::swiglu(ops::linear(in[0], w), ops::linear(in[0], w)));
  };
  gradcheck([&](const std::vector<Tensor>& in) { return autograd::checkpoint(block, {in[0]}); },
            {param({3, 4}, 18), w});
}

TEST(CrossEntropy, IgnoresNegativeTargetsAndMatchesDirectSoftmax) {
  Tensor h = randn({3, 4}, 20), w = randn({5, 4}, 21);
  Tensor t = Tensor::from_vector<int32_t>({1, -1, 4}, {3});
  double loss = ops::linear_cross_entropy(h, w, t).item();
  auto hv = h.to_vector<double>(), wv = w.to_vector<double>();
  double ref = 0;
  for (int i : {0, 2}) {
    std::vector<double> l(5);
    for (int v = 0; v < 5; ++v)
      for (int d = 0; d < 4; ++d) l[v] += hv[i * 4 + d] * wv[v * 4 + d];
    double mx = *std::max_element(l.begin(), l.end()), s = 0;
    for (double x : l) s += std::exp(x - mx);
    ref += mx + std::log(s) - l[i == 0 ? 1 : 4];
  }
  EXPECT_NEAR(loss, ref / 2, 1e-12);
}

// The backend writes dw (=) over every chunk: what the buffer held before must not leak into
// it (the first chunk's dW GEMM runs with beta 0), and a chunked dw equals the one-chunk dw.
TEST(CrossEntropy, BackendOverwritesDwWhateverItHeld) {
  Tensor h = randn({7, 4}, 22), w = randn({5, 4}, 23);
  Tensor t = Tensor::from_vector<int32_t>({1, -1, 4, 0, 2, 3, 1}, {7});
  Backend& be = backend_for(h.device());
  auto run = [&](double fill, int64_t chunk) {
    Tensor dh = Tensor::empty({7, 4}, DType::f64, h.device());
    Tensor dw = Tensor::full({5, 4}, fill, DType::f64, h.device());
    be.linear_cross_entropy(h, w, t, chunk, 0.5f, &dh, &dw);
    return dw.to_vector<double>();
  };
  const auto ref = run(0.0, 7);
  for (auto [fill, chunk] : {std::pair{123.0, int64_t(7)}, {-9.5, int64_t(2)}, {0.0, int64_t(3)}}) {
    const auto got = run(fill, chunk);
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i)
      EXPECT_NEAR(got[i], ref[i], 1e-12) << "fill " << fill << " chunk " << chunk << " at " << i;
  }
  double norm = 0;
  for (double x : ref) norm += x * x;
  EXPECT_GT(norm, 1e-6);  // a real gradient, not zeros
}

// Queries at explicit key positions (KV-cache decoding, context-parallel chunks): the
// backward against finite differences, and the forward equal to the matching rows of the
// full attention.
TEST(GradCheck, AttentionWithQueryPositions) {
  const int64_t B = 2, Tk = 9, H = 2, Hkv = 1, D = 4;
  std::vector<int32_t> docs(B * Tk);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tk; ++t) docs[b * Tk + t] = int32_t(t >= 4 + b);
  AttentionParams p;
  p.doc_ids = Tensor::from_vector(docs, {B, Tk});
  p.q_pos =
      Tensor::from_vector<int32_t>({1, 2, 7, 8}, {4});  // two chunks, as in context parallelism
  gradcheck([&](const std::vector<Tensor>& in) { return ops::attention(in[0], in[1], in[2], p); },
            {param({B, 4, H, D}, 30), param({B, Tk, Hkv, D}, 31), param({B, Tk, Hkv, D}, 32)});
}

TEST(Attention, QueryPositionsMatchRowsOfTheFullAttention) {
  const int64_t B = 1, T = 70, H = 4, Hkv = 2, D = 8;
  Tensor q = randn({B, T, H, D}, 40), k = randn({B, T, Hkv, D}, 41), v = randn({B, T, Hkv, D}, 42);
  std::vector<int32_t> docs(T);
  for (int64_t t = 0; t < T; ++t) docs[t] = int32_t(t / 30);
  AttentionParams full;
  full.doc_ids = Tensor::from_vector(docs, {B, T});
  std::vector<double> ref = ops::attention(q, k, v, full).to_vector<double>();
  for (int64_t start : {0, 33, 69}) {
    const int64_t n = std::min<int64_t>(5, T - start);
    std::vector<int32_t> pos(n);
    for (int64_t i = 0; i < n; ++i) pos[i] = int32_t(start + i);
    AttentionParams p = full;
    p.q_pos = Tensor::from_vector(pos, {n});
    std::vector<double> got = ops::attention(q.narrow(1, start, n), k, v, p).to_vector<double>();
    for (int64_t i = 0; i < n * H * D; ++i)
      EXPECT_NEAR(got[i], ref[start * H * D + i], 1e-12) << start;
  }
}

// Leaf gradients adopt the engine's result without a copy only when nothing else holds it:
// x + y hands the same gradient tensor to both leaves, so accumulating a second backward
// into x must leave y's gradient alone, and each must equal the sum of its contributions.
TEST(Autograd, LeafGradientsNeverAlias) {
  Tensor x = randn({3, 4}, 1), y = randn({3, 4}, 2);
  x.set_requires_grad(true), y.set_requires_grad(true);
  Tensor r = randn({3, 4}, 3);
  ops::dot(ops::add(x, y), r).backward();
  EXPECT_FALSE(x.grad().same_storage(y.grad()));
  ops::dot(ops::scale(x, 2.f), r).backward();  // x.grad += 2 r; y.grad stays r
  const std::vector<double> gx = x.grad().to_vector<double>(), gy = y.grad().to_vector<double>();
  const std::vector<double> rv = r.to_vector<double>();
  for (size_t i = 0; i < rv.size(); ++i) {
    EXPECT_DOUBLE_EQ(gx[i], 3 * rv[i]) << i;
    EXPECT_DOUBLE_EQ(gy[i], rv[i]) << i;
  }
  EXPECT_FALSE(x.grad().requires_grad());
}
