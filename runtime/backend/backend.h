// Backend: the interface every device implements (CPU here, CUDA in runtime/cuda). Ops in
// runtime/ops call these kernels; model code never sees a backend. Kernels take tensors
// already on the backend's device, contiguous unless a kernel says otherwise, and do no
// autograd.
//
// Gradient convention for the *_backward kernels (as in llm.c): parameter gradients are
// accumulated (`+=`), activation gradients are written (`=`).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/core/tensor.h"

namespace llama3 {

enum class Trans : uint8_t { N, T };

// How attention may compute its products (QK^T, PV and the backward's).
//   exact: in the input dtype's precision with f32 accumulation (f32 inputs: f32 throughout).
//   bf16:  the backend may compute the products in bf16 with f32 accumulation (tensor
//          cores on CUDA); softmax, lse and the outputs stay f32 for f32 inputs. CPU ignores it.
enum class AttnCompute : uint8_t { exact, bf16 };

struct AttentionParams {
  float scale = 0.f;     // softmax scale (1/sqrt(head_dim) when 0)
  bool causal = true;
  // (B, Tk) int32 document ids of the keys; a query attends only to keys of its own
  // document (ids form contiguous non-decreasing runs). Undefined: one document per row.
  Tensor doc_ids;
  // (Tq) int32: each query's position among the keys, for Tq != Tk (KV-cache decoding,
  // context-parallel chunks). Causal then means key j <= q_pos[i], and a query's document
  // is doc_ids[q_pos[i]]. Undefined: Tq == Tk and query i sits at position i.
  Tensor q_pos;
  // bf16: the backend may compute the products in bf16 with f32 accumulation; CPU ignores it.
  // Set by the model in bf16 mixed precision (ops::Precision::bf16).
  AttnCompute compute = AttnCompute::exact;
};

struct AdamWParams {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.f;
  int64_t step = 1;  // 1-based step for bias correction
  float grad_scale = 1.f;  // multiplies the gradient first (clipping)
  // Captured steps (CUDA graphs): a graph replays its kernels with the arguments they had at
  // capture, so what changes from step to step is read from device memory instead. When
  // defined, an f32 tensor of AdamWDynamic::size elements on the param's device, whose
  // values the update reads when it runs in place of grad_scale and of the scalars derived
  // from lr and step (adamw_step_scalars); weight_decay then only says whether the
  // parameter decays (decay from the tensor) or not (decay 1). Non-zero skip: the update
  // leaves param, moments and copy unchanged (a non-finite step).
  Tensor dynamic;
};

// One parameter of Backend::adamw_step_many: its tensors, as adamw_step takes them (handles:
// the update writes param, m, v and param_bf16 in place), and its decay group's weight decay.
struct AdamWItem {
  Tensor param, grad, m, v;
  Tensor param_bf16;  // undefined: no bf16 copy
  float weight_decay = 0.f;
};

// What Backend::linear_cross_entropy_keep leaves for linear_cross_entropy_grad (device
// tensors of the backend that made them).
struct CrossEntropyKept {
  Tensor logits;  // (N, V), the dtype the backend chose
  Tensor stats;   // (N, 2) f32: each row's max and sum-exp
  Tensor count;   // loss_div 0: the count made on the device, whose inverse scales the gradient
  float grad_scale = 0.f;
};

// The per-step scalars of an update, computed alike by every backend (torch's single-tensor
// AdamW): step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step) and
// decay = 1 - lr * weight_decay, in f32.
struct AdamWStepScalars {
  float step_size, bc2_sqrt, decay;
};
AdamWStepScalars adamw_step_scalars(const AdamWParams& p);
// torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)), 1 when
// max_norm <= 0 (AdamW::step and grad_clip_state; the CUDA clip kernel computes the same).
float clip_factor(double norm, float max_norm);

// Layout of AdamWParams::dynamic: norm, grad_scale and skip are written on the device by
// Backend::grad_clip_state, the rest by the host before each replay.
struct AdamWDynamic {
  enum : int64_t { norm, grad_scale, skip, step_size, bc2_sqrt, decay, size };
};

// A recorded sequence of one backend's device work (Backend::capture), run again by
// replay() with one launch and no host code.
class DeviceGraph {
 public:
  virtual ~DeviceGraph() = default;
  // Enqueues the recorded work on the backend's stream (asynchronous, like a kernel).
  virtual void replay() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  virtual Allocator& allocator() = 0;
  virtual void synchronize() {}
  // Whether bf16 mixed precision should keep the activations that run from one GEMM to the
  // next through element-wise ops and attention (q/k/v -> RoPE -> attention -> o; gate/up ->
  // SwiGLU -> down; and their gradients) in bf16, as autocast does: true where those kernels
  // read and write bf16 natively (CUDA: half the memory traffic and no casts), false where
  // they compute in f32 only (CPU), so the model stays one code path either way. The
  // residual stream, norms and losses stay f32.
  virtual bool bf16_activations() const { return false; }
  // Whether weight-gradient kernels should add into the gradient a weight holds from earlier
  // micro-batches (the linear dW GEMMs with beta 1, the embedding rows, the classifier's
  // scaled dW) rather than produce a fresh gradient for a separate add over the weight: true
  // on CUDA (one pass over each such gradient fewer per micro-batch; its sums are not
  // bitwise reproducible there anyway, with atomics); false on CPU, where oneDNN's sum
  // post-op made a 4-micro-batch step about 5% slower than the add (bench/RESULTS.md) and
  // the separate adds keep data parallelism bitwise equal to accumulation.
  virtual bool accumulate_weight_grads_in_place() const { return false; }
  // Rows per cross-entropy chunk when the caller leaves the choice to the backend (a model's
  // ce_chunk of 0): CPU 1024, which keeps a chunk's logits in cache-friendly pieces; CUDA
  // more (cuda_backend.cpp).
  virtual int64_t cross_entropy_chunk(int64_t vocab) const {
    (void)vocab;
    return 1024;
  }

  // ---- memory ----
  // Strided copy with dtype conversion; src and dst on this device (or host for CPU).
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  virtual void copy_to_host(const Tensor& src, void* dst, size_t bytes) = 0;     // contiguous src
  virtual void copy_from_host(const void* src, size_t bytes, Tensor& dst) = 0;  // contiguous dst
  virtual void fill(Tensor& t, double value) = 0;

  // ---- GEMM ----
  // c = alpha * op(a) @ op(b) + beta * c for 2D a, b, c (row-major, unit stride in the
  // last dim, any row stride), or 3D with a leading batch dim. f32/f64 inputs, or bf16
  // inputs with f32 c (f32 accumulation).
  virtual void gemm(const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c,
                    float alpha = 1.f, float beta = 0.f) = 0;
  // d = op(a) @ op(b) + c, c distinct from d with its dtype, shape and strides: a projection
  // and the residual add after it. The default is gemm into d, then add(c, d) (bitwise what
  // a separate add gives); CUDA reads c in the GEMM's epilogue instead.
  virtual void gemm_add(const Tensor& a, Trans ta, const Tensor& b, Trans tb, const Tensor& c,
                        Tensor& d);

  // ---- element-wise ----
  virtual void add(const Tensor& a, const Tensor& b, Tensor& out) = 0;            // out = a + b
  virtual void axpy(float alpha, const Tensor& x, Tensor& y) = 0;                 // y += alpha x
  virtual void scale(Tensor& x, float alpha) = 0;                                 // x *= alpha
  virtual double sum_squares(const Tensor& x) = 0;                                // f64 accumulation
  virtual double sum(const Tensor& x) = 0;
  virtual bool all_finite(const Tensor& x) = 0;
  // sum over i of weights[i] * sum_squares(xs[i]) (weights empty: all 1), for the global
  // gradient norm; non-finite when any element is (the f64 squares of f32/bf16 values cannot
  // overflow), so the norm doubles as the finiteness check. The default calls sum_squares per
  // tensor, in order; CUDA sums the f32 tensors in a few multi-tensor launches (f64, the same
  // bits on every run) and reads the result back once.
  virtual double sum_squares_many(const std::vector<Tensor>& xs,
                                  const std::vector<double>& weights);
  // The clipping state of a step, without reading anything back to the host: from the
  // gradients xs (as sum_squares_many, all weights 1), writes into state (f32, on this
  // device; AdamWDynamic) norm = sqrt of the f64 sum of squares (summed in tensor order),
  // grad_scale = min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_ (1 when
  // max_norm <= 0), and skip = 1 when the norm or loss (f32, one element; may be undefined)
  // is non-finite, or a check deferred by a capture has failed (check_deferred() will
  // throw), else 0. The default computes them on the host (synchronising).
  virtual void grad_clip_state(const std::vector<Tensor>& xs, const Tensor& loss, float max_norm,
                               Tensor& state);
  // x *= s[0], s a one-element f32 tensor on this device read when the kernel runs (an
  // upstream gradient inside a captured step). The default reads s on the host.
  virtual void scale_by(Tensor& x, const Tensor& s);
  // y += s[0] x, s read when the kernel runs (as scale_by). The default reads s on the host.
  virtual void axpy_by(const Tensor& s, const Tensor& x, Tensor& y);

  // ---- fused Llama kernels ----
  // ids (N) int32, weight (V, D) -> out (N, D)
  virtual void embedding_forward(const Tensor& weight, const Tensor& ids, Tensor& out) = 0;
  virtual void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dweight) = 0;

  // x (N, D), w (D) -> y (N, D), rstd (N) f32
  virtual void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y,
                               Tensor& rstd) = 0;
  // dw accumulates (+=); dx is written, or added to (+=) when accumulate_dx (the residual
  // stream's gradient summed in place: one pass fewer than a separate add).
  virtual void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                const Tensor& rstd, Tensor& dx, Tensor& dw,
                                bool accumulate_dx) = 0;
  // The same, also writing dx_bf16 = the bf16 rounding of dx's new value (f32 x): the gradient
  // the residual stream hands a bf16 GEMM (autograd's Node::offer_bf16), written with it
  // instead of cast by a pass that reads it again. The default casts after.
  virtual void rmsnorm_backward_bf16(const Tensor& dy, const Tensor& x, const Tensor& w,
                                     const Tensor& rstd, Tensor& dx, Tensor& dw, bool accumulate_dx,
                                     Tensor& dx_bf16) {
    rmsnorm_backward(dy, x, w, rstd, dx, dw, accumulate_dx);
    copy(dx, dx_bf16);
  }
  // The same with dy the sum of dys (1 to 4 tensors of x's shape, f32 or bf16, added in f32
  // in their order): the gradients of the projections that read one norm output, taken apart
  // (autograd's Node::grad_parts) so that no pass sums them first; dx_bf16 as in
  // rmsnorm_backward_bf16 when not null. The default sums them into an f32 tensor first
  // (runtime/backend/rmsnorm_parts.cpp).
  virtual void rmsnorm_backward_parts(const std::vector<Tensor>& dys, const Tensor& x,
                                      const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                                      bool accumulate_dx, Tensor* dx_bf16);

  // x (B, T, H, Dh) rotated in the HF "rotate_half" layout with inv_freq (Dh/2) at
  // positions pos (T) int32: out = x*cos + rotate_half(x)*sin. inverse=true applies the
  // transpose rotation (the backward). inv_freq is f32 (f64 for f64 x) whatever x's dtype, and
  // the angles pos * inv_freq are computed in it, as HF does: bf16 frequencies would put a
  // bf16 step's angles radians off a few thousand positions in.
  virtual void rope(const Tensor& x, const Tensor& inv_freq, const Tensor& pos, bool inverse,
                    Tensor& out) = 0;

  // q (B, Tq, H, Dh), k/v (B, Tk, Hkv, Dh) -> out (B, Tq, H, Dh), lse (B, H, Tq) f32 (f64
  // for f64 inputs; bf16 inputs may also pass a bf16 lse). Tq == Tk unless p.q_pos is given.
  // Computed tile by tile (online softmax); no (T, T) matrix is materialised.
  virtual void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const AttentionParams& p, Tensor& out, Tensor& lse) = 0;
  virtual void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& out, const Tensor& lse,
                                  const AttentionParams& p, Tensor& dq, Tensor& dk,
                                  Tensor& dv) = 0;

  // out = silu(gate) * up, all (N, F)
  virtual void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  virtual void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up,
                               Tensor& dgate, Tensor& dup) = 0;

  // Cross-entropy of logits = h @ w^T over rows with targets >= 0, processed in chunks of
  // `chunk` rows so full-vocabulary logits exist for one chunk only. Returns the summed
  // loss over valid rows. When dh/dw are defined it also writes dh (N, D) and dw (V, D)
  // (both =, not +=: the first chunk's dW GEMM overwrites, so dw needs no zero fill and no
  // read-back of zeros) for the loss scaled by grad_scale (e.g. 1/n_valid).
  // h and w may be bf16 (mixed precision); dh/dw are f32.
  // loss_out (optional; one-element f32 on this device): float(summed loss / loss_div) is
  // written there instead and the call returns 0 without synchronising (a captured step); a
  // target outside the vocabulary is then reported by check_deferred(). loss_div 0 there:
  // the mean over the targets >= 0 counted on the device, whose inverse also replaces
  // grad_scale (the count need not be known on the host, nor the same from one replay to
  // the next); no such target is reported by check_deferred() too.
  virtual double linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                                      int64_t chunk, float grad_scale, Tensor* dh, Tensor* dw,
                                      Tensor* loss_out = nullptr, double loss_div = 1.0) = 0;

  // linear_cross_entropy's loss with its gradient deferred to linear_cross_entropy_grad,
  // for a gradient scaled by a factor known only later (the backward's upstream gradient,
  // read on the device) and a dw added into the weight's gradient from earlier micro-batches
  // by the dW GEMM itself (beta 1) instead of a separate scaled add (about 2 GB less traffic
  // per micro-batch at vocabulary 128256). Computes the loss with linear_cross_entropy's
  // conventions for grad_scale, loss_out and loss_div (the eager total into *total) and
  // keeps the logits and each row's softmax statistics in `kept`. Returns false, doing
  // nothing, where the backend has no deferred form (the default) or the rows do not fit
  // one chunk of `chunk` rows (0: the backend's choice).
  virtual bool linear_cross_entropy_keep(const Tensor& h, const Tensor& w, const Tensor& targets,
                                         int64_t chunk, float grad_scale, CrossEntropyKept& kept,
                                         double* total, Tensor* loss_out = nullptr,
                                         double loss_div = 1.0);
  // The deferred gradient: dh (=) and dw (=, or += with accumulate_dw) of the kept loss
  // scaled by g[0] (one f32 on this device, read when the kernels run) times its grad_scale
  // (or the inverse of the count made on the device). h, w and targets as given to
  // linear_cross_entropy_keep; kept is consumed (the logits become their gradient). The
  // default fails.
  virtual void linear_cross_entropy_grad(CrossEntropyKept& kept, const Tensor& h, const Tensor& w,
                                         const Tensor& targets, const Tensor& g, Tensor& dh,
                                         Tensor* dw, bool accumulate_dw);

  // Per-row log-probability log_softmax(h @ w^T)[target] of rows with target >= 0 (0 for
  // the others) into logp (N), in chunks of `chunk` rows so full-vocabulary logits exist
  // for one chunk only. When row_grad (N) is defined it also writes dh (N, D) (=) and
  // accumulates dw (V, D) (+=) for the objective sum_r row_grad[r] * logp[r].
  // The base implementation runs the GEMMs through gemm() on the device and the softmax on
  // the host, so every backend has it; a backend may override it with a fused kernel.
  virtual void token_logprobs(const Tensor& h, const Tensor& w, const Tensor& targets,
                              int64_t chunk, Tensor& logp, const Tensor& row_grad, Tensor* dh,
                              Tensor* dw);

  // The softmax statistics of a vocabulary-parallel cross-entropy (text/model/vocab_parallel.cpp),
  // where this rank holds logits columns [v0, v0 + V) of each row and the statistics are
  // all-reduced over the shards between the calls, so none leaves the device. logits (C, V)
  // f32; targets (C) int32 global ids (< 0: the row has no target); the vectors (C) f32; all
  // contiguous.
  //   vocab_shard_max: mx[i] = max_j logits[i, j].
  //   vocab_shard_stats: sum_exp[i] = sum_j exp(logits[i, j] - mx[i]) (mx: the global row
  //     max), target_logit[i] = logits[i, targets[i] - v0] when the target is in the shard,
  //     else 0.
  //   vocab_shard_dlogits (in place): logits[i, j] = scale * (exp(logits[i, j] - mx[i]) /
  //     sum_exp[i] - [j == targets[i] - v0]); rows with targets[i] < 0 become 0.
  //   vocab_row_loss: loss[i] = log(sum_exp[i]) + mx[i] - target_logit[i] and valid[i] = 1
  //     for targets[i] >= 0; both 0 for the other rows.
  virtual void vocab_shard_max(const Tensor& logits, Tensor& mx) = 0;
  virtual void vocab_shard_stats(const Tensor& logits, const Tensor& mx, const Tensor& targets,
                                 int64_t v0, Tensor& sum_exp, Tensor& target_logit) = 0;
  virtual void vocab_shard_dlogits(Tensor& logits, const Tensor& mx, const Tensor& sum_exp,
                                   const Tensor& targets, int64_t v0, float scale) = 0;
  virtual void vocab_row_loss(const Tensor& mx, const Tensor& sum_exp, const Tensor& target_logit,
                              const Tensor& targets, Tensor& loss, Tensor& valid) = 0;

  // Fused AdamW on f32 params/moments; grad f32. Decoupled weight decay. param_bf16 (bf16,
  // param's shape, contiguous; optional): also written with the updated param rounded to
  // bf16, the copy the bf16 GEMMs of mixed precision use instead of casting the weight each
  // step (ops::WeightCopyTable); it equals param.to(bf16) bit for bit.
  virtual void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                          const AdamWParams& p, Tensor* param_bf16 = nullptr) = 0;
  // adamw_step on every item with p's scalars but the item's weight_decay (p.weight_decay is
  // unused), with the same results. CUDA runs it as a few multi-tensor launches
  // (LLAMA3_MULTI_TENSOR=0: one launch per parameter, for A/B timing); the default calls
  // adamw_step per item.
  virtual void adamw_step_many(const std::vector<AdamWItem>& items, const AdamWParams& p);

  // ---- graph capture (CUDA graphs) ----
  // Runs work() once with this backend's stream capturing: the device work it enqueues is
  // recorded, not run, into the returned graph, and every block it allocates belongs to the
  // graph (CachingAllocator private pool) until the graph is destroyed, so replays find
  // their buffers intact. work() must not synchronise (no reads back to the host: the
  // capture fails naming the call) and its host decisions must not depend on device data.
  // Throws where graphs are not supported (CPU).
  virtual std::unique_ptr<DeviceGraph> capture(const std::function<void()>& work);
  // True while capture() runs work(): ops then keep results on the device and defer checks
  // that would read back to the host (check_deferred).
  virtual bool capturing() const { return false; }
  // Reads and clears the checks kernels recorded during captured work instead of reading
  // them back at once (a token id or a target outside the vocabulary), and throws naming
  // the first that failed. Synchronises; call it after a replay.
  virtual void check_deferred() {}
};

// The backend for a device; throws listing the available devices if there is none.
Backend& backend_for(Device d);
// Registers a backend (the CUDA backend registers itself from cuda_init()).
void register_backend(Backend* b);
bool has_backend(Device d);

}  // namespace llama3
