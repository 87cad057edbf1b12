#include "text/model/vocab_parallel.h"

#include <cmath>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/dist/comm_ops.h"

namespace llama3::text {

namespace {
void check_cpu_f32(const Tensor& t, const char* what) {
  LLAMA3_CHECK(t.device().is_cpu() && t.dtype() == DType::f32, "{}: vocabulary parallelism needs CPU f32, got {}",
               what, t.str());
}

struct VocabEmbeddingNode final : Node {
  Tensor ids_local;            // (N) clamped local ids
  std::vector<uint8_t> inside;  // row i's id is in this rank's range
  Shape w_shape;
  const char* name() const override { return "vocab_parallel_embedding"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const int64_t N = int64_t(inside.size()), D = w_shape[1];
    Tensor dout = g.contiguous().view({N, D}).clone();
    float* p = dout.data<float>();
    for (int64_t i = 0; i < N; ++i)
      if (!inside[size_t(i)]) std::fill(p + i * D, p + (i + 1) * D, 0.f);
    Tensor dw = Tensor::zeros(w_shape, DType::f32);
    backend_for(dw.device()).embedding_backward(dout, ids_local, dw);
    return {dw};
  }
  void release() override { ids_local = Tensor(); }
};

struct VocabCrossEntropyNode final : Node {
  Tensor h, w, probs;  // probs (N, Vl): softmax over the full vocabulary, this rank's columns
  std::vector<int32_t> local_target;  // column of the target on this rank, or -1
  std::vector<uint8_t> valid;
  double n_valid = 0;
  dist::Communicator* tp = nullptr;
  const char* name() const override { return "vocab_parallel_cross_entropy"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const float scale = float(g.item() / n_valid);
    const int64_t N = probs.size(0), Vl = probs.size(1);
    Tensor dlogits = probs.clone();
    float* p = dlogits.data<float>();
    for (int64_t i = 0; i < N; ++i) {
      float* row = p + i * Vl;
      if (!valid[size_t(i)]) {
        std::fill(row, row + Vl, 0.f);
        continue;
      }
      if (local_target[size_t(i)] >= 0) row[local_target[size_t(i)]] -= 1.f;
      for (int64_t j = 0; j < Vl; ++j) row[j] *= scale;
    }
    Backend& be = backend_for(h.device());
    Tensor dh = Tensor::zeros(h.shape(), DType::f32);
    be.gemm(dlogits, Trans::N, w, Trans::N, dh);  // (N, Vl) @ (Vl, D): this shard's share
    tp->all_reduce(dh, dist::ReduceOp::sum);
    Tensor dw = Tensor::zeros(w.shape(), DType::f32);
    be.gemm(dlogits, Trans::T, h, Trans::N, dw);  // (Vl, N) @ (N, D)
    return {next[0] ? dh : Tensor(), next[1] ? dw : Tensor()};
  }
  void release() override { h = w = probs = Tensor(); }
};
}  // namespace

Tensor vocab_parallel_embedding(const Tensor& w_local, const Tensor& ids, dist::Communicator& tp) {
  check_cpu_f32(w_local, "vocab_parallel_embedding");
  const int64_t Vl = w_local.size(0), D = w_local.size(1), v0 = tp.rank() * Vl;
  std::vector<int32_t> id = ids.contiguous().to_vector<int32_t>(), local(id.size());
  std::vector<uint8_t> inside(id.size());
  for (size_t i = 0; i < id.size(); ++i) {
    inside[i] = id[i] >= v0 && id[i] < v0 + Vl;
    local[i] = inside[i] ? int32_t(id[i] - v0) : 0;
  }
  const int64_t N = int64_t(id.size());
  Tensor idl = Tensor::from_vector(local, {N});
  Tensor out = Tensor::empty({N, D}, DType::f32);
  backend_for(out.device()).embedding_forward(w_local.contiguous(), idl, out);
  float* p = out.data<float>();
  for (int64_t i = 0; i < N; ++i)
    if (!inside[size_t(i)]) std::fill(p + i * D, p + (i + 1) * D, 0.f);
  Shape os = ids.shape();
  os.push_back(D);
  out = out.view(os);
  if (autograd::any_requires_grad({&w_local})) {
    auto n = std::make_shared<VocabEmbeddingNode>();
    n->ids_local = idl;
    n->inside = std::move(inside);
    n->w_shape = w_local.shape();
    n->next = {autograd::edge(w_local)};
    autograd::set_history(out, n);
  }
  return dist::reduce_from_group(out, tp);
}

Tensor vocab_parallel_cross_entropy(const Tensor& h, const Tensor& w_local, const Tensor& targets,
                                    dist::Communicator& tp) {
  check_cpu_f32(h, "vocab_parallel_cross_entropy");
  check_cpu_f32(w_local, "vocab_parallel_cross_entropy");
  const int64_t N = h.size(0), Vl = w_local.size(0), v0 = tp.rank() * Vl;
  Tensor hc = h.contiguous(), wc = w_local.contiguous();
  Tensor logits = Tensor::zeros({N, Vl}, DType::f32);
  backend_for(h.device()).gemm(hc, Trans::N, wc, Trans::T, logits);
  std::vector<int32_t> tg = targets.contiguous().to_vector<int32_t>();
  const float* L = logits.data<float>();
  // Row max, then sum of exp and target logit, each all-reduced over the vocabulary shards.
  Tensor mx = Tensor::empty({N}, DType::f32);
  for (int64_t i = 0; i < N; ++i) mx.data<float>()[i] = *std::max_element(L + i * Vl, L + (i + 1) * Vl);
  tp.all_reduce(mx, dist::ReduceOp::max);
  Tensor st = Tensor::zeros({2, N}, DType::f64);  // row 0: sum exp, row 1: target logit
  double* sp = st.data<double>();
  auto n = std::make_shared<VocabCrossEntropyNode>();
  n->local_target.assign(size_t(N), -1);
  n->valid.assign(size_t(N), 0);
  for (int64_t i = 0; i < N; ++i) {
    const float m = mx.data<float>()[i];
    double s = 0;
    for (int64_t j = 0; j < Vl; ++j) s += std::exp(double(L[i * Vl + j] - m));
    sp[i] = s;
    n->valid[size_t(i)] = tg[size_t(i)] >= 0;
    if (tg[size_t(i)] >= v0 && tg[size_t(i)] < v0 + Vl) {
      n->local_target[size_t(i)] = int32_t(tg[size_t(i)] - v0);
      sp[N + i] = L[i * Vl + (tg[size_t(i)] - v0)];
    }
  }
  tp.all_reduce(st, dist::ReduceOp::sum);
  double loss = 0;
  for (int64_t i = 0; i < N; ++i)
    if (n->valid[size_t(i)]) {
      loss += std::log(sp[i]) + mx.data<float>()[i] - sp[N + i];
      n->n_valid += 1;
    }
  LLAMA3_CHECK(n->n_valid > 0, "vocab_parallel_cross_entropy: no valid targets");
  Tensor out = Tensor::from_vector(std::vector<float>{float(loss / n->n_valid)}, {1});
  if (autograd::any_requires_grad({&h, &w_local})) {
    // Softmax of this rank's columns with the global normaliser, kept for the backward.
    float* P = logits.data<float>();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < Vl; ++j)
        P[i * Vl + j] = float(std::exp(double(P[i * Vl + j] - mx.data<float>()[i])) / sp[i]);
    n->h = hc;
    n->w = wc;
    n->probs = logits;
    n->tp = &tp;
    n->next = {autograd::edge(h), autograd::edge(w_local)};
    autograd::set_history(out, n);
  }
  return out;
}

}  // namespace llama3::text
