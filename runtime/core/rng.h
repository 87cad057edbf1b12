// Counter-based random numbers: the whole state is (seed, counter), so it is trivially
// saved in checkpoints and restored for an exact resume, and streams for different
// purposes (init, data, sampling) are independent by seed.
#pragma once

#include <cmath>
#include <cstdint>

namespace llama3 {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0, uint64_t counter = 0) : seed_(seed), counter_(counter) {}
  uint64_t seed() const { return seed_; }
  uint64_t counter() const { return counter_; }

  uint64_t next_u64() { return mix(seed_ * 0x9E3779B97F4A7C15ull + (counter_++) * 0xD1B54A32D192ED03ull); }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }
  // Standard normal (Box-Muller; one value per call for a simple state).
  double normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  uint64_t below(uint64_t n) { return n ? next_u64() % n : 0; }

 private:
  static uint64_t mix(uint64_t z) {  // splitmix64 finaliser
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t seed_, counter_;
};

}  // namespace llama3
