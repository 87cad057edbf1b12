// The CPU GEMMs against exact products, on both of their paths: the skinny kernels for up to
// 16 rows times a weight (decode steps; AVX-512, bf16 with AVX512-BF16) and oneDNN for
// everything else, across tails of every dimension (k not a multiple of the register width,
// n not a multiple of the 4- or 8-row blocks). bf16 x bf16 products are exact in f32, so
// the bf16 error is f32 accumulation order alone: at most k * 2^-24 * sum |a_i w_i| per
// element; f32 products add one rounding each.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

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
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double exact = 0, mag = 0;
            for (int64_t p = 0; p < k; ++p) {
              const double t = double(a[size_t(i * k + p)]) * double(w[size_t(j * k + p)]);
              exact += t, mag += std::fabs(t);
            }
            ASSERT_NEAR(got[size_t(i * n + j)], exact, double(k + 1) * std::ldexp(mag, -24) + 1e-30)
                << "m " << m << " n " << n << " k " << k << " at (" << i << ", " << j << ")";
          }
      }
}

}  // namespace

TEST(Gemm, Bf16SkinnyAndOneDnnPathsMatchExactProducts) {
  check_linear(ops::Precision::bf16);
}
TEST(Gemm, F32SkinnyAndOneDnnPathsMatchExactProducts) {
  check_linear(ops::Precision::f32);
}
