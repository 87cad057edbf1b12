// Parameter initialisation: normal_init's values and generator state are the serial draws'
// whatever the thread count, and SkipInitGuard gives zeros with the same state after.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "runtime/core/rng.h"
#include "runtime/nn/module.h"
#include "text/model/llama.h"

using namespace llama3;

namespace {

// The loop normal_init ran before it was parallel: one normal() per element, in order.
std::vector<float> serial_draws(int64_t n, double stddev, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = float(rng.normal() * stddev);
  return v;
}

bool same_bits(const Tensor& t, const std::vector<float>& v) {
  return t.numel() == int64_t(v.size()) &&
         std::memcmp(t.data<float>(), v.data(), v.size() * sizeof(float)) == 0;
}

TEST(Init, NormalInitEqualsTheSerialDrawsOnAnyThreadCount) {
  const int threads = omp_get_max_threads();
  // Below and above the parallel threshold (65536), and an odd size across threads.
  for (int64_t n : {int64_t(1), int64_t(1000), int64_t(65536), int64_t(200003)}) {
    for (int t : {1, 2, 3, 5}) {
      omp_set_num_threads(t);
      Rng a(42, 7), b(42, 7);
      const Tensor x = nn::normal_init({n}, 0.02, a);
      const std::vector<float> want = serial_draws(n, 0.02, b);
      EXPECT_TRUE(same_bits(x, want)) << n << " values, " << t << " threads";
      EXPECT_EQ(a.counter(), b.counter()) << n << " values, " << t << " threads";
      // The next draw continues the stream.
      EXPECT_EQ(a.normal(), b.normal());
    }
  }
  omp_set_num_threads(threads);
}

TEST(Init, SkipInitGuardGivesZerosAndAdvancesTheGenerator) {
  Rng a(9), b(9);
  {
    nn::SkipInitGuard skip;
    {
      nn::SkipInitGuard nested;
      const Tensor z = nn::normal_init({3, 100000}, 1.0, a);
      EXPECT_TRUE(same_bits(z, std::vector<float>(300000, 0.f)));
    }
    const Tensor z = nn::normal_init({7}, 1.0, a);  // still inside the outer guard
    EXPECT_TRUE(same_bits(z, std::vector<float>(7, 0.f)));
  }
  serial_draws(300007, 1.0, b);
  EXPECT_EQ(a.counter(), b.counter());
  // Out of scope: draws again, from where the skipped draws would have left the generator.
  const Tensor x = nn::normal_init({50}, 0.5, a);
  EXPECT_TRUE(same_bits(x, serial_draws(50, 0.5, b)));
}

TEST(Init, ModelsBuiltUnderTheGuardHaveTheShapesAndZeros) {
  const auto cfg = text::llama3_flavour("debug");
  text::LlamaModel drawn(cfg, 3);
  std::unique_ptr<text::LlamaModel> skipped;
  {
    nn::SkipInitGuard skip;
    skipped = std::make_unique<text::LlamaModel>(cfg, 3);
  }
  auto a = drawn.named_parameters(), b = skipped->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  int drawn_nonzero = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].tensor->shape(), b[i].tensor->shape()) << a[i].name;
    const std::vector<float> w = b[i].tensor->to_vector<float>();
    // (The norms' weights are ones either way: not drawn.)
    const std::vector<float> d = a[i].tensor->to_vector<float>();
    bool any = false;
    for (float x : d) any = any || (x != 0.f && x != 1.f);
    if (!any) continue;
    ++drawn_nonzero;
    for (float x : w) ASSERT_EQ(x, 0.f) << a[i].name;
  }
  EXPECT_GT(drawn_nonzero, 0);
}

}  // namespace
