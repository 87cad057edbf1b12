// Random f32 tensors for the op tests: standard normal values from a seeded generator, so a
// test's inputs are the same on every run.
#pragma once

#include <random>
#include <vector>

#include "runtime/core/tensor.h"

namespace llama3::optest {

inline Tensor randn(const Shape& s, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> v(shape_numel(s));
  for (auto& x : v) x = n(g);
  return Tensor::from_vector(v, s);
}

}  // namespace llama3::optest
