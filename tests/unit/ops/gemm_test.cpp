// The CPU GEMMs against exact products, on both of their paths: the skinny kernels for up to
// 16 rows times a weight (decode steps; AVX-512, bf16 with AVX512-BF16) and oneDNN for
// everything else, across tails of every dimension (k not a multiple of the register width,
// n not a multiple of the 4- or 8-row blocks). bf16 x bf16 products are exact in f32, so
// the bf16 error is f32 accumulation order alone: at most k * 2^-24 * sum |a_i w_i| per
// element; f32 products add one rounding each.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "runtime/cpu/cpu_backend.h"
#include "runtime/ops/ops.h"

using namespace llama3;

namespace {

std::vector<float> bf16_values(int64_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = bf16_bits_to_f32(f32_to_bf16_bits(d(g)));  // exactly representable
  return v;
}

// ||got - ref|| / ||ref||.
double rel_diff(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    num += std::pow(double(got[i]) - ref[i], 2), den += std::pow(double(ref[i]), 2);
  return std::sqrt(num / den);
}

// got (m x n, row stride ldc) = a (m x k) w (n x k)^T within f32 accumulation error.
void expect_exact_products(const float* got, int64_t ldc, const std::vector<float>& a,
                           const std::vector<float>& w, int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double exact = 0, mag = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double t = double(a[size_t(i * k + p)]) * double(w[size_t(j * k + p)]);
        exact += t, mag += std::fabs(t);
      }
      ASSERT_NEAR(got[i * ldc + j], exact, double(k + 1) * std::ldexp(mag, -24) + 1e-30)
          << "m " << m << " n " << n << " k " << k << " at (" << i << ", " << j << ")";
    }
}

void check_linear(ops::Precision prec) {
  for (int64_t m : {1, 2, 3, 4, 5, 9, 16, 17})
    for (int64_t n : {1, 3, 7, 9, 66})
      for (int64_t k : {1, 31, 33, 96, 770}) {
        const auto a = bf16_values(m * k, uint64_t(m * 1000 + k)),
                   w = bf16_values(n * k, uint64_t(n * 7 + k));
        const DType dt = prec == ops::Precision::bf16 ? DType::bf16 : DType::f32;
        Tensor x = Tensor::from_vector(a, {m, k}).to(dt),
               wt = Tensor::from_vector(w, {n, k}).to(dt);
        const auto got = ops::linear(x, wt, prec).to_vector<float>();
        ASSERT_EQ(got.size(), size_t(m * n));
        expect_exact_products(got.data(), n, a, w, m, n, k);
      }
}

}  // namespace

TEST(Gemm, Bf16SkinnyAndOneDnnPathsMatchExactProducts) {
  check_linear(ops::Precision::bf16);
}
TEST(Gemm, F32SkinnyAndOneDnnPathsMatchExactProducts) {
  check_linear(ops::Precision::f32);
}

// bf16 outputs (Precision::bf16 with bf16_out, the MLP's gate/up projections where the backend
// keeps bf16 activations): the forward is the f32-output product rounded once to bf16, a
// bf16 activation gets a bf16 gradient, and the gradients of a small gate/up -> SwiGLU ->
// down MLP stay within bf16 rounding of the f32-activation path.
TEST(Gemm, Bf16OutputsRoundTheF32ResultOnceAndCarryBf16Gradients) {
  for (int64_t m : {3, 40}) {
    const int64_t k = 96, n = 70;
    Tensor x = Tensor::from_vector(bf16_values(m * k, 11), {m, k}).to(DType::bf16);
    Tensor w = Tensor::from_vector(bf16_values(n * k, 12), {n, k});
    const auto f32 = ops::linear(x, w, ops::Precision::bf16).to_vector<float>();
    Tensor y16 = ops::linear(x, w, ops::Precision::bf16, /*bf16_out=*/true);
    ASSERT_EQ(y16.dtype(), DType::bf16);
    const auto got = y16.to_vector<float>();
    ASSERT_EQ(got.size(), f32.size());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], bf16_bits_to_f32(f32_to_bf16_bits(f32[i]))) << "m " << m << " at " << i;
  }
  EXPECT_THROW(ops::linear(Tensor::zeros({2, 3}, DType::f32), Tensor::zeros({4, 3}, DType::f32),
                           ops::Precision::f32, true),
               Error);

  // MLP gradients, bf16 activations vs f32 activations (both with bf16 GEMM inputs).
  const int64_t T = 24, D = 32, F = 80;
  auto run = [&](bool act16, std::vector<std::vector<float>>& grads) {
    Tensor h = Tensor::from_vector(bf16_values(T * D, 21), {T, D}).set_requires_grad(true);
    Tensor w1 = Tensor::from_vector(bf16_values(F * D, 22), {F, D}).set_requires_grad(true);
    Tensor w3 = Tensor::from_vector(bf16_values(F * D, 23), {F, D}).set_requires_grad(true);
    Tensor w2 = Tensor::from_vector(bf16_values(D * F, 24), {D, F}).set_requires_grad(true);
    const auto p = ops::Precision::bf16;
    Tensor g = ops::linear(h, w1, p, act16), u = ops::linear(h, w3, p, act16);
    Tensor f = ops::swiglu(g, u);
    EXPECT_EQ(f.dtype(), act16 ? DType::bf16 : DType::f32);
    Tensor y = ops::linear(f, w2, p);
    ops::dot(y, Tensor::from_vector(bf16_values(T * D, 25), {T, D})).backward();
    grads.clear();
    for (Tensor* t : {&h, &w1, &w3, &w2}) {
      ASSERT_EQ(t->grad().dtype(), DType::f32);
      grads.push_back(t->grad().to_vector<float>());
    }
  };
  std::vector<std::vector<float>> ref, got;
  run(false, ref);
  run(true, got);
  for (size_t t = 0; t < ref.size(); ++t) {
    EXPECT_LT(rel_diff(got[t], ref[t]), 1e-2) << "gradient " << t;
    EXPECT_GT(rel_diff(got[t], ref[t]), 0.0) << "gradient " << t << ": bf16 rounding should show";
  }
}

// A bf16 norm output shared by two projections (the model where the backend prefers bf16
// activations): the projections return f32 gradients (f32_grad), which sum in f32 into the
// norm's backward; the gradients stay within bf16 rounding of the f32-output norm's.
TEST(Gemm, Bf16NormOutputFeedsProjectionsWithF32Gradients) {
  const int64_t T = 20, D = 48, F = 64;
  auto run = [&](bool act16, std::vector<std::vector<float>>& grads) {
    Tensor x = Tensor::from_vector(bf16_values(T * D, 31), {T, D}).set_requires_grad(true);
    Tensor nw = Tensor::from_vector(bf16_values(D, 32), {D}).set_requires_grad(true);
    Tensor wa = Tensor::from_vector(bf16_values(F * D, 33), {F, D}).set_requires_grad(true);
    Tensor wb = Tensor::from_vector(bf16_values(F * D, 34), {F, D}).set_requires_grad(true);
    const auto p = ops::Precision::bf16;
    Tensor h = ops::rmsnorm(x, nw, 1e-5f, act16);
    EXPECT_EQ(h.dtype(), act16 ? DType::bf16 : DType::f32);
    Tensor y = ops::add(ops::linear(h, wa, p, false, true), ops::linear(h, wb, p, false, true));
    ops::dot(y, Tensor::from_vector(bf16_values(T * F, 35), {T, F})).backward();
    grads.clear();
    for (Tensor* t : {&x, &nw, &wa, &wb}) {
      EXPECT_EQ(t->grad().dtype(), DType::f32);
      grads.push_back(t->grad().to_vector<float>());
    }
  };
  std::vector<std::vector<float>> ref, got;
  run(false, ref);
  run(true, got);
  for (size_t t = 0; t < ref.size(); ++t)
    EXPECT_LT(rel_diff(got[t], ref[t]), 1e-2) << "gradient " << t;
  EXPECT_THROW(
      ops::rmsnorm(Tensor::zeros({2, 4}, DType::f64), Tensor::zeros({4}, DType::f64), 1e-5f, true),
      Error);
}

// The panel-packed decode GEMM (bf16 weights packed once per generation) against exact
// products, over row counts on both sides of its 8-row groups, n not a multiple of a panel
// or a 64-column unit, odd k (the zero-padded last pair); the A row past k holds NaN, which
// must not reach the outputs, and the outputs past n must stay untouched.
TEST(Gemm, PackedBf16PanelsMatchExactProducts) {
  for (int64_t m : {1, 3, 5, 8, 13, 16, 40})
    for (int64_t n : {1, 17, 70, 130})
      for (int64_t k : {1, 7, 96, 129}) {
        const auto a = bf16_values(m * k, uint64_t(m * 1000 + k)),
                   w = bf16_values(n * k, uint64_t(n * 7 + k));
        const int64_t lda = k + 1, ldc = n + 3;
        std::vector<bf16> a16(size_t(m * lda), bf16{f32_to_bf16_bits(NAN)}), w16(size_t(n * k));
        for (int64_t i = 0; i < m; ++i)
          for (int64_t p = 0; p < k; ++p)
            a16[size_t(i * lda + p)] = bf16{f32_to_bf16_bits(a[size_t(i * k + p)])};
        for (size_t i = 0; i < w.size(); ++i) w16[i] = bf16{f32_to_bf16_bits(w[i])};
        std::vector<bf16> packed(size_t(cpu_packed_bf16_elems(n, k)));
        cpu_pack_bf16_panels(w16.data(), n, k, k, packed.data());
        std::vector<float> c(size_t(m * ldc), -7.f);
        cpu_gemm_bf16_packed(m, n, k, a16.data(), lda, packed.data(), c.data(), ldc);
        expect_exact_products(c.data(), ldc, a, w, m, n, k);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = n; j < ldc; ++j) ASSERT_EQ(c[size_t(i * ldc + j)], -7.f) << "past n";
      }
}
