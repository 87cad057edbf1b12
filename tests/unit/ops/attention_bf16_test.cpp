// The CPU attention's bf16-compute path (AttentionParams::compute == bf16 on f32 tensors,
// AVX512-BF16 tile products) against the exact f32 path: forward output and all three
// gradients within bf16 tolerance, over causal, document-masked, GQA, odd-length, odd-head-dim
// and cross-attention (q_pos) shapes. On CPUs without AVX512-BF16 both paths are the exact one.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "random_tensor.h"
#include "runtime/cpu/cpu_backend.h"

using namespace llama3;

namespace {

using optest::randn;

// max |a - b| / max |b|: the normalised error the backend parity tests use.
double rel_err(const Tensor& a, const Tensor& b) {
  auto x = a.to_vector<float>(), y = b.to_vector<float>();
  double e = 0, m = 0;
  for (size_t i = 0; i < x.size(); ++i)
    e = std::max(e, double(std::fabs(x[i] - y[i]))), m = std::max(m, double(std::fabs(y[i])));
  return e / std::max(m, 1e-30);
}

struct Case {
  int64_t B, Tq, Tk, H, Hkv, D;
  bool causal, docs, qpos;
};

class AttentionBf16 : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionBf16, MatchesExactWithinBf16Tolerance) {
  const Case c = GetParam();
  Backend& be = cpu_backend();
  Tensor q = randn({c.B, c.Tq, c.H, c.D}, 1), k = randn({c.B, c.Tk, c.Hkv, c.D}, 2),
         v = randn({c.B, c.Tk, c.Hkv, c.D}, 3), dout = randn({c.B, c.Tq, c.H, c.D}, 4);
  AttentionParams p;
  p.causal = c.causal;
  if (c.docs) {
    std::vector<int32_t> doc(c.B * c.Tk);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < c.Tk; ++t) doc[b * c.Tk + t] = int32_t(t / (37 + 11 * b));
    p.doc_ids = Tensor::from_vector(doc, {c.B, c.Tk});
  }
  if (c.qpos) {  // queries at the last Tq key positions (a decode/cross-attention shape)
    std::vector<int32_t> pos(c.Tq);
    for (int64_t i = 0; i < c.Tq; ++i) pos[i] = int32_t(c.Tk - c.Tq + i);
    p.q_pos = Tensor::from_vector(pos, {c.Tq});
  }
  auto run = [&](AttnCompute compute, Tensor& out, Tensor& dq, Tensor& dk, Tensor& dv) {
    p.compute = compute;
    out = Tensor::empty(q.shape(), DType::f32);
    Tensor lse = Tensor::empty({c.B, c.H, c.Tq}, DType::f32);
    be.attention_forward(q, k, v, p, out, lse);
    dq = Tensor::empty(q.shape(), DType::f32), dk = Tensor::empty(k.shape(), DType::f32),
    dv = Tensor::empty(v.shape(), DType::f32);
    be.attention_backward(dout, q, k, v, out, lse, p, dq, dk, dv);
  };
  Tensor o1, dq1, dk1, dv1, o2, dq2, dk2, dv2;
  run(AttnCompute::exact, o1, dq1, dk1, dv1);
  run(AttnCompute::bf16, o2, dq2, dk2, dv2);
  EXPECT_LT(rel_err(o2, o1), 1e-2);
  EXPECT_LT(rel_err(dq2, dq1), 1e-2);
  EXPECT_LT(rel_err(dk2, dk1), 1e-2);
  EXPECT_LT(rel_err(dv2, dv1), 1e-2);
#if defined(__AVX512BF16__)
  // The bf16 path really ran: rounding the operands must show up somewhere.
  EXPECT_GT(rel_err(o2, o1) + rel_err(dq2, dq1), 1e-6);
#endif
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionBf16,
                         ::testing::Values(Case{2, 128, 128, 4, 2, 64, true, false, false},
                                           Case{2, 200, 200, 4, 1, 64, true, true, false},
                                           Case{1, 77, 77, 2, 2, 32, true, false, false},
                                           Case{1, 65, 65, 3, 1, 5, true, true, false},
                                           Case{1, 40, 40, 2, 1, 16, false, false, false},
                                           Case{1, 9, 70, 2, 1, 64, true, false, true}));

}  // namespace
