// Launchers of the CUDA kernels (runtime/cuda/*.cu), on raw device pointers. Kept free of
// Tensor and fmt so that nvcc compiles only plain CUDA; cuda_backend.cpp validates tensors
// and calls these. Every launcher enqueues on `s` and returns cudaGetLastError().
//
// Gradient convention (as backend.h): parameter gradients `+=`, activation gradients `=`.
#pragma once

#ifdef LLAMA3_CUDA_EMU
// Compiled as C++ against the SIMT emulator (tests of the kernels without a GPU); the
// launchers then live in an inline namespace, so they never collide with the real ones.
#include "runtime/cuda/emu/cuda_emu.h"
#define LLAMA3_CUDA_NS_BEGIN \
  namespace llama3::cuda {   \
  inline namespace emulated {
#define LLAMA3_CUDA_NS_END \
  }                        \
  }
#else
#include <cuda_runtime.h>
#define LLAMA3_CUDA_NS_BEGIN namespace llama3::cuda {
#define LLAMA3_CUDA_NS_END }
// Dynamic shared memory is declared through a macro the emulator replaces (as it does
// launch_kernel, common.cuh).
#define LLAMA3_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

#include <cstdint>

LLAMA3_CUDA_NS_BEGIN

// Element types the kernels understand (a subset of DType, numbered independently).
enum class KT : uint8_t { f32, bf16, f16, i32, i64, u8 };

constexpr int kMaxDims = 8;
struct Strided {
  int nd = 0;
  int64_t shape[kMaxDims] = {};
  int64_t src_stride[kMaxDims] = {};
  int64_t dst_stride[kMaxDims] = {};
};

// ---- memory ----
cudaError_t convert_contiguous(const void* src, KT st, void* dst, KT dt, int64_t n, cudaStream_t s);
cudaError_t copy_strided(const void* src, KT st, void* dst, KT dt, const Strided& d, int64_t n,
                         cudaStream_t s);
cudaError_t fill(void* dst, KT t, int64_t n, double value, cudaStream_t s);

// ---- element-wise (T = f32 or bf16, computed in f32) ----
cudaError_t add(const void* a, const void* b, void* out, KT t, int64_t n, cudaStream_t s);
// y += alpha x; with alpha_dev, alpha is read from device memory when the kernel runs.
cudaError_t axpy(float alpha, const void* x, void* y, KT t, int64_t n, cudaStream_t s,
                 const float* alpha_dev = nullptr);
cudaError_t scale(void* x, float alpha, KT t, int64_t n, cudaStream_t s);
// x *= alpha[0] (f32, device; read when the kernel runs).
cudaError_t scale_by(void* x, const float* alpha, KT t, int64_t n, cudaStream_t s);
// state (f32, AdamWDynamic layout in backend.h) [0] = sqrt(sum of the n f64 slots, in
// order), [1] = min(1, max_norm / (norm + 1e-6)) (1 for max_norm <= 0), [2] = 1 when the
// norm or *loss (optional) is non-finite or one of the n_bad flags bad[i] is set, else 0.
cudaError_t clip_state(const double* slots, int64_t n, const float* loss, float max_norm,
                       float* state, cudaStream_t s, const int* bad = nullptr, int n_bad = 0);
// out[0] = float(x[0] / div) (x: one f64 on the device, e.g. a reduce_sum result); div_dev
// (optional): the divisor read on the device instead.
cudaError_t f64_div_to_f32(const double* x, double div, float* out, cudaStream_t s,
                           const double* div_dev = nullptr);
// Blocks of reduce_sum at most: the size of its partial scratch.
constexpr int kReduceBlocks = 132 * 4;
// out[0] (double, device) = sum(x) or sum(x^2), accumulated in f64 with the same bits on
// every run: each block writes its partial to partial[blockIdx] (kReduceBlocks doubles), and
// the last block to finish (counted in *done, which must be 0 before the first call and is 0
// again after each) adds them in block order. (Float atomics would add them in the order the
// blocks finish: a clipping factor, and with it every weight, could then differ between two
// runs of the same step.) Calls on one stream may share the scratch.
cudaError_t reduce_sum(const void* x, KT t, int64_t n, bool squares, double* out, double* partial,
                       unsigned* done, cudaStream_t s);
// *bad (int, device) |= any non-finite element.
cudaError_t any_nonfinite(const void* x, KT t, int64_t n, int* bad, cudaStream_t s);

// ---- fused kernels ----
// out (n, d) = weight[ids]; *bad |= 1 if an id is outside [0, v).
cudaError_t embedding_forward(const void* w, const int32_t* ids, void* out, KT t, int64_t n,
                              int64_t d, int64_t v, int* bad, cudaStream_t s);
// dw[ids[i]] += dout[i] for i in order (ids outside [0, v) add nothing), the same bits on
// every run; scratch: 2 n int32 on the device (the positions sorted by id). n < 2^31.
cudaError_t embedding_backward(const void* dout, const int32_t* ids, void* dw, KT t, int64_t n,
                               int64_t d, int64_t v, int32_t* scratch, cudaStream_t s);
// rstd stored in t like x.
// y has type ty: t, or bf16 for f32 x.
cudaError_t rmsnorm_forward(const void* x, const void* w, float eps, void* y, void* rstd, KT t,
                            int64_t n, int64_t d, cudaStream_t s, KT ty);
// partial: f32 workspace of rmsnorm_partial_rows(n) * d floats.
int64_t rmsnorm_partial_rows(int64_t n);
// prefetch: the register kernel (d <= 4096) loads a block's next row before this row's
// reduction (LLAMA3_RMSNORM_BWD_PREFETCH=1, a candidate; the same bits either way).
// dx_bf16 (bf16, n x d, or null): also the bf16 rounding of dx's new values.
// parts (f32 x only; or null): dy is the f32 sum, in order, of 1-4 bf16 (n x d) gradients
// (Backend::rmsnorm_backward_parts), and the dy pointer is not read.
struct RmsDyParts {
  const void* p[4] = {nullptr, nullptr, nullptr, nullptr};
  int n = 0;
};
cudaError_t rmsnorm_backward(const void* dy, const void* x, const void* w, const void* rstd,
                             void* dx, void* dw, float* partial, KT t, int64_t n, int64_t d,
                             bool accumulate_dx, cudaStream_t s, bool prefetch = false,
                             void* dx_bf16 = nullptr, const RmsDyParts* parts = nullptr);
// per_block: positions a block of the per-position kernel rotates (1-64; its angles computed
// once into shared memory for all of them): 1, or LLAMA3_ROPE_POSITIONS (a candidate, not yet
// timed: a block of one position moves 1 KB of a 1B model's k, 4 KB of its q). inv_freq is f32
// whatever x's dtype: each angle is pos * inv_freq in f32, as HF computes it (bf16 frequencies
// would be off by up to 2^-9 relative, radians of angle a few thousand positions in).
cudaError_t rope(const void* x, const float* inv_freq, const int32_t* pos, bool inverse, void* out,
                 KT t, int64_t b, int64_t tt, int64_t h, int64_t dh, cudaStream_t s,
                 int per_block = 1);
cudaError_t swiglu_forward(const void* gate, const void* up, void* out, KT t, int64_t n,
                           cudaStream_t s);
cudaError_t swiglu_backward(const void* dout, const void* gate, const void* up, void* dgate,
                            void* dup, KT t, int64_t n, cudaStream_t s);
struct AdamWScalars {
  float b1, b2, eps, grad_scale, step_size, bc2_sqrt, decay;
};
// p16 (optional): also the updated p rounded to bf16 (the weight copy of mixed precision).
// dyn (optional; f32, AdamWDynamic layout): read when the kernels run, for a captured step:
// skip (non-zero: nothing changes), grad_scale, step_size, bc2_sqrt and, when dyn_decay,
// decay replace a's.
cudaError_t adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& a,
                  cudaStream_t s, void* p16 = nullptr, const float* dyn = nullptr,
                  bool dyn_decay = false);

// ---- multi-tensor: one launch for many tensors ----
// The table of tensors travels as a kernel argument (by value: a captured graph replays it),
// at most this many a launch so that the arguments stay under CUDA's 4 KB; every launch
// splits its tensors into chunks of kMultiChunk elements (a multiple of 4, so chunks of a
// 16-byte aligned tensor stay aligned), which its blocks take in turn.
constexpr int kAdamWTensors = 48, kSumSqTensors = 96;
constexpr int64_t kMultiChunk = 16384;
// One tensor of adamw_multi. decay: its 1 - lr * weight_decay; with dyn, dyn_decay says
// whether the captured step's decay (dyn's) applies, else decay (1 for no decay group).
struct AdamWTensor {
  float* p;
  const float* g;
  float* m;
  float* v;
  void* p16;  // optional: the updated p rounded to bf16
  int64_t n;
  float decay;
  bool dyn_decay;
};
// adamw() on each of the n tensors, with the same bits, in ceil(n / kAdamWTensors) launches
// instead of n (the 1B model has 147 parameters; launches of its 2048-element norms cost
// more than their bytes). a.decay is unused (each tensor's own applies); dyn as adamw().
cudaError_t adamw_multi(const AdamWTensor* ts, int64_t n, const AdamWScalars& a, cudaStream_t s,
                        const float* dyn = nullptr);
// One tensor of sum_squares_multi: f32, any alignment.
struct SumSqTensor {
  const float* x;
  int64_t n;
  double weight;
};
// out[0] (double, device) = sum over the n tensors of weight * sum(x^2), in f64 with the
// same bits on every run (reduce_sum's block partials and last-block sum; partial and done
// as there), in ceil(n / kSumSqTensors) launches.
cudaError_t sum_squares_multi(const SumSqTensor* ts, int64_t n, double* out, double* partial,
                              unsigned* done, cudaStream_t s);

// Cross-entropy rows: logits (nr, V) of type lt, f32 or bf16. Writes loss[i] (f32; 0 for
// target < 0). With grad, writes d(loss*scale)/dlogits into dlogits_f32 (f32 logits only;
// may alias them) or, when dlogits_bf16 is set, into that bf16 buffer instead (may alias
// bf16 logits). *bad |= 1 for a target >= V. scale_dev (optional): the scale read on the
// device instead of `scale`.
// split: the two calls of a gradient deferred to the backward (linear_cross_entropy_keep and
// _grad, cuda_backend.cpp): a loss call (grad false) also writes each row's softmax
// statistics to stats_out (2 f32 per row: max, sum-exp); a gradient call reads them from
// stats_in instead of computing them and writes no loss (loss and bad may be null);
// scale_mul (device f32, optional) multiplies the scale (the backward's upstream gradient).
struct CeSplit {
  float* stats_out = nullptr;
  const float* stats_in = nullptr;
  const float* scale_mul = nullptr;
};
cudaError_t cross_entropy_rows(void* logits, KT lt, const int32_t* targets, int64_t nr, int64_t V,
                               bool grad, float scale, float* dlogits_f32, void* dlogits_bf16,
                               float* loss, int* bad, cudaStream_t s,
                               const float* scale_dev = nullptr, const CeSplit& split = {});
// The cross-entropy's mean without the host: the n targets >= 0 counted, *inv = float(1 /
// double(count)) (the gradient scale) and *nd = double(count) (the loss divisor), *none |= 1
// when there is none.
cudaError_t count_valid(const int32_t* targets, int64_t n, float* inv, double* nd, int* none,
                        cudaStream_t s);

// Vocabulary-parallel cross-entropy statistics (Backend::vocab_*): logits (nr, V) f32 hold
// columns [v0, v0 + V) of each row; targets (nr) global ids (< 0: no target).
// vocab_shard_dlogits' row_scale (optional, nr f32): row i's scale is scale * row_scale[i]
// (token_logprobs' per-row weights).
cudaError_t vocab_shard_max(const float* logits, int64_t nr, int64_t V, float* mx, cudaStream_t s);
cudaError_t vocab_shard_stats(const float* logits, const float* mx, const int32_t* targets,
                              int64_t nr, int64_t V, int64_t v0, float* sum_exp,
                              float* target_logit, cudaStream_t s);
cudaError_t vocab_shard_dlogits(float* logits, const float* mx, const float* sum_exp,
                                const int32_t* targets, int64_t nr, int64_t V, int64_t v0,
                                float scale, cudaStream_t s, const float* row_scale = nullptr);
cudaError_t vocab_row_loss(const float* mx, const float* sum_exp, const float* target_logit,
                           const int32_t* targets, int64_t nr, float* loss, float* valid,
                           cudaStream_t s);

// ---- attention (attention.cu) ----
struct AttnShape {
  int64_t B, T, H, Hkv, D;
  float scale;
  bool causal;
  // true: the tensor-core kernels of attention_mma.cu (bf16 products, f32 accumulation);
  // false: the exact f32 SIMT kernels of attention.cu.
  bool tc = false;
  // Tensor-core backward: load lse/dsum with plain loads at the top of each iteration
  // instead of prefetching them with the Q/dO tiles (LLAMA3_ATTN_STATS_PREFETCH=0, for A/B
  // timing only).
  bool no_stats_prefetch = false;
  // Tensor-core forward at head dim 64: one m16 tile of query rows per warp (64 per block)
  // instead of two (LLAMA3_ATTN_FWD_MT=1, for A/B timing only).
  bool fwd_one_mtile = false;
  // Tensor-core backward at head dim <= 64: one m16 tile of key rows per warp (64 keys per
  // block) and 64-query inner tiles (LLAMA3_ATTN_BWD_MT=1, for A/B timing only) instead of
  // two (128 keys per block) and 32-query inner tiles, the default since an H200 run
  // timed it 5% faster alone and 1.3% faster in the 1B step (bench/RESULTS.md).
  bool bwd_one_mtile = false;
  // With two key m-tiles: dS^T stored by stmatrix (sm_90) instead of four-byte stores
  // (LLAMA3_ATTN_BWD_STSM=1; ptxas spills 28-32 bytes that way, against 16-20; 3% slower
  // on the H200).
  bool bwd_stmatrix = false;
  // With GQA partials (dkv_part) and bf16 dk/dv: the per-query-head dK/dV partials stored as
  // bf16 (each rounded once, then the group summed in f32 and rounded again, as PyTorch's GQA
  // backward rounds each head's dK/dV to the output dtype before summing them) instead of
  // f32: half the partials' bytes, about 67 MB a layer of the 1B step
  // (LLAMA3_ATTN_GQA_PART_BF16=1, a candidate not yet timed; ignored for f32 outputs).
  bool gqa_part_bf16 = false;
  // Keys (k, v, dk, dv and the document runs) have Tk rows, queries (q, out, lse, dq) T; 0
  // means T. q_pos (T int32, device; optional): each query's position among the keys
  // (AttentionParams::q_pos: KV-cache decoding, context-parallel chunks); causal then means
  // key <= q_pos[i] and the query's document is that of key q_pos[i]. Without it query i
  // sits at key i. With q_pos no query tile is skipped in the backward (every tile is
  // visited and masked), since its positions need not be monotonic.
  int64_t Tk = 0;
  const int32_t* q_pos = nullptr;
};
// Dynamic shared memory the attention kernels need for head dim D (at most 128).
size_t attention_smem_bytes(int64_t D, bool backward);
size_t attention_mma_smem_bytes(int64_t D, bool backward);
// doc_start/doc_end (B*T) int32 from doc_runs, or null for one document per row.
cudaError_t doc_runs(const int32_t* doc, int64_t B, int64_t T, int32_t* start, int32_t* end,
                     cudaStream_t s);
// bf16 copies of f32 inputs for the mma.sync kernels, which read bf16 only (null members:
// the inputs are bf16 already).
struct AttnBf16Inputs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* dout = nullptr;
};
cudaError_t attention_forward(const void* q, const void* k, const void* v, const int32_t* dstart,
                              const int32_t* dend, void* out, void* lse, KT t, const AttnShape& a,
                              cudaStream_t s, const AttnBf16Inputs& in16 = {});
// dsum: f32 workspace (B*H*T); dq_acc: f32 (B,T,H,D) accumulator, zeroed by the launcher.
// dkv_part (tensor-core path with GQA only, else ignored; may be null): workspace of
// 2*B*T*H*D f32 (bf16 with a.gqa_part_bf16 and bf16 dk/dv) for per-query-head dK/dV partials, so
// that the backward runs one block per query head (4x the blocks of one per kv head at group 4:
// better balanced under a causal mask) and sums the group afterwards.
cudaError_t attention_backward(const void* dout, const void* q, const void* k, const void* v,
                               const void* out, const void* lse, const int32_t* dstart,
                               const int32_t* dend, void* dq, void* dk, void* dv, float* dsum,
                               float* dq_acc, KT t, const AttnShape& a, cudaStream_t s,
                               const AttnBf16Inputs& in16 = {}, void* dkv_part = nullptr);
// The tensor-core kernels (attention_mma.cu: bf16 q/k/v/dout, f32 lse always);
// attention_forward / attention_backward route to them when a.tc, where lse must be f32
// too. The backward launcher expects dsum computed and dq_acc zeroed (it only adds).
cudaError_t attention_forward_mma(const void* q, const void* k, const void* v,
                                  const int32_t* dstart, const int32_t* dend, void* out, void* lse,
                                  KT t, const AttnShape& a, cudaStream_t s);
cudaError_t attention_backward_mma(const void* dout, const void* q, const void* k, const void* v,
                                   const void* lse, const float* dsum, const int32_t* dstart,
                                   const int32_t* dend, void* dk, void* dv, float* dq_acc,
                                   void* dkv_part, KT t, const AttnShape& a, cudaStream_t s);

LLAMA3_CUDA_NS_END  // llama3::cuda
