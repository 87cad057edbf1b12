// The two hooks the parallelize step's communication overlap hangs on, without any
// communication: ops::linear's out_hook (the forward GEMM in row slices, each handed to the
// hook as soon as it is computed) must give bitwise the whole GEMM's output and gradients, and
// the autograd engine's Node::prepare must see each node's complete gradient before the node
// runs, in the order the nodes run, without changing that order.
#include <gtest/gtest.h>

#include <cmath>
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

// Node::offer_bf16: the engine offers the bf16 rounding of a gradient only to the node whose
// contribution completes it (the last edge into its consumer), hands what that node wrote to
// the consumer as grad_bf16, and ignores one written by a node it did not offer it to.
struct WantsBf16 final : Node {
  std::vector<float> got_bf16;  // grad_bf16 as the consumer saw it (empty: none)
  std::vector<float> got;
  const char* name() const override { return "wants_bf16"; }
  bool wants_bf16_grad() const override { return true; }
  std::vector<Tensor> backward(const Tensor& g) override {
    got = g.to_vector<float>();
    if (grad_bf16.defined()) got_bf16 = grad_bf16.to(DType::f32).to_vector<float>();
    return {g};
  }
};
// Identity that adds its gradient into the pending sum where offered, and writes the bf16
// rounding of its result where offered (or always: `eager`, a node the engine must not trust).
struct Contributor final : Node {
  bool eager = false;
  std::vector<char>* offered;
  const char* name() const override { return "contributor"; }
  bool accumulates() const override { return true; }
  std::vector<Tensor> backward(const Tensor& g) override {
    Tensor out = g.contiguous().clone();
    if (accumulate_into[0].defined()) {  // in place: the pending tensor itself is the result
      Tensor acc = accumulate_into[0];
      acc.copy_(ops::add(acc, g));
      out = acc;
    }
    offered->push_back(offer_bf16[0]);
    if (offer_bf16[0] || eager) bf16_grads[0] = out.to(DType::bf16);
    return {out};
  }
};

Tensor node_out(const Tensor& x, std::shared_ptr<Node> n) {
  Tensor out = x.detach();
  n->next = {autograd::edge(x)};
  autograd::set_history(out, std::move(n));
  return out;
}

TEST(AutogradBf16Copies, OfferedToTheLastContributorOnly) {
  for (int mode = 0; mode < 3; ++mode) {  // 0: on; 1: off; 2: on, the first contributor eager
    SCOPED_TRACE(mode);
    autograd::set_bf16_grad_copies(mode != 1);
    Tensor x = randn({5}, 3);
    x.set_requires_grad(true);
    auto w = std::make_shared<WantsBf16>();
    Tensor h = node_out(x, w);
    std::vector<char> offered;
    auto c1 = std::make_shared<Contributor>(), c2 = std::make_shared<Contributor>();
    c1->offered = c2->offered = &offered;
    c1->eager = c2->eager = mode == 2;  // (the first to run is eager; the last is offered)
    Tensor y = ops::add(ops::scale(node_out(h, c1), 3.f), ops::scale(node_out(h, c2), 5.f));
    const int64_t n0 = autograd::bf16_grad_copies();
    ops::dot(y, randn({5}, 4)).backward();
    autograd::set_bf16_grad_copies(true);
    ASSERT_EQ(offered.size(), 2u);
    EXPECT_EQ(offered[0], 0) << "the first contributor is not offered";
    EXPECT_EQ(offered[1], mode != 1 ? 1 : 0) << "the last one is, when on";
    EXPECT_EQ(autograd::bf16_grad_copies() - n0, mode != 1 ? 1 : 0);
    // The consumer's bf16 gradient is the rounding of its whole gradient (3 r + 5 r).
    std::vector<float> r = randn({5}, 4).to_vector<float>();
    ASSERT_EQ(w->got.size(), r.size());
    for (size_t i = 0; i < r.size(); ++i) EXPECT_FLOAT_EQ(w->got[i], 3.f * r[i] + 5.f * r[i]);
    if (mode == 1) {
      EXPECT_TRUE(w->got_bf16.empty());
    } else {
      const std::vector<float> want =
          Tensor::from_vector(w->got, {5}).to(DType::bf16).to(DType::f32).to_vector<float>();
      EXPECT_EQ(w->got_bf16, want);
    }
  }
}

// Node::max_grad_parts: a node that takes its gradient's contributions apart gets each as
// grad_out or one of grad_parts (none offered to its producers for in-place sums), and
// contributions beyond its limit added into the first.
struct TakesParts final : Node {
  int limit = 4;
  std::vector<std::vector<float>> got;  // grad_out, then the parts
  const char* name() const override { return "takes_parts"; }
  int max_grad_parts() const override { return limit; }
  std::vector<Tensor> backward(const Tensor& g) override {
    got.push_back(g.to_vector<float>());
    for (const Tensor& p : grad_parts) got.push_back(p.to_vector<float>());
    return {g};
  }
};

TEST(AutogradGradParts, TakenApartUpToTheLimit) {
  for (int limit : {4, 2}) {
    SCOPED_TRACE(limit);
    Tensor x = randn({3}, 5);
    x.set_requires_grad(true);
    auto t = std::make_shared<TakesParts>();
    t->limit = limit;
    Tensor h = node_out(x, t);
    // Three consumers scaling h by 2, 3 and 5; each Contributor records whether the engine
    // offered it the pending sum (it must not: the consumer takes the parts apart).
    std::vector<char> offered;
    std::vector<std::shared_ptr<Contributor>> cs(3);
    std::vector<Tensor> ys;
    const float f[3] = {2.f, 3.f, 5.f};
    for (int i = 0; i < 3; ++i) {
      cs[i] = std::make_shared<Contributor>();
      cs[i]->offered = &offered;
      ys.push_back(ops::scale(node_out(h, cs[i]), f[i]));
    }
    const int64_t n0 = autograd::grad_parts_taken();
    ops::dot(ops::add(ops::add(ys[0], ys[1]), ys[2]), randn({3}, 6)).backward();
    EXPECT_EQ(autograd::grad_parts_taken() - n0, limit == 4 ? 2 : 1);
    const std::vector<float> r = randn({3}, 6).to_vector<float>();
    // Whatever the order, the parts add up to (2 + 3 + 5) r, and x's gradient is the first.
    ASSERT_EQ(t->got.size(), limit == 4 ? 3u : 2u);
    for (size_t k = 0; k < r.size(); ++k) {
      float sum = 0;
      for (const auto& p : t->got) sum += p[k];
      EXPECT_NEAR(sum, 10.f * r[k], 1e-5f);
    }
    // Each part is one contributor's gradient (f r), except where the limit added two.
    for (const auto& p : t->got) {
      const float ratio = p[0] / r[0];
      EXPECT_TRUE(std::abs(ratio - 2) < 1e-4 || std::abs(ratio - 3) < 1e-4 ||
                  std::abs(ratio - 5) < 1e-4 || (limit == 2 && ratio > 4.9f))
          << ratio;
    }
    for (char o : offered) EXPECT_EQ(o, 0);
  }
}

}  // namespace
