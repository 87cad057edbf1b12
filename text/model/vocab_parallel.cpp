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
// chunk of them exists at a time in either direction. Everything stays on the device.
struct VocabCrossEntropyNode final : Node {
  Tensor h, w;         // the GEMM operands: f32, or their bf16 copies under mixed precision
  Tensor mx, sum_exp;  // (N) f32: global row max, sum of exp(logit - max) over the full vocabulary
  Tensor targets;      // (N) int32 global ids on the device
  int64_t v0 = 0;      // first vocabulary row of this rank
  double n_valid = 0;
  int64_t chunk = 0;
  dist::Communicator* tp = nullptr;
  const char* name() const override { return "vocab_parallel_cross_entropy"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    // The incoming gradient is the one host read of the backward (a synchronisation on CUDA).
    const float scale = float(g.item() / n_valid);
    const int64_t N = h.size(0), Vl = w.size(0);
    Backend& be = backend_for(h.device());
    const bool low = h.dtype() == DType::bf16;
    const Device dev = h.device();
    Tensor dh = Tensor::zeros(h.shape(), DType::f32, dev);
    Tensor dw = Tensor::zeros(w.shape(), DType::f32, dev);
    Tensor dlow;  // bf16 copy of a chunk's dlogits (mixed precision)
    Tensor buf = Tensor::empty({std::min(chunk, N), Vl}, DType::f32, dev);
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t C = std::min(chunk, N - r0);
      Tensor hc = h.narrow(0, r0, C);
      Tensor dlogits = buf.narrow(0, 0, C);
      be.gemm(hc, Trans::N, w, Trans::T, dlogits);
      be.vocab_shard_dlogits(dlogits, mx.narrow(0, r0, C), sum_exp.narrow(0, r0, C),
                             targets.narrow(0, r0, C), v0, scale);
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
  void release() override { h = w = mx = sum_exp = targets = Tensor(); }
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
  LLAMA3_CHECK(targets.numel() == N && targets.dtype() == DType::i32,
               "vocab_parallel_cross_entropy: targets {} for {} rows (int32)", targets.str(), N);
  const Tensor tg = targets.contiguous().view({N}).to(dev);
  auto n = std::make_shared<VocabCrossEntropyNode>();
  n->chunk = chunk;
  // Row max (all-reduced per chunk: the sum of exponentials needs it), then sum of exp and
  // target logit of every row, all-reduced once over the vocabulary shards. All of it is
  // backend kernels on the device; the loss reaches the host as one scalar (and the count of
  // valid rows as another).
  Backend& be = backend_for(dev);
  Tensor mx = Tensor::empty({N}, DType::f32, dev);
  Tensor st = Tensor::zeros({2 * N}, DType::f32, dev);  // [0, N): sum exp, [N, 2N): target logit
  Tensor sum_exp = st.narrow(0, 0, N), tlogit = st.narrow(0, N, N);
  Tensor logits = Tensor::empty({chunk, Vl}, DType::f32, dev);
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t C = std::min(chunk, N - r0);
    Tensor lc = logits.narrow(0, 0, C);
    be.gemm(hc.narrow(0, r0, C), Trans::N, wc, Trans::T, lc);
    Tensor mc = mx.narrow(0, r0, C);
    be.vocab_shard_max(lc, mc);
    tp.all_reduce(mc, dist::ReduceOp::max);
    Tensor sc = sum_exp.narrow(0, r0, C), tc = tlogit.narrow(0, r0, C);
    be.vocab_shard_stats(lc, mc, tg.narrow(0, r0, C), v0, sc, tc);
  }
  tp.all_reduce(st, dist::ReduceOp::sum);
  Tensor rows = Tensor::empty({2 * N}, DType::f32, dev);  // [0, N): row losses, [N, 2N): valid
  Tensor row_loss = rows.narrow(0, 0, N), row_valid = rows.narrow(0, N, N);
  be.vocab_row_loss(mx, sum_exp, tlogit, tg, row_loss, row_valid);
  n->n_valid = be.sum(row_valid);
  LLAMA3_CHECK(n->n_valid > 0, "vocab_parallel_cross_entropy: no valid targets");
  const double loss = be.sum(row_loss);
  Tensor out = Tensor::from_vector(std::vector<float>{float(loss / n->n_valid)}, {1}, dev);
  if (autograd::any_requires_grad({&h, &w_local})) {
    n->mx = mx;
    n->sum_exp = sum_exp;
    n->targets = tg;
    n->v0 = v0;
    n->h = hc;
    n->w = wc;
    n->tp = &tp;
    n->next = {autograd::edge(h), autograd::edge(w_local)};
    autograd::set_history(out, n);
  }
  return out;
}

}  // namespace llama3::text
