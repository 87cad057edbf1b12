// Differentiable operations: the op table. Each op validates its inputs, runs its forward
// kernel on the inputs' backend, and (when grad mode is on and an input requires grad)
// records a Node whose hand-written backward sits beside it in ops.cpp. Every backward is
// checked against central finite differences in f64 (tests/unit/ops).
#pragma once

#include <algorithm>

#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/backend/backend.h"

namespace llama3::ops {

// GEMM input precision: f32, or bf16 inputs with f32 accumulation and f32 outputs
// (mixed precision; master weights and activations stay f32).
enum class Precision : uint8_t { f32, bf16 };

// Storage-sharing reshape that carries the gradient back.
Tensor reshape(const Tensor& x, const Shape& shape);

// ids (any shape) int32 -> (..., D) rows of weight (V, D).
Tensor embedding(const Tensor& weight, const Tensor& ids);

// x (..., in) @ w(out, in)^T -> (..., out). bf16_out (Precision::bf16 only): the output is
// bf16 (f32 accumulation rounded once, as under autocast), for activations that stay bf16
// until the next GEMM (q/k/v, the SwiGLU gate and up projections) so neither direction casts
// them. A bf16 x gets a bf16 gradient, or an f32 one with f32_grad (a bf16 normalised input
// shared by several projections, whose gradients should sum in f32).
//
// dx_hook (optional): the backward calls it with the input gradient dx (rows, in), fresh and
// contiguous, as soon as it is computed and before the weight-gradient GEMM; it may start an
// asynchronous operation on dx in place and returns what completes it (`finish`, called
// after the dW GEMM, so the two overlap) and optionally `progress`: then dW is computed in
// a few slices of output rows with progress() between them (for a library that advances a
// transfer only inside its own calls, as OpenMPI without a progress thread). Tensor
// parallelism uses it for the all-reduce of a column-parallel layer's input gradient
// (Megatron's asynchronous input-gradient all-reduce): the values are those of the same
// all-reduce applied after the node. Not called when x needs no gradient.
//
// out_hook (optional): the forward GEMM runs in up to 4 slices of output rows (tokens), of at
// least 32 rows each (fewer rows: one slice, so no slice takes a small-m kernel), and
// out_hook is called on each slice (rows, out), fresh and contiguous, as soon as it is
// computed; it may start an asynchronous operation on the slice in place. The progress() of
// the operations in flight is called between later slices, and every finish(), in slice
// order, after the last slice, before linear returns (so the output holds the completed
// results). Tensor parallelism uses it for the all-reduce of a row-parallel layer's partial
// output (Megatron-style chunked overlap of the forward all-reduce with the GEMM). Each
// output row is the same dot products as in the whole GEMM; the backward is unchanged.
struct DxPending {
  std::function<void()> progress;  // optional, between dW (dx_hook) / output (out_hook) slices
  std::function<void()> finish;    // after dW / the last output slice; may be empty
};
using DxHook = std::function<DxPending(Tensor& dx)>;
using OutHook = std::function<DxPending(Tensor& rows)>;
Tensor linear(const Tensor& x, const Tensor& w, Precision p = Precision::f32, bool bf16_out = false,
              bool f32_grad = false, const DxHook& dx_hook = {}, const OutHook& out_hook = {});
// residual + linear(x, w, p) as one op: a projection whose output joins the residual stream
// (attention's o and the MLP's down projection). The backend adds the residual in the GEMM
// (Backend::gemm_add: CUDA's epilogue reads it, so the projection's output is not written
// and read back by an add); the residual's gradient is the output's, as through ops::add.
// The same values as ops::add(residual, linear(x, w, p)) (bitwise on CPU, whose gemm_add is
// that add). The residual has the output's shape and dtype (f32, or f64 for f64 x).
Tensor linear_residual(const Tensor& x, const Tensor& w, const Tensor& residual,
                       Precision p = Precision::f32, const DxHook& dx_hook = {});

// bf16 copies of weights for the bf16 GEMMs of mixed precision, kept up to date by the
// optimizer that updates the weights (optim::AdamW::enable_bf16_copies writes each copy in the
// same pass as its update), so that linear and linear_cross_entropy do not cast every weight
// to bf16 on every step. A table maps a weight (same storage, offset and shape) to its copy;
// a copy counts only once it has been written (mark_written) and until invalidate(). Tables are
// consulted only inside a WeightCopiesScope on the calling thread: the loop that owns both the
// optimizer and the forward installs it, and inside it nothing but the optimizer writes the
// weights (anything else that writes them must invalidate the table). Bit-exact: a copy is
// the weight rounded to bf16, as the cast would make it.
class WeightCopyTable {
 public:
  // Adds a bf16 copy for weight w (f32, contiguous; not yet written); returns its index.
  size_t add(const Tensor& w);
  Tensor& copy(size_t i) { return copies_[i]; }
  void mark_written(size_t i) { written_[i] = true; }
  void invalidate() { written_.assign(written_.size(), false); }
  size_t size() const { return copies_.size(); }
  size_t written() const { return size_t(std::count(written_.begin(), written_.end(), true)); }
  // The written copy of exactly w, or an undefined tensor.
  Tensor find(const Tensor& w) const;

 private:
  std::vector<Tensor> weights_, copies_;
  std::vector<bool> written_;
};
class WeightCopiesScope {
 public:
  explicit WeightCopiesScope(const WeightCopyTable* t);  // null: no copies
  ~WeightCopiesScope();
  WeightCopiesScope(const WeightCopiesScope&) = delete;
  WeightCopiesScope& operator=(const WeightCopiesScope&) = delete;

 private:
  const WeightCopyTable* prev_;
};
// The bf16 form of weight w for a bf16 GEMM: w itself if bf16, its written copy in the
// table of the active scope, else w.to(bf16).
Tensor weight_bf16(const Tensor& w);

// Whether precision p on device d keeps the activations between GEMMs in bf16
// (Precision::bf16 on a backend whose Backend::bf16_activations() is true): the model asks
// this once per block and passes bf16_out / f32_grad accordingly.
bool bf16_activations(Precision p, const Device& d);

// Projections' input gradients summed by the norm (a candidate, off by default;
// LLAMA3_BF16_PROJ_GRADS=1 turns it on, set_bf16_projection_grads overrides per thread): the
// projections that read one bf16 norm output and ask for an f32 gradient (f32_grad) write
// their dx in bf16 instead, and the norm's backward sums them in f32 in its own kernel
// (Node::grad_parts, Backend::rmsnorm_backward_parts), as PyTorch's autocast rounds each
// projection's dx to bf16 and sums them in f32. In place of an f32 dx written by the first
// GEMM and read and rewritten by each further one (beta 1), then read by the norm: by bytes
// about 168 MB less a layer of the 1B step. Not under a dx_hook (a tensor-parallel
// all-reduce of dx keeps its f32 sum).
void set_bf16_projection_grads(bool on);
bool bf16_projection_grads();

// y = x / rms(x) * w over the last dim. bf16_out (f32 x): y rounded to bf16 once, for an
// output that only feeds bf16 GEMMs (x, rstd and dx stay f32).
Tensor rmsnorm(const Tensor& x, const Tensor& w, float eps, bool bf16_out = false);

// Rotary embedding (HF rotate_half layout) of x (B, T, H, Dh) at positions pos (T) int32
// with inverse frequencies inv_freq (Dh/2), used in f32 (f64 for f64 x) whatever x's dtype:
// the angles pos * inv_freq are f32 products, as in HF, also for bf16 activations.
Tensor rope(const Tensor& x, const Tensor& inv_freq, const Tensor& pos);

// Grouped-query attention: q (B, T, H, Dh), k/v (B, T, Hkv, Dh) -> (B, T, H, Dh).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionParams& p);

// silu(gate) * up.
Tensor swiglu(const Tensor& gate, const Tensor& up);

Tensor add(const Tensor& a, const Tensor& b);
Tensor scale(const Tensor& x, float alpha);

// sum(x * r) for a constant r of x's shape: turns any tensor into a scalar (tests, losses).
Tensor dot(const Tensor& x, const Tensor& r);

// Mean cross-entropy over rows with target >= 0 of logits = h @ w^T, computed in chunks
// of `chunk` rows (see Backend::linear_cross_entropy). h (N, D), w (V, D), targets (N).
struct CrossEntropyOptions {
  int64_t chunk = 1024;
  Precision precision = Precision::f32;
  // The number of targets >= 0 when the caller knows it (from host data); 0: counted here,
  // which reads the targets back to the host - except inside a captured step
  // (Backend::capture), where the backend counts them on the device at every replay.
  int64_t n_valid = 0;
};
Tensor linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                            const CrossEntropyOptions& opt = {});

// Summed log-probability of each sequence's targets: h (N, D) holds n_seq sequences of
// N / n_seq rows each, targets (N) int32 (rows with target < 0 contribute nothing);
// returns (n_seq) sum_r log_softmax(h_r @ w^T)[target_r], computed in chunks of `chunk`
// rows (logits are recomputed in backward, never stored). Used by DPO.
Tensor sequence_logprob(const Tensor& h, const Tensor& w, const Tensor& targets, int64_t n_seq,
                        int64_t chunk = 1024);

// mean_i softplus(-(scale * (a_i - b_i) - offset_i)) = mean_i -log sigmoid(...), for a, b
// (n) and an optional constant offset (n): the pairwise (Bradley-Terry) loss of reward
// models (scale 1, no offset) and DPO (scale beta, offset = beta * reference margin).
Tensor pairwise_logistic_loss(const Tensor& a, const Tensor& b, float scale,
                              const Tensor& offset = Tensor());

// Rows idx of x (N, D) -> (M, D); the backward scatters (adds) into those rows.
Tensor gather_rows(const Tensor& x, const std::vector<int64_t>& idx);

// Full logits h @ w^T (inference / generation / tests).
Tensor logits(const Tensor& h, const Tensor& w, Precision p = Precision::f32);

}  // namespace llama3::ops
