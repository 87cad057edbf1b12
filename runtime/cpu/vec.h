// Small vectorisable helpers shared by the CPU kernels (compiled with -march=native; the
// loops are written so the compiler emits AVX-512 code).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

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
inline double fast_exp(double x) { return std::exp(x); }

}  // namespace llama3::cpu
