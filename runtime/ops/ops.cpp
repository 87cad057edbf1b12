#include "runtime/ops/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "runtime/autograd/autograd.h"

namespace llama3::ops {

namespace {

Backend& be(const Tensor& t) { return backend_for(t.device()); }
Tensor empty_like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype(), t.device()); }
Tensor zeros_like(const Tensor& t) { return Tensor::zeros(t.shape(), t.dtype(), t.device()); }

void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  LLAMA3_CHECK(a.device() == b.device(), "{}: tensors on {} and {}", op, a.device().str(),
               b.device().str());
}

Tensor as_rows(const Tensor& t) { return t.view({-1, t.size(-1)}); }

Tensor to_bf16(const Tensor& t) { return t.dtype() == DType::bf16 ? t : t.to(DType::bf16); }

}  // namespace

// ---------------------------------------------------------------- reshape
namespace {
struct ReshapeNode : Node {
  Shape in_shape;
  const char* name() const override { return "reshape"; }
  std::vector<Tensor> backward(const Tensor& g) override { return {g.contiguous().view(in_shape)}; }
};
}  // namespace

Tensor reshape(const Tensor& x, const Shape& shape) {
  Tensor out = x.contiguous().view(shape);
  if (autograd::any_requires_grad({&x})) {
    auto n = std::make_shared<ReshapeNode>();
    n->in_shape = x.shape();
    n->next = {autograd::edge(x)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- embedding
namespace {
struct EmbeddingNode : Node {
  Tensor ids;
  Shape w_shape;
  DType w_dtype;
  const char* name() const override { return "embedding"; }
  // The rows add into the table's gradient from earlier micro-batches where the backend
  // accumulates weight gradients in place (CUDA): no zeroed table, no add over it. (Not on
  // CPU: repeated ids would sum in another order than the zeroed table plus one add, which
  // keeps data parallelism bitwise equal to accumulation, test_parallel_train_exact.sh.)
  bool accumulates() const override { return true; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const Tensor acc = accumulate_into.empty() ? Tensor() : accumulate_into[0];
    Tensor dw = acc.defined() && acc.dtype() == w_dtype && acc.shape() == w_shape &&
                        be(g).accumulate_weight_grads_in_place()
                    ? acc
                    : Tensor::zeros(w_shape, w_dtype, g.device());
    be(g).embedding_backward(as_rows(g.contiguous()), ids, dw);
    return {dw};
  }
  void release() override { ids = Tensor(); }
};
}  // namespace

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  LLAMA3_CHECK(weight.dim() == 2 && ids.dtype() == DType::i32,
               "embedding: weight {} must be (V, D) and ids {} int32", weight.str(), ids.str());
  check_same_device(weight, ids, "embedding");
  Shape os = ids.shape();
  os.push_back(weight.size(1));
  Tensor out = Tensor::empty(os, weight.dtype(), weight.device());
  Tensor idc = ids.contiguous().view({-1});
  Tensor o2 = out.view({-1, weight.size(1)});
  be(weight).embedding_forward(weight.contiguous(), idc, o2);
  if (autograd::any_requires_grad({&weight})) {
    auto n = std::make_shared<EmbeddingNode>();
    n->ids = idc;
    n->w_shape = weight.shape();
    n->w_dtype = weight.dtype();
    n->next = {autograd::edge(weight)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- linear
namespace {
constexpr int64_t kDwSlices = 4;  // dW GEMM slices when a dx_hook asks for progress calls
// Forward GEMM slices (of rows) under an out_hook, each of at least kOutSliceRows rows: a
// backend may run small-m products on another kernel (CPU: m <= 16, the decode kernels),
// whose rounding could differ from the whole GEMM's.
constexpr int64_t kOutSlices = 4, kOutSliceRows = 32;

struct LinearNode : Node {
  Tensor x, w;  // (N, in), (out, in); bf16 copies in mixed precision
  Shape x_shape;
  DType x_dtype, w_dtype;
  Precision p;
  DxHook dx_hook;
  bool residual = false;  // next[2]: the residual added to the output (linear_residual)
  const char* name() const override { return residual ? "linear_residual" : "linear"; }
  // dx into another consumer's pending gradient of x (q/k/v or gate/up reading one norm
  // output), and dW into the gradient the weight holds from earlier micro-batches: the GEMM
  // adds with beta 1, saving the engine's separate add. Not under a dx_hook, which must see
  // this node's dx alone.
  bool accumulates() const override { return !dx_hook; }
  // bf16 GEMMs: the completed gradient's bf16 rounding from the node that completed it (the
  // residual stream's, from the RMSNorm backward) saves the cast below.
  bool wants_bf16_grad() const override { return p == Precision::bf16; }
  std::vector<Tensor> backward(const Tensor& g_in) override {
    Tensor g = as_rows(g_in.contiguous());
    if (p == Precision::bf16) g = grad_bf16.defined() ? as_rows(grad_bf16) : to_bf16(g);
    Tensor dx, dw;
    DxPending pending;
    if (next[0]) {
      const Tensor acc = accumulate_into.empty() ? Tensor() : accumulate_into[0];
      if (acc.defined() && !dx_hook && acc.dtype() == x_dtype && acc.shape() == x_shape) {
        Tensor a2 = acc.view({g.size(0), w.size(1)});
        be(g).gemm(g, Trans::N, w, Trans::N, a2, 1.f, 1.f);
        dx = acc;
      } else {
        dx = Tensor::empty({g.size(0), w.size(1)}, x_dtype, g.device());
        be(g).gemm(g, Trans::N, w, Trans::N, dx, 1.f, 0.f);
        if (dx_hook) pending = dx_hook(dx);  // e.g. an all-reduce in flight during the dW GEMM
        dx = dx.view(x_shape);
      }
    }
    if (next[1]) {
      const Tensor acc = accumulate_into.size() > 1 ? accumulate_into[1] : Tensor();
      const bool into = acc.defined() && !pending.progress && acc.dtype() == w_dtype &&
                        acc.shape() == w.shape() && be(g).accumulate_weight_grads_in_place();
      dw = into ? acc : Tensor::empty(w.shape(), w_dtype, g.device());
      if (!pending.progress) {
        be(g).gemm(g, Trans::T, x, Trans::N, dw, 1.f, into ? 1.f : 0.f);
      } else {
        // dW by slices of output rows, progressing the pending operation between them (a
        // library that advances transfers only inside its own calls). Each row of dW is the
        // same dot products over the same rows of g and x as in the whole GEMM.
        const int64_t out = w.size(0), rows = (out + kDwSlices - 1) / kDwSlices;
        for (int64_t r0 = 0; r0 < out; r0 += rows) {
          const int64_t n = std::min(rows, out - r0);
          Tensor dws = dw.narrow(0, r0, n);
          be(g).gemm(g.narrow(1, r0, n), Trans::T, x, Trans::N, dws, 1.f, 0.f);
          if (r0 + n < out) pending.progress();
        }
      }
    }
    if (pending.finish) pending.finish();
    if (residual) return {dx, dw, next[2] ? g_in : Tensor()};  // d out / d residual = 1
    return {dx, dw};
  }
  void release() override {
    x = w = Tensor();
    dx_hook = nullptr;
  }
};
}  // namespace

bool bf16_activations(Precision p, const Device& d) {
  return p == Precision::bf16 && backend_for(d).bf16_activations();
}

namespace {
thread_local int t_proj_grads = -1;  // -1: LLAMA3_BF16_PROJ_GRADS decides
}  // namespace
void set_bf16_projection_grads(bool on) {
  t_proj_grads = on ? 1 : 0;
}
bool bf16_projection_grads() {
  static const bool env = [] {
    const char* e = std::getenv("LLAMA3_BF16_PROJ_GRADS");
    return e != nullptr && e[0] == '1';
  }();
  return t_proj_grads >= 0 ? t_proj_grads == 1 : env;
}

// ---------------------------------------------------------------- weight copies
namespace {
thread_local const WeightCopyTable* g_weight_copies = nullptr;
}  // namespace

size_t WeightCopyTable::add(const Tensor& w) {
  LLAMA3_CHECK(w.dtype() == DType::f32 && w.is_contiguous(),
               "weight copies: {} must be a contiguous f32 weight", w.str());
  weights_.push_back(w.detach());
  copies_.push_back(Tensor::empty(w.shape(), DType::bf16, w.device()));
  written_.push_back(false);
  return copies_.size() - 1;
}

Tensor WeightCopyTable::find(const Tensor& w) const {
  for (size_t i = 0; i < weights_.size(); ++i)
    if (written_[i] && weights_[i].same_storage(w) && weights_[i].offset() == w.offset() &&
        weights_[i].shape() == w.shape() && weights_[i].strides() == w.strides())
      return copies_[i];
  return {};
}

WeightCopiesScope::WeightCopiesScope(const WeightCopyTable* t) : prev_(g_weight_copies) {
  g_weight_copies = t;
}
WeightCopiesScope::~WeightCopiesScope() { g_weight_copies = prev_; }

Tensor weight_bf16(const Tensor& w) {
  if (w.dtype() == DType::bf16) return w;
  if (g_weight_copies) {
    Tensor c = g_weight_copies->find(w);
    if (c.defined()) return c;
  }
  return w.to(DType::bf16);
}

namespace {
bool norm_sums_grad_parts(const Tensor& x);  // below, with the RMSNorm node

// linear, and linear_residual when residual is defined (then without bf16_out or out_hook).
Tensor linear_impl(const Tensor& x, const Tensor& w, const Tensor& residual, Precision p,
                   bool bf16_out, bool f32_grad, const DxHook& dx_hook, const OutHook& out_hook) {
  const char* op = residual.defined() ? "linear_residual" : "linear";
  LLAMA3_CHECK(w.dim() == 2 && x.size(-1) == w.size(1),
               "{}: x {} has {} features, weight {} expects {}", op, x.str(), x.size(-1), w.str(),
               w.dim() == 2 ? w.size(1) : -1);
  check_same_device(x, w, op);
  Tensor x2 = as_rows(x.contiguous());
  Tensor wc = w.contiguous();
  if (p == Precision::bf16) x2 = to_bf16(x2), wc = weight_bf16(wc);
  LLAMA3_CHECK(!bf16_out || p == Precision::bf16,
               "linear: a bf16 output needs bf16 precision (x {}, weight {})", x.str(), w.str());
  const DType out_t = bf16_out                  ? DType::bf16
                      : x.dtype() == DType::f64 ? DType::f64
                                                : DType::f32;
  Shape os = x.shape();
  os.back() = w.size(0);
  Tensor out = Tensor::empty(os, out_t, x.device());
  Tensor o2 = out.view({-1, w.size(0)});
  if (residual.defined()) {
    check_same_device(x, residual, op);
    LLAMA3_CHECK(residual.shape() == os && residual.dtype() == out_t,
                 "linear_residual: residual {} must have the output's shape {} and dtype {}",
                 residual.str(), shape_str(os), dtype_name(out_t));
    be(x).gemm_add(x2, Trans::N, wc, Trans::T, residual.contiguous().view({-1, w.size(0)}), o2);
  } else if (!out_hook) {
    be(x).gemm(x2, Trans::N, wc, Trans::T, o2, 1.f, 0.f);
  } else {
    // Slice i's operation (e.g. its all-reduce) is in flight while slice i+1 is computed; the
    // earlier ones are progressed between slices and all are completed, in order, at the end.
    const int64_t N = o2.size(0);
    const int64_t slices = std::clamp<int64_t>(N / kOutSliceRows, 1, kOutSlices);
    const int64_t rows = std::max<int64_t>(1, (N + slices - 1) / slices);
    std::vector<DxPending> pending;
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t n = std::min(rows, N - r0);
      Tensor part = o2.narrow(0, r0, n);
      be(x).gemm(x2.narrow(0, r0, n), Trans::N, wc, Trans::T, part, 1.f, 0.f);
      for (auto& q : pending)
        if (q.progress) q.progress();
      pending.push_back(out_hook(part));
    }
    for (auto& q : pending)
      if (q.finish) q.finish();
  }
  if (autograd::any_requires_grad({&x, &w, &residual})) {
    auto n = std::make_shared<LinearNode>();
    n->x = x2;
    n->w = wc;
    n->x_shape = x.shape();
    // dx has x's dtype: bf16 activations (a bf16_out producer upstream) get bf16 gradients,
    // unless f32_grad (a normalised input feeding several projections: sum in f32), which the
    // norm may do itself from bf16 parts (bf16_projection_grads).
    const bool bf16_dx = !f32_grad || (!dx_hook && norm_sums_grad_parts(x));
    n->x_dtype = x.dtype() == DType::bf16 && p == Precision::bf16 && bf16_dx ? DType::bf16
                 : x.dtype() == DType::f64                                   ? DType::f64
                                                                             : DType::f32;
    n->w_dtype = w.dtype();
    n->p = p;
    n->dx_hook = dx_hook;
    n->next = {autograd::edge(x), autograd::edge(w)};
    if (residual.defined()) n->residual = true, n->next.push_back(autograd::edge(residual));
    autograd::set_history(out, n);
  }
  return out;
}
}  // namespace

Tensor linear(const Tensor& x, const Tensor& w, Precision p, bool bf16_out, bool f32_grad,
              const DxHook& dx_hook, const OutHook& out_hook) {
  return linear_impl(x, w, Tensor(), p, bf16_out, f32_grad, dx_hook, out_hook);
}

Tensor linear_residual(const Tensor& x, const Tensor& w, const Tensor& residual, Precision p,
                       const DxHook& dx_hook) {
  LLAMA3_CHECK(residual.defined(), "linear_residual: the residual is undefined");
  return linear_impl(x, w, residual, p, false, false, dx_hook, {});
}

// ---------------------------------------------------------------- rmsnorm
namespace {
struct RmsNormNode : Node {
  Tensor x, w, rstd;
  int parts = 1;  // bf16_projection_grads: the bf16 output's consumers' gradients taken apart
  const char* name() const override { return "rmsnorm"; }
  int max_grad_parts() const override { return parts; }
  // dx into the residual stream's pending gradient (the residual add's share), in place; dw
  // (which the kernels add to) into the weight's gradient from earlier micro-batches where the
  // backend accumulates weight gradients in place (CUDA: its column sums added to the
  // gradient give the bits of the zeroed vector plus one add; no fill, no add launch).
  bool accumulates() const override { return true; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const Tensor acc = accumulate_into.empty() ? Tensor() : accumulate_into[0];
    const bool in_place = acc.defined() && acc.dtype() == x.dtype() && acc.shape() == x.shape();
    const Tensor wacc = accumulate_into.size() > 1 ? accumulate_into[1] : Tensor();
    const bool w_in_place = wacc.defined() && wacc.dtype() == w.dtype() &&
                            wacc.shape() == w.shape() && be(g).accumulate_weight_grads_in_place();
    Tensor dx = in_place ? acc : empty_like(x), dw = w_in_place ? wacc : zeros_like(w);
    const bool copy16 = !offer_bf16.empty() && offer_bf16[0] && x.dtype() == DType::f32;
    if (parts > 1 && (!grad_parts.empty() || g.dtype() != x.dtype())) {
      // The projections' gradients, bf16 (or an f32 sum), added in f32 by the kernel. (One
      // f32 gradient, e.g. through a sequence-parallel gather, takes the plain path below.)
      std::vector<Tensor> dys{g.contiguous()};
      for (const Tensor& t : grad_parts) dys.push_back(t.contiguous());
      Tensor dx16 = copy16 ? Tensor::empty(x.shape(), DType::bf16, x.device()) : Tensor();
      be(g).rmsnorm_backward_parts(dys, x, w, rstd, dx, dw, in_place, copy16 ? &dx16 : nullptr);
      if (copy16) bf16_grads[0] = std::move(dx16);
      return {dx, dw};
    }
    // (A bf16 output's gradient arrives in bf16 unless its consumers return f32.)
    const Tensor gc = g.dtype() == x.dtype() ? g.contiguous() : g.to(x.dtype());
    if (copy16) {
      // dx completes the residual stream's gradient, which a bf16 GEMM reads next (the
      // o/down projection's backward): its bf16 rounding written by the same kernel.
      Tensor dx16 = Tensor::empty(x.shape(), DType::bf16, x.device());
      be(g).rmsnorm_backward_bf16(gc, x, w, rstd, dx, dw, in_place, dx16);
      bf16_grads[0] = std::move(dx16);
    } else {
      be(g).rmsnorm_backward(gc, x, w, rstd, dx, dw, in_place);
    }
    return {dx, dw};
  }
  void release() override { x = w = rstd = Tensor(); }
};
// Whether x is a norm's bf16 output whose backward takes its consumers' gradients apart.
bool norm_sums_grad_parts(const Tensor& x) {
  const auto* n = x.requires_grad() && x.meta()
                      ? dynamic_cast<const RmsNormNode*>(x.meta()->grad_fn.get())
                      : nullptr;
  return n != nullptr && n->parts > 1;
}
}  // namespace

Tensor rmsnorm(const Tensor& x, const Tensor& w, float eps, bool bf16_out) {
  LLAMA3_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), "rmsnorm: x {} with weight {}", x.str(),
               w.str());
  check_same_device(x, w, "rmsnorm");
  Tensor xc = x.contiguous();
  LLAMA3_CHECK(!bf16_out || x.dtype() == DType::f32, "rmsnorm: a bf16 output needs f32 x, got {}",
               x.str());
  Tensor out = bf16_out ? Tensor::empty(xc.shape(), DType::bf16, xc.device()) : empty_like(xc);
  Tensor rstd = Tensor::empty({x.numel() / x.size(-1)}, x.dtype(), x.device());
  be(x).rmsnorm_forward(xc, w.contiguous(), eps, out, rstd);
  if (autograd::any_requires_grad({&x, &w})) {
    auto n = std::make_shared<RmsNormNode>();
    n->x = xc, n->w = w.contiguous(), n->rstd = rstd;
    n->parts = bf16_out && bf16_projection_grads() ? 4 : 1;
    n->next = {autograd::edge(x), autograd::edge(w)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- rope
namespace {
struct RopeNode : Node {
  Tensor inv_freq, pos;
  const char* name() const override { return "rope"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    Tensor gc = g.contiguous();
    Tensor dx = empty_like(gc);
    be(g).rope(gc, inv_freq, pos, /*inverse=*/true, dx);
    return {dx};
  }
  void release() override { inv_freq = pos = Tensor(); }
};
}  // namespace

Tensor rope(const Tensor& x, const Tensor& inv_freq, const Tensor& pos) {
  LLAMA3_CHECK(x.dim() == 4 && x.size(3) % 2 == 0 && inv_freq.numel() == x.size(3) / 2 &&
                   pos.numel() == x.size(1) && pos.dtype() == DType::i32,
               "rope: x {} must be (B, T, H, Dh) with inv_freq (Dh/2) and int32 pos (T); got "
               "inv_freq {}, pos {}",
               x.str(), inv_freq.str(), pos.str());
  Tensor xc = x.contiguous();
  Tensor out = empty_like(xc);
  // The frequencies stay f32 for bf16 x (Backend::rope): the angles need their precision.
  const DType ft = x.dtype() == DType::f64 ? DType::f64 : DType::f32;
  Tensor f = inv_freq.dtype() == ft ? inv_freq : inv_freq.to(ft);
  be(x).rope(xc, f, pos, /*inverse=*/false, out);
  if (autograd::any_requires_grad({&x})) {
    auto n = std::make_shared<RopeNode>();
    n->inv_freq = f, n->pos = pos;
    n->next = {autograd::edge(x)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- attention
namespace {
struct AttentionNode : Node {
  Tensor q, k, v, out, lse;
  AttentionParams p;
  const char* name() const override { return "attention"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    Tensor dq = empty_like(q), dk = empty_like(k), dv = empty_like(v);
    be(g).attention_backward(g.contiguous(), q, k, v, out, lse, p, dq, dk, dv);
    return {dq, dk, dv};
  }
  void release() override {
    q = k = v = out = lse = Tensor();
    p.doc_ids = Tensor();
  }
};

void check_doc_ids(const Tensor& doc, int64_t B, int64_t T) {
  LLAMA3_CHECK(doc.dtype() == DType::i32 && doc.numel() == B * T,
               "attention: doc_ids {} must be int32 (B={}, T={})", doc.str(), B, T);
  if (!doc.device().is_cpu()) return;
  const int32_t* d = doc.data<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 1; t < T; ++t)
      LLAMA3_CHECK(d[b * T + t] >= d[b * T + t - 1],
                   "attention: doc_ids must be non-decreasing within a row (row {}, position {}: "
                   "{} after {})",
                   b, t, d[b * T + t], d[b * T + t - 1]);
}
}  // namespace

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionParams& p) {
  LLAMA3_CHECK(q.dim() == 4 && k.dim() == 4 && v.shape() == k.shape() && q.size(0) == k.size(0) &&
                   q.size(3) == k.size(3) && k.size(2) > 0 && q.size(2) % k.size(2) == 0,
               "attention: q {}, k {}, v {} must be (B, Tq, H, Dh) / (B, Tk, Hkv, Dh) with H a "
               "multiple of Hkv",
               q.str(), k.str(), v.str());
  AttentionParams pc = p;
  if (pc.q_pos.defined()) {
    pc.q_pos = pc.q_pos.contiguous();
    LLAMA3_CHECK(pc.q_pos.dtype() == DType::i32 && pc.q_pos.numel() == q.size(1),
                 "attention: q_pos {} must be int32 with one position per query ({})", pc.q_pos.str(),
                 q.size(1));
    if (pc.q_pos.device().is_cpu())
      for (int32_t x : pc.q_pos.to_vector<int32_t>())
        LLAMA3_CHECK(x >= 0 && x < k.size(1), "attention: query position {} outside the {} keys", x, k.size(1));
  } else {
    LLAMA3_CHECK(q.size(1) == k.size(1), "attention: {} queries and {} keys need q_pos", q.size(1), k.size(1));
  }
  if (pc.doc_ids.defined()) {
    pc.doc_ids = pc.doc_ids.contiguous();
    check_doc_ids(pc.doc_ids, k.size(0), k.size(1));
  }
  Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  Tensor out = empty_like(qc);
  // f32 lse for f32 and bf16 inputs (f64 for f64): the backward recomputes every probability
  // from it, and a bf16 lse would put an error of up to 2^-8 |lse| into each.
  Tensor lse = Tensor::empty({q.size(0), q.size(2), q.size(1)},
                             q.dtype() == DType::f64 ? DType::f64 : DType::f32, q.device());
  be(q).attention_forward(qc, kc, vc, pc, out, lse);
  if (autograd::any_requires_grad({&q, &k, &v})) {
    auto n = std::make_shared<AttentionNode>();
    n->q = qc, n->k = kc, n->v = vc, n->out = out.detach(), n->lse = lse, n->p = pc;
    n->next = {autograd::edge(q), autograd::edge(k), autograd::edge(v)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- swiglu
namespace {
struct SwiGluNode : Node {
  Tensor gate, up;
  const char* name() const override { return "swiglu"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    Tensor dg = empty_like(gate), du = empty_like(up);
    be(g).swiglu_backward(g.contiguous(), gate, up, dg, du);
    return {dg, du};
  }
  void release() override { gate = up = Tensor(); }
};
}  // namespace

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  LLAMA3_CHECK(gate.shape() == up.shape(), "swiglu: gate {} and up {}", gate.str(), up.str());
  Tensor gc = gate.contiguous(), uc = up.contiguous();
  Tensor out = empty_like(gc);
  be(gate).swiglu_forward(gc, uc, out);
  if (autograd::any_requires_grad({&gate, &up})) {
    auto n = std::make_shared<SwiGluNode>();
    n->gate = gc, n->up = uc;
    n->next = {autograd::edge(gate), autograd::edge(up)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- add / scale / dot
namespace {
struct AddNode : Node {
  const char* name() const override { return "add"; }
  std::vector<Tensor> backward(const Tensor& g) override { return {g, g}; }
};
struct ScaleNode : Node {
  float alpha;
  const char* name() const override { return "scale"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    Tensor d = g.contiguous().clone();
    be(g).scale(d, alpha);
    return {d};
  }
};
struct DotNode : Node {
  Tensor r;
  const char* name() const override { return "dot"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    Tensor d = r.clone();
    be(g).scale(d, float(g.item()));
    return {d};
  }
  void release() override { r = Tensor(); }
};
}  // namespace

Tensor add(const Tensor& a, const Tensor& b) {
  LLAMA3_CHECK(a.shape() == b.shape() && a.dtype() == b.dtype(), "add: {} + {}", a.str(), b.str());
  Tensor out = empty_like(a);
  be(a).add(a.contiguous(), b.contiguous(), out);
  if (autograd::any_requires_grad({&a, &b})) {
    auto n = std::make_shared<AddNode>();
    n->next = {autograd::edge(a), autograd::edge(b)};
    autograd::set_history(out, n);
  }
  return out;
}

Tensor scale(const Tensor& x, float alpha) {
  Tensor out = x.contiguous().clone();
  be(x).scale(out, alpha);
  if (autograd::any_requires_grad({&x})) {
    auto n = std::make_shared<ScaleNode>();
    n->alpha = alpha;
    n->next = {autograd::edge(x)};
    autograd::set_history(out, n);
  }
  return out;
}

Tensor dot(const Tensor& x, const Tensor& r) {
  LLAMA3_CHECK(x.shape() == r.shape(), "dot: {} and {}", x.str(), r.str());
  Tensor rc = r.contiguous().to(x.dtype());
  Tensor xc = x.contiguous();
  double s = 0;
  {
    // sum(x * r) = sum of squares identity avoided: compute directly on host copies for
    // small test tensors, through the backend for CPU.
    std::vector<double> xv = xc.to_vector<double>(), rv = rc.to_vector<double>();
    for (size_t i = 0; i < xv.size(); ++i) s += xv[i] * rv[i];
  }
  Tensor out = Tensor::full({1}, s, x.dtype(), x.device());
  if (autograd::any_requires_grad({&x})) {
    auto n = std::make_shared<DotNode>();
    n->r = rc;
    n->next = {autograd::edge(x)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- cross-entropy
namespace {
struct CrossEntropyNode : Node {
  Tensor dh, dw;  // computed in forward for loss scale 1/n_valid
  const char* name() const override { return "linear_cross_entropy"; }
  // dw (g times) into the classifier's gradient from earlier micro-batches, where the backend
  // accumulates weight gradients in place (CUDA): one pass instead of a scale and an add.
  bool accumulates() const override { return true; }
  std::vector<Tensor> backward(const Tensor& g) override {
    // On a device the kernel reads g (no read back: none is allowed inside a captured step,
    // and outside one it would stall the stream); the CPU reads it directly.
    if (!g.device().is_cpu() && g.dtype() == DType::f32) {
      if (dh.defined()) be(dh).scale_by(dh, g);
      const Tensor acc = accumulate_into.size() > 1 ? accumulate_into[1] : Tensor();
      if (dw.defined() && acc.defined() && acc.dtype() == dw.dtype() &&
          acc.shape() == dw.shape() && be(dw).accumulate_weight_grads_in_place()) {
        Tensor into = acc;
        be(dw).axpy_by(g, dw, into);
        return {dh, acc};
      }
      if (dw.defined()) be(dw).scale_by(dw, g);
      return {dh, dw};
    }
    const float s = float(g.item());
    if (s != 1.f) {
      if (dh.defined()) be(dh).scale(dh, s);
      if (dw.defined()) be(dw).scale(dw, s);
    }
    return {dh, dw};
  }
  void release() override { dh = dw = Tensor(); }
};
// The backend's deferred form (Backend::linear_cross_entropy_keep): the forward kept the
// logits and their softmax statistics; the backward computes dlogits scaled by g on the
// device and runs the dh GEMM and the dW GEMM, the latter straight into the classifier's
// gradient from earlier micro-batches (beta 1) where the engine offers it, instead of a dw
// buffer, a scale pass and an add pass.
struct DeferredCrossEntropyNode : Node {
  CrossEntropyKept kept;
  Tensor h, w, tg;  // as given to the backend (the bf16 copies in mixed precision)
  Shape dh_shape, dw_shape;
  bool want_dw = false;
  const char* name() const override { return "linear_cross_entropy"; }
  bool accumulates() const override { return true; }
  std::vector<Tensor> backward(const Tensor& g) override {
    Backend& b = be(h);
    Tensor gd = g.to(DType::f32).contiguous();
    Tensor dh = Tensor::empty(dh_shape, DType::f32, h.device());
    const Tensor acc = accumulate_into.size() > 1 ? accumulate_into[1] : Tensor();
    const bool into = want_dw && acc.defined() && acc.dtype() == DType::f32 &&
                      acc.shape() == dw_shape && b.accumulate_weight_grads_in_place();
    Tensor dw = !want_dw ? Tensor() : into ? acc : Tensor::empty(dw_shape, DType::f32, h.device());
    b.linear_cross_entropy_grad(kept, h, w, tg, gd, dh, want_dw ? &dw : nullptr, into);
    return {dh, dw};
  }
  void release() override { kept = CrossEntropyKept(), h = w = tg = Tensor(); }
};
}  // namespace

Tensor linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                            const CrossEntropyOptions& opt) {
  LLAMA3_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1) &&
                   targets.numel() == h.size(0) && targets.dtype() == DType::i32,
               "linear_cross_entropy: h {} (N, D), w {} (V, D), targets {} (N) int32", h.str(),
               w.str(), targets.str());
  Tensor tg = targets.contiguous().view({-1});
  int64_t n_valid = opt.n_valid;
  // Captured without a count: the backend counts on the device (nothing is read back).
  const bool captured = be(h).capturing();
  if (n_valid <= 0 && !captured)
    for (int32_t t : tg.to_vector<int32_t>()) n_valid += t >= 0;
  LLAMA3_CHECK((captured && n_valid == 0) || (n_valid > 0 && n_valid <= h.size(0)),
               "linear_cross_entropy: {} targets >= 0 among {} rows (need at least one)", n_valid,
               h.size(0));
  Tensor hc = h.contiguous(), wc = w.contiguous();
  if (opt.precision == Precision::bf16) hc = to_bf16(hc), wc = weight_bf16(wc);
  const bool need = autograd::any_requires_grad({&h, &w});
  const DType gt = h.dtype() == DType::f64 ? DType::f64 : DType::f32;
  const float gs = n_valid > 0 ? float(1.0 / double(n_valid)) : 0.f;  // (0: counted there)
  Tensor out;
  if (need && gt == DType::f32) {  // the gradient deferred to the backward, where supported
    if (captured) out = Tensor::empty({1}, gt, h.device());
    CrossEntropyKept kept;
    double total = 0;
    if (be(h).linear_cross_entropy_keep(hc, wc, tg, opt.chunk, gs, kept, &total,
                                        captured ? &out : nullptr, double(n_valid))) {
      if (!captured) out = Tensor::full({1}, total / double(n_valid), gt, h.device());
      auto n = std::make_shared<DeferredCrossEntropyNode>();
      n->kept = std::move(kept);
      n->h = hc, n->w = wc, n->tg = tg;
      n->dh_shape = h.shape(), n->dw_shape = w.shape();
      n->want_dw = w.requires_grad();
      n->next = {autograd::edge(h), autograd::edge(w)};
      autograd::set_history(out, n);
      return out;
    }
  }
  Tensor dh, dw;
  if (need) {
    dh = Tensor::empty(h.shape(), gt, h.device());
    if (w.requires_grad()) dw = Tensor::empty(w.shape(), gt, w.device());  // written, not +=
  }
  if (captured) {  // the mean stays on the device
    LLAMA3_CHECK(gt == DType::f32, "linear_cross_entropy: a captured loss is f32, h is {}", h.str());
    out = Tensor::empty({1}, gt, h.device());
    be(h).linear_cross_entropy(hc, wc, tg, opt.chunk, gs, need ? &dh : nullptr,
                               need && dw.defined() ? &dw : nullptr, &out, double(n_valid));
  } else {
    const double total = be(h).linear_cross_entropy(hc, wc, tg, opt.chunk, gs, need ? &dh : nullptr,
                                                    need && dw.defined() ? &dw : nullptr);
    out = Tensor::full({1}, total / double(n_valid), gt, h.device());
  }
  if (need) {
    auto n = std::make_shared<CrossEntropyNode>();
    n->dh = dh, n->dw = dw;
    n->next = {autograd::edge(h), autograd::edge(w)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- sequence log-prob
namespace {
struct SequenceLogprobNode : Node {
  Tensor h, w, targets;
  int64_t n_seq = 0, chunk = 0;
  const char* name() const override { return "sequence_logprob"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const int64_t N = h.size(0), per = N / n_seq;
    std::vector<double> gs = g.to_vector<double>(), rg(N);
    for (int64_t r = 0; r < N; ++r) rg[r] = gs[r / per];
    Tensor rgt = Tensor::from_vector(rg, {N});
    Tensor dh = Tensor::empty(h.shape(), h.dtype(), h.device()), dw, logp;
    if (next[1]) dw = Tensor::zeros(w.shape(), w.dtype(), w.device());
    be(h).token_logprobs(h, w, targets, chunk, logp, rgt, &dh, dw.defined() ? &dw : nullptr);
    return {next[0] ? dh : Tensor(), dw};
  }
  void release() override { h = w = targets = Tensor(); }
};
}  // namespace

Tensor sequence_logprob(const Tensor& h, const Tensor& w, const Tensor& targets, int64_t n_seq,
                        int64_t chunk) {
  LLAMA3_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1) &&
                   targets.numel() == h.size(0) && targets.dtype() == DType::i32,
               "sequence_logprob: h {} (N, D), w {} (V, D), targets {} (N) int32", h.str(), w.str(),
               targets.str());
  LLAMA3_CHECK(n_seq > 0 && h.size(0) % n_seq == 0,
               "sequence_logprob: {} rows do not split into {} sequences", h.size(0), n_seq);
  check_same_device(h, w, "sequence_logprob");
  Tensor hc = h.contiguous(), wc = w.contiguous(), tg = targets.contiguous().view({-1});
  Tensor logp;
  be(h).token_logprobs(hc, wc, tg, chunk, logp, Tensor(), nullptr, nullptr);
  const int64_t N = h.size(0), per = N / n_seq;
  std::vector<double> lp = logp.to_vector<double>(), seq(n_seq, 0.0);
  for (int64_t r = 0; r < N; ++r) seq[r / per] += lp[r];
  Tensor out = Tensor::from_vector(seq, {n_seq}).to(logp.dtype()).to(h.device());
  if (autograd::any_requires_grad({&h, &w})) {
    auto n = std::make_shared<SequenceLogprobNode>();
    n->h = hc, n->w = wc, n->targets = tg, n->n_seq = n_seq, n->chunk = chunk;
    n->next = {autograd::edge(h), autograd::edge(w)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- pairwise logistic loss
namespace {
double softplus(double x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

struct PairwiseNode : Node {
  std::vector<double> z;  // scale * (a - b) - offset
  float scale = 1.f;
  DType dt = DType::f32;
  Device dev;
  const char* name() const override { return "pairwise_logistic_loss"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const double go = g.item(), n = double(z.size());
    std::vector<double> da(z.size()), db(z.size());
    for (size_t i = 0; i < z.size(); ++i) {
      // d softplus(-z) / dz = -sigmoid(-z)
      da[i] = -go * sigmoid(-z[i]) * scale / n;
      db[i] = -da[i];
    }
    const int64_t m = int64_t(z.size());
    return {Tensor::from_vector(da, {m}).to(dt).to(dev), Tensor::from_vector(db, {m}).to(dt).to(dev)};
  }
};
}  // namespace

Tensor pairwise_logistic_loss(const Tensor& a, const Tensor& b, float scale, const Tensor& offset) {
  LLAMA3_CHECK(a.dim() == 1 && a.shape() == b.shape() && a.numel() > 0 &&
                   (!offset.defined() || offset.shape() == a.shape()),
               "pairwise_logistic_loss: a {}, b {}, offset {} must be (n), n > 0", a.str(), b.str(),
               offset.defined() ? offset.str() : "none");
  std::vector<double> av = a.to_vector<double>(), bv = b.to_vector<double>(), ov(av.size(), 0.0);
  if (offset.defined()) ov = offset.to_vector<double>();
  std::vector<double> z(av.size());
  double loss = 0;
  for (size_t i = 0; i < av.size(); ++i) {
    z[i] = double(scale) * (av[i] - bv[i]) - ov[i];
    loss += softplus(-z[i]);
  }
  loss /= double(av.size());
  const DType dt = a.dtype() == DType::f64 ? DType::f64 : DType::f32;
  Tensor out = Tensor::full({1}, loss, dt, a.device());
  if (autograd::any_requires_grad({&a, &b})) {
    auto n = std::make_shared<PairwiseNode>();
    n->z = std::move(z), n->scale = scale, n->dt = dt, n->dev = a.device();
    n->next = {autograd::edge(a), autograd::edge(b)};
    autograd::set_history(out, n);
  }
  return out;
}

// ---------------------------------------------------------------- gather rows
namespace {
struct GatherRowsNode : Node {
  std::vector<int64_t> idx;
  Shape x_shape;
  DType dt = DType::f32;
  const char* name() const override { return "gather_rows"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const int64_t D = x_shape[1];
    std::vector<double> gv = g.to_vector<double>(), dx(size_t(x_shape[0] * D), 0.0);
    for (size_t m = 0; m < idx.size(); ++m)
      for (int64_t d = 0; d < D; ++d) dx[size_t(idx[m] * D + d)] += gv[m * D + d];
    return {Tensor::from_vector(dx, x_shape).to(dt).to(g.device())};
  }
};
}  // namespace

Tensor gather_rows(const Tensor& x, const std::vector<int64_t>& idx) {
  LLAMA3_CHECK(x.dim() == 2, "gather_rows: x {} must be (N, D)", x.str());
  Tensor out = Tensor::empty({int64_t(idx.size()), x.size(1)}, x.dtype(), x.device());
  for (size_t m = 0; m < idx.size(); ++m) {
    LLAMA3_CHECK(idx[m] >= 0 && idx[m] < x.size(0), "gather_rows: row {} outside [0, {})", idx[m],
                 x.size(0));
    Tensor dst = out.narrow(0, int64_t(m), 1);
    dst.copy_(x.narrow(0, idx[m], 1));
  }
  if (autograd::any_requires_grad({&x})) {
    auto n = std::make_shared<GatherRowsNode>();
    n->idx = idx, n->x_shape = x.shape(), n->dt = x.dtype();
    n->next = {autograd::edge(x)};
    autograd::set_history(out, n);
  }
  return out;
}

Tensor logits(const Tensor& h, const Tensor& w, Precision p) {
  autograd::NoGradGuard ng;
  return linear(h, w, p);
}

}  // namespace llama3::ops
