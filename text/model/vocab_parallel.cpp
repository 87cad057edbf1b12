#include "text/model/vocab_parallel.h"

#include <algorithm>
#include <cmath>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/dist/comm_ops.h"

namespace llama3::text {

namespace {
void check_f32(const Tensor& t, const Device& d, const char* what) {
  LLAMA3_CHECK(t.dtype() == DType::f32 && t.device() == d,
               "{}: vocabulary parallelism needs f32 on {}, got {}", what, d.str(), t.str());
}

// Zeroes the rows of t (N, D) whose id is outside this rank's range, one fill per run of
// consecutive such rows: device-generic (a fill kernel per run on CUDA), and on the CPU the
// same zeros std::fill wrote.
void zero_outside_rows(Tensor& t, const std::vector<uint8_t>& inside) {
  const int64_t N = int64_t(inside.size());
  for (int64_t i = 0; i < N;) {
    if (inside[size_t(i)]) {
      ++i;
      continue;
    }
    int64_t j = i;
    while (j < N && !inside[size_t(j)]) ++j;
    Tensor run = t.narrow(0, i, j - i);
    run.fill_(0.0);
    i = j;
  }
}

// The softmax statistics are host arithmetic: a chunk's logits are read (and its dlogits
// written) in host memory - the tensor's own on the CPU, a copy on another device (one
// (rows, V/tp) round trip per chunk; the CUDA kernels are not changed for this).
float* host_rows(Tensor& t, std::vector<float>& copy) {
  if (t.device().is_cpu()) return t.data<float>();
  copy = t.to_vector<float>();
  return copy.data();
}
void write_back(Tensor& t, const std::vector<float>& copy) {
  if (!t.device().is_cpu())
    backend_for(t.device()).copy_from_host(copy.data(), copy.size() * sizeof(float), t);
}

struct VocabEmbeddingNode final : Node {
  Tensor ids_local;            // (N) clamped local ids
  std::vector<uint8_t> inside;  // row i's id is in this rank's range
  Shape w_shape;
  const char* name() const override { return "vocab_parallel_embedding"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const int64_t N = int64_t(inside.size()), D = w_shape[1];
    Tensor dout = g.contiguous().view({N, D}).clone();
    zero_outside_rows(dout, inside);
    Tensor dw = Tensor::zeros(w_shape, DType::f32, g.device());
    backend_for(dw.device()).embedding_backward(dout, ids_local, dw);
    return {dw};
  }
  void release() override { ids_local = Tensor(); }
};

// Rows' softmax statistics (global max and sum of exponentials) are kept, not the
// probabilities: the backward recomputes each chunk's (rows, V/tp) logits, so no more than one
// chunk of them exists at a time in either direction.
struct VocabCrossEntropyNode final : Node {
  Tensor h, w;  // the GEMM operands: f32, or their bf16 copies under mixed precision
  std::vector<float> mx;               // per row: max logit over the full vocabulary
  std::vector<double> sum_exp;         // per row: sum of exp(logit - max) over the full vocabulary
  std::vector<int32_t> local_target;  // column of the target on this rank, or -1
  std::vector<uint8_t> valid;
  double n_valid = 0;
  int64_t chunk = 0;
  dist::Communicator* tp = nullptr;
  const char* name() const override { return "vocab_parallel_cross_entropy"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    const float scale = float(g.item() / n_valid);
    const int64_t N = h.size(0), Vl = w.size(0);
    Backend& be = backend_for(h.device());
    const bool low = h.dtype() == DType::bf16;
    const Device dev = h.device();
    Tensor dh = Tensor::zeros(h.shape(), DType::f32, dev);
    Tensor dw = Tensor::zeros(w.shape(), DType::f32, dev);
    Tensor dlow;  // bf16 copy of a chunk's dlogits (mixed precision)
    std::vector<float> host;
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t C = std::min(chunk, N - r0);
      Tensor hc = h.narrow(0, r0, C);
      Tensor dlogits = Tensor::empty({C, Vl}, DType::f32, dev);
      be.gemm(hc, Trans::N, w, Trans::T, dlogits);
      float* p = host_rows(dlogits, host);
      for (int64_t i = 0; i < C; ++i) {
        const size_t r = size_t(r0 + i);
        float* row = p + i * Vl;
        if (!valid[r]) {
          std::fill(row, row + Vl, 0.f);
          continue;
        }
        for (int64_t j = 0; j < Vl; ++j) row[j] = float(std::exp(double(row[j] - mx[r])) / sum_exp[r]);
        if (local_target[r] >= 0) row[local_target[r]] -= 1.f;
        for (int64_t j = 0; j < Vl; ++j) row[j] *= scale;
      }
      write_back(dlogits, host);
      Tensor dhc = dh.narrow(0, r0, C);
      Tensor gl = dlogits;
      if (low) {
        if (!dlow.defined()) dlow = Tensor::empty({std::min(chunk, N), Vl}, DType::bf16, dev);
        gl = dlow.narrow(0, 0, C);
        gl.copy_(dlogits);
      }
      be.gemm(gl, Trans::N, w, Trans::N, dhc);  // (C, Vl) @ (Vl, D): this shard's share
      be.gemm(gl, Trans::T, hc, Trans::N, dw, 1.f, r0 ? 1.f : 0.f);  // dW += (Vl, C) @ (C, D)
    }
    tp->all_reduce(dh, dist::ReduceOp::sum);
    return {next[0] ? dh : Tensor(), next[1] ? dw : Tensor()};
  }
  void release() override { h = w = Tensor(); }
};
}  // namespace

Tensor vocab_parallel_embedding(const Tensor& w_local, const Tensor& ids, dist::Communicator& tp) {
  check_f32(w_local, w_local.device(), "vocab_parallel_embedding");
  const Device dev = w_local.device();
  const int64_t Vl = w_local.size(0), D = w_local.size(1), v0 = tp.rank() * Vl;
  std::vector<int32_t> id = ids.contiguous().to_vector<int32_t>(), local(id.size());
  std::vector<uint8_t> inside(id.size());
  for (size_t i = 0; i < id.size(); ++i) {
    inside[i] = id[i] >= v0 && id[i] < v0 + Vl;
    local[i] = inside[i] ? int32_t(id[i] - v0) : 0;
  }
  const int64_t N = int64_t(id.size());
  Tensor idl = Tensor::from_vector(local, {N}, dev);
  Tensor out = Tensor::empty({N, D}, DType::f32, dev);
  backend_for(dev).embedding_forward(w_local.contiguous(), idl, out);
  zero_outside_rows(out, inside);
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
                                    dist::Communicator& tp, int64_t chunk_rows,
                                    ops::Precision precision) {
  const Device dev = h.device();
  check_f32(h, dev, "vocab_parallel_cross_entropy");
  check_f32(w_local, dev, "vocab_parallel_cross_entropy");
  const int64_t N = h.size(0), Vl = w_local.size(0), v0 = tp.rank() * Vl;
  const int64_t chunk = chunk_rows > 0 ? std::min(chunk_rows, std::max<int64_t>(N, 1)) : std::max<int64_t>(N, 1);
  Tensor hc = h.contiguous(), wc = w_local.contiguous();
  // Mixed precision: bf16 GEMM operands, rounded once and kept for the backward (half the
  // bytes of the f32 ones); the logits come out of the GEMM in f32.
  if (precision == ops::Precision::bf16) hc = hc.to(DType::bf16), wc = wc.to(DType::bf16);
  std::vector<int32_t> tg = targets.contiguous().to_vector<int32_t>();
  LLAMA3_CHECK(int64_t(tg.size()) == N, "vocab_parallel_cross_entropy: {} targets for {} rows", tg.size(), N);
  auto n = std::make_shared<VocabCrossEntropyNode>();
  n->local_target.assign(size_t(N), -1);
  n->valid.assign(size_t(N), 0);
  n->mx.assign(size_t(N), 0.f);
  n->chunk = chunk;
  // Row max (all-reduced per chunk: the sum of exponentials needs it), then sum of exp and
  // target logit of every row, all-reduced once over the vocabulary shards.
  // The statistics are host arithmetic; what is all-reduced goes through the device's memory
  // (the communicator's: NCCL reduces device buffers) and back.
  Tensor st = Tensor::zeros({2, N}, DType::f64);  // row 0: sum exp, row 1: target logit
  double* sp = st.data<double>();
  Backend& be = backend_for(dev);
  Tensor logits = Tensor::empty({chunk, Vl}, DType::f32, dev);
  std::vector<float> host;
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t C = std::min(chunk, N - r0);
    Tensor lc = logits.narrow(0, 0, C);
    be.gemm(hc.narrow(0, r0, C), Trans::N, wc, Trans::T, lc);
    const float* L = host_rows(lc, host);
    std::vector<float> mv(static_cast<size_t>(C));
    for (int64_t i = 0; i < C; ++i) mv[size_t(i)] = *std::max_element(L + i * Vl, L + (i + 1) * Vl);
    Tensor mx = Tensor::from_vector(mv, {C}, dev);
    tp.all_reduce(mx, dist::ReduceOp::max);
    mv = mx.to_vector<float>();
    for (int64_t i = 0; i < C; ++i) {
      const int64_t r = r0 + i;
      const float m = mv[size_t(i)];
      n->mx[size_t(r)] = m;
      double s = 0;
      for (int64_t j = 0; j < Vl; ++j) s += std::exp(double(L[i * Vl + j] - m));
      sp[r] = s;
      n->valid[size_t(r)] = tg[size_t(r)] >= 0;
      if (tg[size_t(r)] >= v0 && tg[size_t(r)] < v0 + Vl) {
        n->local_target[size_t(r)] = int32_t(tg[size_t(r)] - v0);
        sp[N + r] = L[i * Vl + (tg[size_t(r)] - v0)];
      }
    }
  }
  if (dev.is_cpu()) {
    tp.all_reduce(st, dist::ReduceOp::sum);
  } else {
    Tensor sd = st.to(dev);  // f64 on a device is only copied, never computed on
    tp.all_reduce(sd, dist::ReduceOp::sum);
    st = sd.to(Device::cpu());
    sp = st.data<double>();
  }
  double loss = 0;
  for (int64_t i = 0; i < N; ++i)
    if (n->valid[size_t(i)]) {
      loss += std::log(sp[i]) + n->mx[size_t(i)] - sp[N + i];
      n->n_valid += 1;
    }
  LLAMA3_CHECK(n->n_valid > 0, "vocab_parallel_cross_entropy: no valid targets");
  Tensor out = Tensor::from_vector(std::vector<float>{float(loss / n->n_valid)}, {1}, dev);
  if (autograd::any_requires_grad({&h, &w_local})) {
    n->sum_exp.assign(sp, sp + N);
    n->h = hc;
    n->w = wc;
    n->tp = &tp;
    n->next = {autograd::edge(h), autograd::edge(w_local)};
    autograd::set_history(out, n);
  }
  return out;
}

}  // namespace llama3::text
