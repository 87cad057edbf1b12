// Helpers of the emulated-kernel tests (tests/unit/cuda_emu): bf16-exact random inputs on the
// host (the emulated device's memory) and the normalised error of the GPU parity suite.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "runtime/core/tensor.h"
#include "runtime/cuda/emu/simt.h"

namespace llama3::emu_test {

// Normal values, rounded to bf16 first so bf16 and f32 copies hold the same numbers.
inline Tensor randn(const Shape& s, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(size_t(shape_numel(s)));
  for (auto& x : v) x = bf16_bits_to_f32(f32_to_bf16_bits(d(g)));
  return Tensor::from_vector(v, s);
}

// ||got - want|| / ||want|| over all elements (infinite if got has a non-finite value).
inline double rel_err(const Tensor& got, const Tensor& want) {
  const std::vector<float> a = got.to(DType::f32).to_vector<float>();
  const std::vector<float> b = want.to(DType::f32).to_vector<float>();
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

// Runs body() once with the emulator's forward schedule and once with the reverse one (a
// kernel that depends on the order has a race; simt.h), restoring forward after.
template <typename F>
void each_schedule(F&& body) {
  struct Restore {
    ~Restore() { emu::set_schedule(emu::Schedule::forward); }
  } restore;
  for (emu::Schedule s : {emu::Schedule::forward, emu::Schedule::reverse}) {
    SCOPED_TRACE(s == emu::Schedule::forward ? "forward schedule" : "reverse schedule");
    emu::set_schedule(s);
    body();
  }
}

}  // namespace llama3::emu_test
