// A register-blocked GEMM for the small tiles inside fused CPU kernels (attention):
// C (m x n) = or += A (m x k) B (k x n), all row-major with leading dimensions. oneDNN is
// used for the model's large GEMMs; for 64x64 tiles its per-call overhead would dominate.
// The f32 path uses AVX-512 (4 rows x 64 columns of accumulators); other types and CPUs
// use a plain loop. small_gemm_bf16 is the AVX512-BF16 variant (vdpbf16ps: two products per
// f32 lane and instruction) for the bf16-compute attention: A is row-major bf16, B is packed
// in pairs of k ("VNNI" layout, see pack_vnni_*), C is f32.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace llama3::cpu {

enum class Accumulate : bool { no, yes };

// A addressed with strides: A(r, p) = a[r * a_rs + p * a_ps] (row-major: a_rs = lda, a_ps = 1;
// a transposed operand: a_rs = 1, a_ps = its leading dim), so no tile is ever transposed.
template <typename T>
inline void small_gemm_strided(Accumulate acc, int64_t m, int64_t n, int64_t k, const T* a, int64_t a_rs,
                               int64_t a_ps, const T* b, int64_t ldb, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* cr = c + i * ldc;
    if (acc == Accumulate::no)
      for (int64_t j = 0; j < n; ++j) cr[j] = T(0);
    for (int64_t p = 0; p < k; ++p) {
      const T av = a[i * a_rs + p * a_ps];
      const T* br = b + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) cr[j] += av * br[j];
    }
  }
}

#if defined(__AVX512F__)
namespace detail {

// Calls f.template operator()<R>(i, n0, ncols) over C in 64-column panels, 4 rows at a time
// (R = 1..3 for the last rows): the blocking both micro-kernels share.
template <typename F>
inline void for_blocks(int64_t m, int64_t n, F&& f) {
  for (int64_t n0 = 0; n0 < n; n0 += 64) {
    const int64_t nc = n - n0 < 64 ? n - n0 : 64;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) f.template operator()<4>(i, n0, nc);
    switch (m - i) {
      case 3: f.template operator()<3>(i, n0, nc); break;
      case 2: f.template operator()<2>(i, n0, nc); break;
      case 1: f.template operator()<1>(i, n0, nc); break;
      default: break;
    }
  }
}

template <int R>
inline void block(Accumulate acc, int64_t n0, int64_t ncols, int64_t k, const float* a, int64_t a_rs,
                  int64_t a_ps, const float* b, int64_t ldb, float* c, int64_t ldc) {
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
    for (int q = 0; q < 4; ++q) {
      bv[q] = _mm512_maskz_loadu_ps(mk[q], br + 16 * q);
      // Keep B in registers: GCC otherwise folds the load into every row's FMA, and the
      // repeated loads (R x 4 per k step instead of 4) cap the kernel at ~60% of oneDNN.
      asm("" : "+v"(bv[q]));
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * a_rs + p * a_ps]);
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
inline void small_gemm_strided<float>(Accumulate acc, int64_t m, int64_t n, int64_t k, const float* a,
                                      int64_t a_rs, int64_t a_ps, const float* b, int64_t ldb, float* c,
                                      int64_t ldc) {
  detail::for_blocks(m, n, [&]<int R>(int64_t i, int64_t n0, int64_t nc) {
    detail::block<R>(acc, n0, nc, k, a + i * a_rs, a_rs, a_ps, b, ldb, c + i * ldc, ldc);
  });
}
#endif

// C (m x n) = or += A (m x k, row-major, lda) B (k x n, row-major, ldb).
template <typename T>
inline void small_gemm(Accumulate acc, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                       const T* b, int64_t ldb, T* c, int64_t ldc) {
  small_gemm_strided(acc, m, n, k, a, lda, int64_t(1), b, ldb, c, ldc);
}

#if defined(__AVX512BF16__)
// bf16 bits of an f32, rounded to nearest even (the values here are finite).
inline uint16_t to_bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// dst[0..n) = bf16(src[0..n) * scale).
inline void to_bf16_row(const float* src, int64_t n, float scale, uint16_t* dst) {
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + j), sc)));
  for (; j < n; ++j) dst[j] = to_bf16_bits(src[j] * scale);
}

// The VNNI layout of a (k x n) operand B: element (p, j) at [(p / 2) * ldb + j] * 2 + p % 2,
// i.e. rows of 32-bit pairs (B[2i][j], B[2i+1][j]). ldb (pairs per row) is n rounded up to a
// multiple of 64 and odd k is padded with a zero row, so the kernel never reads past a row.
inline int64_t vnni_ld(int64_t n) { return (n + 63) / 64 * 64; }

// B = src (k x n, row-major, leading dim ld). Missing rows/columns are zero. Read with
// a_pair_stride = ldb and a_row_stride = 1, the same packing is the bf16 transpose of src as
// an A operand (row j of src^T holds the pairs (src[2i][j], src[2i+1][j])).
inline void pack_vnni_rows(const float* src, int64_t ld, int64_t k, int64_t n, int64_t kpad,
                           uint16_t* dst) {
  const int64_t ldb = vnni_ld(n);
  for (int64_t p2 = 0; p2 < kpad / 2; ++p2) {
    uint32_t* d = reinterpret_cast<uint32_t*>(dst) + p2 * ldb;
    const float* r0 = 2 * p2 < k ? src + 2 * p2 * ld : nullptr;
    const float* r1 = 2 * p2 + 1 < k ? src + (2 * p2 + 1) * ld : nullptr;
    int64_t j = 0;
    for (; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      const __m512 x0 = r0 ? _mm512_maskz_loadu_ps(m, r0 + j) : _mm512_setzero_ps();
      const __m512 x1 = r1 ? _mm512_maskz_loadu_ps(m, r1 + j) : _mm512_setzero_ps();
      // (The maskz forms: GCC 12 warns about the unmasked ones' undefined pass-through.)
      const __m512i lo = _mm512_maskz_cvtepu16_epi32(0xFFFF, (__m256i)_mm512_cvtneps_pbh(x0));
      const __m512i hi = _mm512_maskz_cvtepu16_epi32(0xFFFF, (__m256i)_mm512_cvtneps_pbh(x1));
      _mm512_storeu_si512(d + j, _mm512_or_si512(lo, _mm512_maskz_slli_epi32(0xFFFF, hi, 16)));  // masked-off lanes are 0
    }
    for (; j < ldb; j += 16) _mm512_storeu_si512(d + j, _mm512_setzero_si512());
  }
}

// B = src^T where src is (n x k) row-major (leading dim ld): B(p, j) = src[j][p].
inline void pack_vnni_cols(const float* src, int64_t ld, int64_t k, int64_t n, int64_t kpad,
                           uint16_t* dst) {
  const int64_t ldb = vnni_ld(n);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t p2 = 0; p2 < kpad / 2; ++p2)
    for (int64_t j = n; j < ldb; ++j) d[p2 * ldb + j] = 0u;
  for (int64_t j = 0; j < n; ++j) {
    const float* r = src + j * ld;
    for (int64_t p2 = 0; p2 < kpad / 2; ++p2) {
      const uint32_t lo = 2 * p2 < k ? to_bf16_bits(r[2 * p2]) : 0u;
      const uint32_t hi = 2 * p2 + 1 < k ? to_bf16_bits(r[2 * p2 + 1]) : 0u;
      d[p2 * ldb + j] = lo | (hi << 16);
    }
  }
}

namespace detail {

template <int R>
inline void block_bf16(Accumulate acc, int64_t n0, int64_t ncols, int64_t k2, const uint32_t* a,
                       int64_t a_rs, int64_t a_ps, const uint16_t* b, int64_t ldb, float* c,
                       int64_t ldc) {
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
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(b) + n0;
  for (int64_t p2 = 0; p2 < k2; ++p2) {
    const uint32_t* br = bp + p2 * ldb;
    __m512bh bv[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) bv[q] = (__m512bh)_mm512_loadu_si512(br + 16 * q);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int32_t(a[r * a_rs + p2 * a_ps]));
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) s[r][q] = _mm512_dpbf16_ps(s[r][q], av, bv[q]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(c + r * ldc + n0 + 16 * q, mk[q], s[r][q]);
}

}  // namespace detail

// C (m x n) = or += A (m x kpad) B (kpad x n), kpad even, f32 accumulation. A is addressed
// by bf16 pairs: pair (r, p) = (A[r][2p], A[r][2p+1]) is a[r * a_rs + p * a_ps] (row-major
// bf16 with an even leading dim lda: a_rs = lda / 2, a_ps = 1; a VNNI-packed transpose:
// a_rs = 1, a_ps = its ldb). B is VNNI-packed with ldb pairs per row; b may point at a
// column offset of a wider packed operand, and is read in whole 64-column blocks, so the
// packed row must extend to the next multiple of 64. A's columns past the true k must be
// zero, or B's rows (which the packers zero).
inline void small_gemm_bf16(Accumulate acc, int64_t m, int64_t n, int64_t kpad, const uint16_t* a,
                            int64_t a_rs, int64_t a_ps, const uint16_t* b, int64_t ldb, float* c,
                            int64_t ldc) {
  const int64_t k2 = kpad / 2;
  const uint32_t* a32 = reinterpret_cast<const uint32_t*>(a);
  detail::for_blocks(m, n, [&]<int R>(int64_t i, int64_t n0, int64_t nc) {
    detail::block_bf16<R>(acc, n0, nc, k2, a32 + i * a_rs, a_rs, a_ps, b, ldb, c + i * ldc, ldc);
  });
}
#endif

}  // namespace llama3::cpu
