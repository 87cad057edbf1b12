// The two hooks the parallelize step's communication overlap hangs on, without any
// communication: ops::linear's out_hook (the forward GEMM in row slices, each handed to the
// hook as soon as it is computed) must give bitwise the whole GEMM's output and gradients, and
// the autograd engine's Node::prepare must see each node's complete gradient before the node
// runs, in the order the nodes run, without changing that order.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "random_tensor.h"
#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/ops/ops.h"

using namespace llama3;

namespace {

using optest::randn;

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  std::vector<float> va = a.to_vector<float>(), vb = b.to_vector<float>();
  return std::memcmp(va.data(), vb.data(), va.size() * sizeof(float)) == 0;
}

struct SliceLog {
  std::vector<int64_t> rows;             // rows of each slice, in hook order
  std::vector<int64_t> first_row;        // its first row in the output
  std::vector<int> progress_calls;       // per slice
  std::vector<int> finish_order;         // slice indices in finish order
  std::vector<std::vector<float>> seen;  // each slice's values when handed to the hook
};

// Runs linear(x, w) with an out_hook that records every slice and doubles it in finish()
// (an exact in-place operation, as an all-reduce over two equal ranks would be), and the
// backward of dot(out, r).
Tensor run_hooked(const Tensor& x, const Tensor& w, const Tensor& r, ops::Precision p,
                  SliceLog& log) {
  const float* base = nullptr;
  ops::OutHook hook = [&](Tensor& rows) {
    const int i = int(log.rows.size());
    if (!base) base = rows.data<float>();
    log.rows.push_back(rows.size(0));
    log.first_row.push_back((rows.data<float>() - base) / rows.size(1));
    log.progress_calls.push_back(0);
    log.seen.push_back(rows.to_vector<float>());
    ops::DxPending pending;
    pending.progress = [&log, i] { log.progress_calls[size_t(i)]++; };
    pending.finish = [&log, i, rows]() mutable {
      log.finish_order.push_back(i);
      backend_for(rows.device()).scale(rows, 2.f);
    };
    return pending;
  };
  Tensor out = ops::linear(x, w, p, false, false, {}, hook);
  ops::dot(out, r).backward();
  return out;
}

void check_out_hook(int64_t B, int64_t T, ops::Precision p, int64_t expect_slices) {
  const int64_t in = 64, outf = 48;
  Tensor r = randn({B, T, outf}, 3);
  Tensor x0 = randn({B, T, in}, 1), w0 = randn({outf, in}, 2);
  x0.set_requires_grad(true), w0.set_requires_grad(true);
  Tensor ref = ops::linear(x0, w0, p);
  // The hook's in-place doubling is outside the graph (as the all-reduce is: its backward is
  // reduce_from_group's identity node), so the gradients are those of dot(ref, r).
  ops::dot(ref, r).backward();

  Tensor x1 = randn({B, T, in}, 1), w1 = randn({outf, in}, 2);
  x1.set_requires_grad(true), w1.set_requires_grad(true);
  SliceLog log;
  Tensor out = run_hooked(x1, w1, r, p, log);

  ASSERT_EQ(int64_t(log.rows.size()), expect_slices);
  int64_t next = 0;
  for (size_t i = 0; i < log.rows.size(); ++i) {
    EXPECT_EQ(log.first_row[i], next) << "slice " << i;
    next += log.rows[i];
    if (expect_slices > 1) {
      EXPECT_GE(log.rows[i], 32) << "slice " << i;
    }
    // Handed over complete: the hook saw the slice's final GEMM values.
    std::vector<float> want =
        ref.view({B * T, outf}).narrow(0, log.first_row[i], log.rows[i]).to_vector<float>();
    EXPECT_EQ(std::memcmp(log.seen[i].data(), want.data(), want.size() * sizeof(float)), 0)
        << "slice " << i;
    // Progressed once per later slice, finished in slice order.
    EXPECT_EQ(log.progress_calls[i], int(log.rows.size() - 1 - i)) << "slice " << i;
    EXPECT_EQ(log.finish_order[i], int(i));
  }
  EXPECT_EQ(next, B * T);
  EXPECT_TRUE(bitwise_equal(out, ops::scale(ref, 2.f)));
  EXPECT_TRUE(bitwise_equal(x1.grad(), x0.grad()));
  EXPECT_TRUE(bitwise_equal(w1.grad(), w0.grad()));
}

TEST(LinearOutHook, SlicesGiveTheWholeGemmBitwiseF32) {
  check_out_hook(3, 45, ops::Precision::f32, 4);
}
TEST(LinearOutHook, SlicesGiveTheWholeGemmBitwiseBf16) {
  check_out_hook(3, 45, ops::Precision::bf16, 4);
}
TEST(LinearOutHook, TwoSlicesOf32Rows) {
  check_out_hook(2, 32, ops::Precision::f32, 2);
}
TEST(LinearOutHook, FewRowsAreOneSlice) {
  check_out_hook(1, 20, ops::Precision::f32, 1);
}

// Identity with a log of prepare() and backward() calls and the gradients they saw.
struct Probe final : Node {
  std::string tag;
  std::vector<std::string>* log;
  std::vector<float> prepared;
  const char* name() const override { return "probe"; }
  void prepare(const Tensor& g) override {
    log->push_back("prepare " + tag);
    prepared = g.to_vector<float>();
  }
  std::vector<Tensor> backward(const Tensor& g) override {
    log->push_back("backward " + tag);
    EXPECT_EQ(g.to_vector<float>(), prepared)
        << tag << ": backward got another gradient than prepare";
    return {g};
  }
};

Tensor probe(const Tensor& x, const std::string& tag, std::vector<std::string>& log) {
  Tensor out = x.detach();
  auto n = std::make_shared<Probe>();
  n->tag = tag;
  n->log = &log;
  n->next = {autograd::edge(x)};
  autograd::set_history(out, n);
  return out;
}

TEST(AutogradPrepare, SeesTheCompleteGradientBeforeTheNodeRunsInRunOrder) {
  std::vector<std::string> log;
  Tensor x = randn({4}, 7);
  x.set_requires_grad(true);
  // s feeds both k and v (two contributions: prepared once, with their sum); the sum node's
  // inputs k, v are made ready together and run v first (last pushed).
  Tensor s = probe(x, "s", log);
  Tensor k = probe(ops::scale(s, 3.f), "k", log), v = probe(ops::scale(s, 5.f), "v", log);
  Tensor y = ops::add(k, v);
  ops::dot(y, randn({4}, 8)).backward();
  const std::vector<std::string> want = {"prepare v",  "prepare k", "backward v",
                                         "backward k", "prepare s", "backward s"};
  EXPECT_EQ(log, want);
  // x's gradient went through unchanged: 3 r + 5 r.
  std::vector<float> r = randn({4}, 8).to_vector<float>(), g = x.grad().to_vector<float>();
  for (size_t i = 0; i < r.size(); ++i) EXPECT_FLOAT_EQ(g[i], 3.f * r[i] + 5.f * r[i]);
}

}  // namespace
