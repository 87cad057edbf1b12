// A register-blocked GEMM for the small tiles inside fused CPU kernels (attention):
// C (m x n) = or += A (m x k) B (k x n), all row-major with leading dimensions. oneDNN is
// used for the model's large GEMMs; for 64x64 tiles its per-call overhead would dominate.
// The f32 path uses AVX-512 (4 rows x 64 columns of accumulators); other types and CPUs
// use a plain loop.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace llama3::cpu {

enum class Accumulate : bool { no, yes };

template <typename T>
inline void small_gemm(Accumulate acc, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                       const T* b, int64_t ldb, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* cr = c + i * ldc;
    if (acc == Accumulate::no)
      for (int64_t j = 0; j < n; ++j) cr[j] = T(0);
    for (int64_t p = 0; p < k; ++p) {
      const T av = a[i * lda + p];
      const T* br = b + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) cr[j] += av * br[j];
    }
  }
}

#if defined(__AVX512F__)
namespace detail {

template <int R>
inline void block(Accumulate acc, int64_t n0, int64_t ncols, int64_t k, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float* c, int64_t ldc) {
  __mmask16 mk[4];
  for (int q = 0; q < 4; ++q) {
    int64_t left = ncols - 16 * q;
    mk[q] = left >= 16 ? __mmask16(0xFFFF) : (left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1));
  }
  __m512 s[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q)
      s[r][q] = acc == Accumulate::yes ? _mm512_maskz_loadu_ps(mk[q], c + r * ldc + n0 + 16 * q)
                                       : _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const float* br = b + p * ldb + n0;
    __m512 bv[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) bv[q] = _mm512_maskz_loadu_ps(mk[q], br + 16 * q);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + p]);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) s[r][q] = _mm512_fmadd_ps(av, bv[q], s[r][q]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(c + r * ldc + n0 + 16 * q, mk[q], s[r][q]);
}

}  // namespace detail

template <>
inline void small_gemm<float>(Accumulate acc, int64_t m, int64_t n, int64_t k, const float* a,
                              int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < n; n0 += 64) {
    const int64_t nc = n - n0 < 64 ? n - n0 : 64;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) detail::block<4>(acc, n0, nc, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
    switch (m - i) {
      case 3: detail::block<3>(acc, n0, nc, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc); break;
      case 2: detail::block<2>(acc, n0, nc, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc); break;
      case 1: detail::block<1>(acc, n0, nc, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc); break;
      default: break;
    }
  }
}
#endif

}  // namespace llama3::cpu
