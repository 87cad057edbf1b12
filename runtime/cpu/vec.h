// Small vectorisable helpers shared by the CPU kernels (compiled with -march=native; the
// loops are written so the compiler emits AVX-512 code).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace llama3::cpu {

// exp(x) in f32 to about 2 ulp over [-87, 88]: 2^(x log2 e) split into an integer power
// (built in the exponent bits) and a degree-6 polynomial for the fraction. Branch-free so
// that loops over it vectorise; std::exp does not, and attention/cross-entropy need
// hundreds of millions of exponentials per step.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float t = x * 1.4426950408889634f;
  float fi = std::floor(t);
  float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  // std::bit_cast, not memcpy: GCC 12 does not vectorise a loop through the memcpy.
  const float scale = std::bit_cast<float>((int32_t(fi) + 127) << 23);
  return p * scale;
}
inline double fast_exp(double x) {
  return std::exp(x);
}

#if defined(__AVX512F__)
// GCC 12's own headers trip -Wmaybe-uninitialized inside the 512-bit shuffle intrinsics
// (their unused mask operand); the values are defined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The sums of 16 vectors at once, v_j's sum in element j of the result: a tree of unpacks
// and 128-bit shuffles, 45 instructions where 16 separate horizontal sums take ~130 (in the
// GEMM kernels at k = 768 those were a third of a 4x4 block's time).
inline __m512 reduce16(__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4, __m512 v5, __m512 v6,
                       __m512 v7, __m512 v8, __m512 v9, __m512 v10, __m512 v11, __m512 v12,
                       __m512 v13, __m512 v14, __m512 v15) {
  // Pairs: per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3].
  auto pair = [](__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  };
  // Quads: per 128-bit lane [a, b, c, d] partial sums of that lane.
  auto quad = [](__m512 u, __m512 w) {
    const __m512d ud = _mm512_castps_pd(u), wd = _mm512_castps_pd(w);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ud, wd)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(ud, wd)));
  };
  // Lanes: [a.l0 + a.l1, a.l2 + a.l3, b.l0 + b.l1, b.l2 + b.l3].
  auto lanes = [](__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  };
  const __m512 z0 = quad(pair(v0, v1), pair(v2, v3)), z1 = quad(pair(v4, v5), pair(v6, v7)),
               z2 = quad(pair(v8, v9), pair(v10, v11)), z3 = quad(pair(v12, v13), pair(v14, v15));
  return lanes(lanes(z0, z1), lanes(z2, z3));
}

// The sums of 8 vectors: v_j's sum in element j of the result (elements 8-15 undefined).
inline __m512 reduce8(__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4, __m512 v5, __m512 v6,
                      __m512 v7) {
  const __m512 z = _mm512_setzero_ps();
  return reduce16(v0, v1, v2, v3, v4, v5, v6, v7, z, z, z, z, z, z, z, z);
}
inline __m512 reduce16(const __m512* v) {
  return reduce16(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12],
                  v[13], v[14], v[15]);
}
#pragma GCC diagnostic pop
#endif

}  // namespace llama3::cpu
