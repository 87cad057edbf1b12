// CudaBackend: validates tensors, owns the stream, the cuBLASLt handle and workspaces, and
// launches the kernels of runtime/cuda/*.cu. See cuda_backend.h for what is supported.
#if defined(LLAMA3_WITH_CUDA) || defined(LLAMA3_CUDA_EMU)
#include "runtime/cuda/cuda_backend.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/allocator.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/kernels.h"

namespace llama3 {
#ifdef LLAMA3_CUDA_EMU
inline namespace emulated {  // as cuda_backend.h declares it for the emulator
#endif

namespace {

using cuda::KT;

constexpr int kMaxDevices = 16;

// Kernel choices switched by the environment, for A/B timing (bench_cuda_step,
// gpu-check.sh): read on every call so a benchmark can switch them between runs. True when
// `name` is set and starts with `value`.
bool env_is(const char* name, char value) {
  const char* e = std::getenv(name);
  return e && e[0] == value;
}
// LLAMA3_ATTN_GQA_SPLIT=0: the tensor-core attention backward keeps one block per kv head.
bool gqa_split_enabled() {
  return !env_is("LLAMA3_ATTN_GQA_SPLIT", '0');
}
// LLAMA3_ATTN_STATS_PREFETCH=0: see AttnShape::no_stats_prefetch.
bool stats_prefetch_enabled() {
  return !env_is("LLAMA3_ATTN_STATS_PREFETCH", '0');
}
// LLAMA3_ATTN_FWD_MT=1: see AttnShape::fwd_one_mtile.
bool fwd_one_mtile() {
  return env_is("LLAMA3_ATTN_FWD_MT", '1');
}
// LLAMA3_ATTN_BWD_MT=1 and LLAMA3_ATTN_BWD_STSM=1: see AttnShape::bwd_one_mtile and
// bwd_stmatrix (the previous default and a variant).
bool bwd_one_mtile() {
  return env_is("LLAMA3_ATTN_BWD_MT", '1');
}
bool bwd_stmatrix() {
  return env_is("LLAMA3_ATTN_BWD_STSM", '1');
}
// LLAMA3_ATTN_GQA_PART_BF16=1: see AttnShape::gqa_part_bf16 (a candidate, not yet timed).
bool gqa_part_bf16() {
  return env_is("LLAMA3_ATTN_GQA_PART_BF16", '1');
}
// LLAMA3_CE_BF16_LOGITS=1: with bf16 inputs, the fused cross-entropy's logits are bf16 (the
// GEMM rounds them, as PyTorch's autocast does before its f32 softmax) and their gradient
// overwrites them: about 3.1 of the 7.4 GB it moves per 4096-token step at vocabulary
// 128256, by bytes. A candidate, not yet timed on a GPU.
bool ce_bf16_logits() {
  return env_is("LLAMA3_CE_BF16_LOGITS", '1');
}
// LLAMA3_RMSNORM_BWD_PREFETCH=1: the RMSNorm backward loads a block's next row before this
// row's block reduction (cuda::rmsnorm_backward's prefetch; a candidate, not yet timed: the
// backward moved its 134 MB a call at about half the H200's bandwidth).
bool rmsnorm_bwd_prefetch() {
  return env_is("LLAMA3_RMSNORM_BWD_PREFETCH", '1');
}

// LLAMA3_ROPE_POSITIONS=N (1-64): RoPE's per-position kernel rotates N positions a block
// instead of one (a candidate, not yet timed: RoPE moved its bytes at about 42% of the H200's
// bandwidth in blocks of 1-4 KB).
int rope_positions_per_block() {
  const char* e = std::getenv("LLAMA3_ROPE_POSITIONS");
  return e ? std::max(1, std::min(64, std::atoi(e))) : 1;
}
// LLAMA3_CE_DEFERRED=0: the fused cross-entropy computes its gradient in the forward and
// the backward scales it (and adds dw into the accumulated gradient) in separate passes, as
// before linear_cross_entropy_keep/_grad (A/B).
bool ce_deferred_enabled() {
  return !env_is("LLAMA3_CE_DEFERRED", '0');
}
// LLAMA3_GEMM_AUTOTUNE=1: the first GEMM of each shape outside a capture times cuBLASLt's
// heuristic candidates (up to 8) on its own operands and keeps the fastest, where otherwise
// the heuristic's first guess runs (a candidate, not yet timed on a GPU). The choice then
// depends on timings, so two processes may pick different algorithms, and round differently.
bool gemm_autotune_enabled() {
  return env_is("LLAMA3_GEMM_AUTOTUNE", '1');
}
// LLAMA3_MULTI_TENSOR=0: AdamW and the gradient norm launch their kernels once per tensor
// (the previous path, for A/B timing) instead of as a few multi-tensor launches.
bool multi_tensor_enabled() {
  return !env_is("LLAMA3_MULTI_TENSOR", '0');
}

// Raw allocators per device (CachingAllocator takes plain function pointers). A failed
// cudaMalloc returns null so that the caching allocator frees its cache and retries.
template <int D>
void* raw_alloc(size_t n) {
  int prev = 0;
  cudaGetDevice(&prev);
  if (prev != D) cudaSetDevice(D);
  void* p = nullptr;
  // Relaxed for this call: during a graph capture cudaMalloc is "unsafe" (not recorded), which
  // is what the caching allocator wants - the block then belongs to the graph's private pool
  // for as long as the graph lives (Backend::capture).
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  const cudaError_t e = cudaMalloc(&p, n);
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free allocation error
    p = nullptr;
  }
  if (prev != D) cudaSetDevice(prev);
  return p;
}
template <int D>
void raw_free(void* p) {
  int prev = 0;
  cudaGetDevice(&prev);
  if (prev != D) cudaSetDevice(D);
  cudaFree(p);
  if (prev != D) cudaSetDevice(prev);
}
template <size_t... I>
constexpr auto alloc_table(std::index_sequence<I...>) {
  return std::array<std::pair<CachingAllocator::RawAlloc, CachingAllocator::RawFree>, sizeof...(I)>{
      {{&raw_alloc<int(I)>, &raw_free<int(I)>}...}};
}
constexpr auto kAllocs = alloc_table(std::make_index_sequence<kMaxDevices>{});

KT kt_of(DType t, const char* op) {
  switch (t) {
    case DType::f32:
      return KT::f32;
    case DType::bf16:
      return KT::bf16;
    case DType::f16:
      return KT::f16;
    case DType::i32:
      return KT::i32;
    case DType::i64:
      return KT::i64;
    case DType::u8:
      return KT::u8;
    case DType::f64:
      break;
  }
  fail("{}: dtype {} is not supported on cuda (supported: f32, bf16, f16, i32, i64, u8)", op,
       dtype_name(t));
}

// Floating kernels: f32 or bf16 storage.
KT ft_of(DType t, const char* op) {
  LLAMA3_CHECK(t == DType::f32 || t == DType::bf16,
               "{}: dtype {} is not supported on cuda (supported: f32, bf16)", op, dtype_name(t));
  return t == DType::f32 ? KT::f32 : KT::bf16;
}

int64_t align_of(const void* p) {
  auto v = reinterpret_cast<uintptr_t>(p);
  int64_t a = 256;
  while (a > 1 && v % uintptr_t(a) != 0) a /= 2;
  return a;
}

// One cached cuBLASLt plan per GEMM shape/layout/alignment.
struct GemmKey {
  int at, ct, ta, tb;
  int64_t m, n, k, lda, ldb, ldc, batch, sa, sb, sc, al_a, al_b, al_c;
  auto tie() const {
    return std::tie(at, ct, ta, tb, m, n, k, lda, ldb, ldc, batch, sa, sb, sc, al_a, al_b, al_c);
  }
  bool operator<(const GemmKey& o) const { return tie() < o.tie(); }
};

struct GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  // cuBLASLt's heuristic candidates, best guess first (algo starts as the first); with
  // LLAMA3_GEMM_AUTOTUNE=1 the first call outside a capture times them all (tuned).
  std::vector<cublasLtMatmulAlgo_t> candidates;
  bool tuned = false;
  bool legacy = false;  // cuBLASLt had no algorithm (odd alignment): cublasGemmStridedBatchedEx
  ~GemmPlan() {
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index)
      : index_(index), alloc_(kAllocs[index].first, kAllocs[index].second) {
    LLAMA3_CUDA_CHECK(cudaSetDevice(index_));
    LLAMA3_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LLAMA3_CUBLAS_CHECK(cublasLtCreate(&lt_));
    LLAMA3_CUBLAS_CHECK(cublasCreate(&legacy_));
    LLAMA3_CUBLAS_CHECK(cublasSetStream(legacy_, stream_));
    LLAMA3_CUBLAS_CHECK(cublasSetMathMode(legacy_, CUBLAS_DEFAULT_MATH));  // no TF32
    LLAMA3_CUDA_CHECK(cudaMalloc(&workspace_, kWorkspace));
    // The legacy GEMM's workspace is ours too: cuBLAS then allocates nothing itself, which a
    // graph capture requires (the workspace is shared with cuBLASLt: one stream, in order).
    LLAMA3_CUBLAS_CHECK(cublasSetWorkspace(legacy_, workspace_, kWorkspace));
    // [0]: double result, [8]: int flag, [16]: the three deferred flags (check_deferred),
    // [32]: reduce_sum's block count, [64]: its kReduceBlocks partials
    LLAMA3_CUDA_CHECK(cudaMalloc(&scratch_, kScratchBytes));
    LLAMA3_CUDA_CHECK(cudaMemsetAsync(scratch_, 0, kScratchBytes, stream_));
    LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
    cudaDeviceProp prop{};
    LLAMA3_CUDA_CHECK(cudaGetDeviceProperties(&prop, index_));
    smem_optin_ = prop.sharedMemPerBlockOptin;
    name_ = fmt::format("cuda:{} ({}, sm_{}{})", index_, prop.name, prop.major, prop.minor);
    peak_bf16_ = nvidia_peak_flops(prop.name, prop.major, true);
    peak_f32_ = nvidia_peak_flops(prop.name, prop.major, false);
  }

  Device device() const override { return Device::cuda(index_); }
  std::string name() const override { return name_; }
  double peak_flops(bool bf16) const { return bf16 ? peak_bf16_ : peak_f32_; }
  Allocator& allocator() override { return alloc_; }
  void synchronize() override { LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  cudaStream_t stream() const { return stream_; }

  // ---------------------------------------------------------------- memory
  void copy(const Tensor& src, Tensor& dst) override {
    on_device(src, "copy", "src"), on_device(dst, "copy", "dst");
    LLAMA3_CHECK(src.numel() == dst.numel(), "copy: {} into {}", src.str(), dst.str());
    const int64_t n = src.numel();
    if (n == 0) return;
    const KT st = kt_of(src.dtype(), "copy"), dt = kt_of(dst.dtype(), "copy");
    activate();
    auto prof_scope = prof("copy", [&] {
      return fmt::format(" {}->{}{}", dtype_name(src.dtype()), dtype_name(dst.dtype()),
                         src.is_contiguous() && dst.is_contiguous() ? "" : " strided");
    });
    if (src.is_contiguous() && dst.is_contiguous()) {
      LLAMA3_CUDA_CHECK(
          cuda::convert_contiguous(src.data_ptr(), st, dst.data_ptr(), dt, n, stream_));
      return;
    }
    LLAMA3_CHECK(src.dim() <= cuda::kMaxDims && src.shape() == dst.shape(),
                 "copy: strided copy needs equal shapes of at most {} dims, got {} into {}",
                 cuda::kMaxDims, src.str(), dst.str());
    cuda::Strided d;
    d.nd = src.dim();
    for (int i = 0; i < d.nd; ++i)
      d.shape[i] = src.shape()[i], d.src_stride[i] = src.strides()[i],
      d.dst_stride[i] = dst.strides()[i];
    LLAMA3_CUDA_CHECK(cuda::copy_strided(src.data_ptr(), st, dst.data_ptr(), dt, d, n, stream_));
  }

  void copy_to_host(const Tensor& src, void* dst, size_t bytes) override {
    contig(src, "copy_to_host", "src");
    LLAMA3_CHECK(bytes <= src.nbytes(), "copy_to_host: {} bytes from {}", bytes, src.str());
    activate();
    auto prof_scope = prof("copy_to_host");
    LLAMA3_CUDA_CHECK(cudaMemcpyAsync(dst, src.data_ptr(), bytes, cudaMemcpyDeviceToHost, stream_));
    LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void copy_from_host(const void* src, size_t bytes, Tensor& dst) override {
    contig(dst, "copy_from_host", "dst");
    LLAMA3_CHECK(bytes <= dst.nbytes(), "copy_from_host: {} bytes into {}", bytes, dst.str());
    activate();
    auto prof_scope = prof("copy_from_host");
    // Pageable source: cudaMemcpyAsync returns once the source has been staged, so the
    // caller may free it; a synchronous copy keeps that true for pinned memory as well.
    LLAMA3_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src, bytes, cudaMemcpyHostToDevice, stream_));
    LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void fill(Tensor& t, double value) override {
    on_device(t, "fill", "t");
    const KT k = kt_of(t.dtype(), "fill");
    activate();
    auto prof_scope = prof("fill");
    if (t.is_contiguous()) {
      LLAMA3_CUDA_CHECK(cuda::fill(t.data_ptr(), k, t.numel(), value, stream_));
      return;
    }
    Tensor c = Tensor::empty(t.shape(), t.dtype(), device());
    LLAMA3_CUDA_CHECK(cuda::fill(c.data_ptr(), k, c.numel(), value, stream_));
    copy(c, t);
  }

  // ---------------------------------------------------------------- GEMM
  bool bf16_activations() const override { return true; }
  bool accumulate_weight_grads_in_place() const override { return true; }
  // Rows whose f32 logits take up to 4 GiB (at least 1024): a 4096-token step at vocabulary
  // 128256 in one chunk, whose dW GEMM writes the classifier gradient once (1024-row chunks
  // each read and rewrite it: 1.5-1.9 ms of a 99 ms step on an H100).
  int64_t cross_entropy_chunk(int64_t vocab) const override {
    return std::max<int64_t>(1024, (int64_t(4) << 30) / (std::max<int64_t>(vocab, 1) * 4));
  }

  void gemm(const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, float alpha,
            float beta) override {
    gemm_into(a, ta, b, tb, nullptr, c, alpha, beta);
  }

  // The residual add in the epilogue: cuBLASLt reads cin as C (beta 1) and writes D, so the
  // projection's output is never written alone and read back by a separate add.
  void gemm_add(const Tensor& a, Trans ta, const Tensor& b, Trans tb, const Tensor& cin,
                Tensor& d) override {
    on_device(cin, "gemm_add", "c");
    LLAMA3_CHECK(cin.dtype() == d.dtype() && cin.shape() == d.shape() &&
                     cin.strides() == d.strides() && cin.data_ptr() != d.data_ptr(),
                 "gemm_add: c {} must be distinct from d {} with its dtype, shape and strides",
                 cin.str(), d.str());
    gemm_into(a, ta, b, tb, &cin, d, 1.f, 1.f);
  }

  // c = alpha op(a) op(b) + beta C, where C is *cin (same layout as c) or else c itself.
  void gemm_into(const Tensor& a, Trans ta, const Tensor& b, Trans tb, const Tensor* cin, Tensor& c,
                 float alpha, float beta) {
    on_device(a, "gemm", "a"), on_device(b, "gemm", "b"), on_device(c, "gemm", "c");
    LLAMA3_CHECK(a.dim() == c.dim() && b.dim() == c.dim() && (c.dim() == 2 || c.dim() == 3),
                 "gemm: a {}, b {}, c {} must all be 2D or 3D", a.str(), b.str(), c.str());
    const bool f32 = a.dtype() == DType::f32 && b.dtype() == DType::f32 && c.dtype() == DType::f32;
    const bool bf = a.dtype() == DType::bf16 && b.dtype() == DType::bf16 &&
                    (c.dtype() == DType::f32 || c.dtype() == DType::bf16);
    LLAMA3_CHECK(f32 || bf,
                 "gemm: dtypes a {}, b {}, c {} unsupported on cuda (supported: f32 x f32 -> f32, "
                 "bf16 x bf16 -> f32 or bf16)",
                 dtype_name(a.dtype()), dtype_name(b.dtype()), dtype_name(c.dtype()));
    const int r = c.dim() - 2;  // index of the row dim
    const int64_t m = ta == Trans::N ? a.size(r) : a.size(r + 1);
    const int64_t k = ta == Trans::N ? a.size(r + 1) : a.size(r);
    const int64_t kb = tb == Trans::N ? b.size(r) : b.size(r + 1);
    const int64_t n = tb == Trans::N ? b.size(r + 1) : b.size(r);
    LLAMA3_CHECK(k == kb && c.size(r) == m && c.size(r + 1) == n,
                 "gemm: op(a) is ({}, {}), op(b) is ({}, {}), c is {}", m, k, kb, n, c.str());
    int64_t batch = 1, sa = 0, sb = 0, sc = 0;
    if (r == 1) {
      batch = c.size(0);
      LLAMA3_CHECK(a.size(0) == batch && b.size(0) == batch, "gemm: batch of a {}, b {}, c {}",
                   a.str(), b.str(), c.str());
      sa = a.strides()[0], sb = b.strides()[0], sc = c.strides()[0];
    }
    if (m == 0 || n == 0 || batch == 0) return;
    const int64_t lda = ld(a, "a"), ldb = ld(b, "b"), ldc = ld(c, "c");
    activate();
    auto prof_scope = prof("gemm", [&] {
      return fmt::format(" {}x{}x{}{} {}{}", m, n, k, batch > 1 ? fmt::format(" x{}", batch) : "",
                         bf ? (c.dtype() == DType::bf16 ? "bf16->bf16" : "bf16") : "f32",
                         cin           ? " +c"
                         : beta != 0.f ? " +="
                                       : "");
    });
    if (k == 0) {  // c = beta * C
      if (cin) copy(*cin, c);
      if (beta == 0.f)
        fill(c, 0.0);
      else if (beta != 1.f) {
        LLAMA3_CHECK(c.is_contiguous(), "gemm: k == 0 with beta {} needs a contiguous c", beta);
        scale(c, beta);
      }
      return;
    }
    GemmPlan& plan = gemm_plan(gemm_key(a, ta, b, tb, c, cin, m, n, k, batch));
    if (plan.legacy) {
      if (cin) copy(*cin, c);  // (the classic API has no separate C: beta C in place)
      const cudaDataType_t in_t = a.dtype() == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
      LLAMA3_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          legacy_, tb == Trans::N ? CUBLAS_OP_N : CUBLAS_OP_T,
          ta == Trans::N ? CUBLAS_OP_N : CUBLAS_OP_T, int(n), int(m), int(k), &alpha, b.data_ptr(),
          in_t, int(ldb), sb, a.data_ptr(), in_t, int(lda), sa, &beta, c.data_ptr(),
          c.dtype() == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F, int(ldc), sc, int(batch),
          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return;
    }
    const void* cptr = cin ? cin->data_ptr() : c.data_ptr();
    const auto run = [&](const cublasLtMatmulAlgo_t& algo) {
      return cublasLtMatmul(lt_, plan.op, &alpha, b.data_ptr(), plan.la, a.data_ptr(), plan.lb,
                            &beta, cptr, plan.lc, c.data_ptr(), plan.lc, &algo, workspace_,
                            kWorkspace, stream_);
    };
    Tensor old_c;  // c's values for an in-place accumulation timed by autotune (alive till here)
    if (!plan.tuned && !capturing_ && plan.candidates.size() > 1 && gemm_autotune_enabled()) {
      // The trials must leave c as one GEMM would: each writes d = c anew, so with beta != 0
      // and c in place they read a copy of c's old values instead (the final call too).
      const bool in_place = beta != 0.f && !cin;
      if (in_place && c.is_contiguous()) {
        old_c = Tensor::empty(c.shape(), c.dtype(), device());
        copy(c, old_c);
        cptr = old_c.data_ptr();
      }
      if (!in_place || old_c.defined()) autotune(plan, run);
      plan.tuned = true;
    }
    LLAMA3_CUBLAS_CHECK(run(plan.algo));
  }
  // LLAMA3_GEMM_AUTOTUNE=1: the fastest of plan's candidates by CUDA events (each run once to
  // warm up, then the best of three), as plan.algo. run(algo) runs the GEMM on the caller's
  // operands; a candidate that fails is skipped.
  template <typename Run>
  void autotune(GemmPlan& plan, const Run& run) {
    if (!tune_ev_[0]) {
      LLAMA3_CUDA_CHECK(cudaEventCreate(&tune_ev_[0]));
      LLAMA3_CUDA_CHECK(cudaEventCreate(&tune_ev_[1]));
    }
    float best = INFINITY;
    for (const cublasLtMatmulAlgo_t& algo : plan.candidates) {
      if (run(algo) != CUBLAS_STATUS_SUCCESS) continue;
      float t = INFINITY;
      for (int r = 0; r < 3; ++r) {
        LLAMA3_CUDA_CHECK(cudaEventRecord(tune_ev_[0], stream_));
        const cublasStatus_t st = run(algo);
        LLAMA3_CUDA_CHECK(cudaEventRecord(tune_ev_[1], stream_));
        LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
        float ms = 0;
        LLAMA3_CUDA_CHECK(cudaEventElapsedTime(&ms, tune_ev_[0], tune_ev_[1]));
        if (st == CUBLAS_STATUS_SUCCESS) t = std::min(t, ms);
      }
      if (t < best) best = t, plan.algo = algo;
    }
  }

  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLASLt's "A" is our b.
  // The C alignment is that of both c and the separate input cin, when there is one.
  GemmKey gemm_key(const Tensor& a, Trans ta, const Tensor& b, Trans tb, const Tensor& c,
                   const Tensor* cin, int64_t m, int64_t n, int64_t k, int64_t batch) {
    const int r = c.dim() - 2;
    const int64_t sa = r == 1 ? a.strides()[0] : 0, sb = r == 1 ? b.strides()[0] : 0,
                  sc = r == 1 ? c.strides()[0] : 0;
    const int64_t al_c =
        cin ? std::min(align_of(c.data_ptr()), align_of(cin->data_ptr())) : align_of(c.data_ptr());
    return GemmKey{int(a.dtype()),
                   int(c.dtype()),
                   int(ta),
                   int(tb),
                   m,
                   n,
                   k,
                   ld(a, "a"),
                   ld(b, "b"),
                   ld(c, "c"),
                   batch,
                   sa,
                   sb,
                   sc,
                   align_of(a.data_ptr()),
                   align_of(b.data_ptr()),
                   al_c};
  }

  // ---------------------------------------------------------------- element-wise
  void add(const Tensor& a, const Tensor& b, Tensor& out) override {
    contig(a, "add", "a"), contig(b, "add", "b"), contig(out, "add", "out");
    LLAMA3_CHECK(a.numel() == b.numel() && a.numel() == out.numel() && a.dtype() == b.dtype() &&
                     a.dtype() == out.dtype(),
                 "add: {} + {} -> {}", a.str(), b.str(), out.str());
    activate();
    auto prof_scope = prof("add");
    LLAMA3_CUDA_CHECK(cuda::add(a.data_ptr(), b.data_ptr(), out.data_ptr(), ft_of(a.dtype(), "add"),
                                a.numel(), stream_));
  }
  void axpy(float alpha, const Tensor& x, Tensor& y) override {
    contig(x, "axpy", "x"), contig(y, "axpy", "y");
    LLAMA3_CHECK(x.numel() == y.numel() && x.dtype() == y.dtype(), "axpy: {} into {}", x.str(),
                 y.str());
    activate();
    auto prof_scope = prof("axpy");
    LLAMA3_CUDA_CHECK(cuda::axpy(alpha, x.data_ptr(), y.data_ptr(), ft_of(y.dtype(), "axpy"),
                                 x.numel(), stream_));
  }
  void scale(Tensor& x, float alpha) override {
    contig(x, "scale", "x");
    activate();
    auto prof_scope = prof("scale");
    LLAMA3_CUDA_CHECK(
        cuda::scale(x.data_ptr(), alpha, ft_of(x.dtype(), "scale"), x.numel(), stream_));
  }
  double sum_squares(const Tensor& x) override { return reduce(x, true, "sum_squares"); }
  double sum(const Tensor& x) override { return reduce(x, false, "sum"); }
  double sum_squares_many(const std::vector<Tensor>& xs,
                          const std::vector<double>& weights) override {
    LLAMA3_CHECK(weights.empty() || weights.size() == xs.size(),
                 "sum_squares_many: {} weights for {} tensors", weights.size(), xs.size());
    if (xs.empty()) return 0.0;
    activate();
    auto prof_scope = prof("sum_squares_many");
    std::vector<size_t> alone;
    Tensor slots = sum_squares_slots(xs, weights, "sum_squares_many", alone);
    std::vector<double> h(size_t(slots.numel()));
    LLAMA3_CUDA_CHECK(cudaMemcpyAsync(h.data(), slots.data_ptr(), h.size() * sizeof(double),
                                      cudaMemcpyDeviceToHost, stream_));
    LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
    double s = h[0];
    for (size_t j = 0; j < alone.size(); ++j)
      s += (weights.empty() ? 1.0 : weights[alone[j]]) * h[1 + j];
    return s;
  }
  // The squared norms of sum_squares_many and grad_clip_state in f64 device slots (i64 tensor):
  // slot 0 = the sum over the f32 tensors of weights[i] (all 1 when empty) * sum(x_i^2), from
  // a few multi-tensor launches; then one unweighted slot per other tensor, whose indices
  // come back in `alone` (every tensor when LLAMA3_MULTI_TENSOR=0).
  Tensor sum_squares_slots(const std::vector<Tensor>& xs, const std::vector<double>& weights,
                           const char* op, std::vector<size_t>& alone) {
    const bool multi = multi_tensor_enabled();
    std::vector<cuda::SumSqTensor> f32;
    for (size_t i = 0; i < xs.size(); ++i) {
      contig(xs[i], op, "x");
      ft_of(xs[i].dtype(), op);
      if (multi && xs[i].dtype() == DType::f32)
        f32.push_back({xs[i].data<float>(), xs[i].numel(), weights.empty() ? 1.0 : weights[i]});
      else
        alone.push_back(i);
    }
    Tensor slots = Tensor::empty({int64_t(1 + alone.size())}, DType::i64, device());
    double* d = static_cast<double*>(slots.data_ptr());
    char* sc = static_cast<char*>(scratch_);
    LLAMA3_CUDA_CHECK(cuda::sum_squares_multi(f32.data(), int64_t(f32.size()), d,
                                              reinterpret_cast<double*>(sc + 64),
                                              reinterpret_cast<unsigned*>(sc + 32), stream_));
    for (size_t j = 0; j < alone.size(); ++j)
      reduce_into(xs[alone[j]], ft_of(xs[alone[j]].dtype(), op), true, d + 1 + j);
    return slots;
  }
  bool all_finite(const Tensor& x) override {
    contig(x, "all_finite", "x");
    const KT t = ft_of(x.dtype(), "all_finite");
    activate();
    auto prof_scope = prof("all_finite");
    LLAMA3_CUDA_CHECK(cudaMemsetAsync(flag(), 0, sizeof(int), stream_));
    LLAMA3_CUDA_CHECK(cuda::any_nonfinite(x.data_ptr(), t, x.numel(), flag(), stream_));
    return read_flag() == 0;
  }

  void grad_clip_state(const std::vector<Tensor>& xs, const Tensor& loss, float max_norm,
                       Tensor& state) override {
    contig(state, "grad_clip_state", "state");
    LLAMA3_CHECK(state.dtype() == DType::f32 && state.numel() == AdamWDynamic::size,
                 "grad_clip_state: state {} must be {} f32", state.str(),
                 int64_t(AdamWDynamic::size));
    if (loss.defined()) {
      contig(loss, "grad_clip_state", "loss");
      LLAMA3_CHECK(loss.dtype() == DType::f32 && loss.numel() == 1,
                   "grad_clip_state: loss {} must be one f32 element", loss.str());
    }
    activate();
    auto prof_scope = prof("grad_clip_state");
    // The slots are summed in order by one thread (as sum_squares_many sums them on the host).
    std::vector<size_t> alone;
    Tensor slots = sum_squares_slots(xs, {}, "grad_clip_state", alone);
    const double* d = static_cast<const double*>(slots.data_ptr());
    // A deferred check that failed (bad ids or targets in this step's inputs) skips the update
    // too: check_deferred() then throws after the replay with the weights unchanged, as the
    // eager step throws before updating them.
    LLAMA3_CUDA_CHECK(cuda::clip_state(d, slots.numel(),
                                       loss.defined() ? loss.data<float>() : nullptr, max_norm,
                                       state.data<float>(), stream_, deferred(0, 0), 3));
  }
  void axpy_by(const Tensor& s, const Tensor& x, Tensor& y) override {
    contig(x, "axpy_by", "x"), contig(y, "axpy_by", "y"), contig(s, "axpy_by", "s");
    LLAMA3_CHECK(s.dtype() == DType::f32 && s.numel() == 1, "axpy_by: s {} must be one f32",
                 s.str());
    LLAMA3_CHECK(x.numel() == y.numel() && x.dtype() == y.dtype(), "axpy_by: {} into {}", x.str(),
                 y.str());
    activate();
    auto prof_scope = prof("axpy");
    LLAMA3_CUDA_CHECK(cuda::axpy(0.f, x.data_ptr(), y.data_ptr(), ft_of(y.dtype(), "axpy_by"),
                                 x.numel(), stream_, s.data<float>()));
  }
  void scale_by(Tensor& x, const Tensor& s) override {
    contig(x, "scale_by", "x"), contig(s, "scale_by", "s");
    LLAMA3_CHECK(s.dtype() == DType::f32 && s.numel() == 1, "scale_by: s {} must be one f32",
                 s.str());
    activate();
    auto prof_scope = prof("scale_by");
    LLAMA3_CUDA_CHECK(cuda::scale_by(x.data_ptr(), s.data<float>(), ft_of(x.dtype(), "scale_by"),
                                     x.numel(), stream_));
  }

  // ---------------------------------------------------------------- graph capture
  std::unique_ptr<DeviceGraph> capture(const std::function<void()>& work) override;
  bool capturing() const override { return capturing_; }
  void check_deferred() override {
    activate();
    int h[3] = {0, 0, 0};
    LLAMA3_CUDA_CHECK(
        cudaMemcpyAsync(h, deferred(0, 0), sizeof h, cudaMemcpyDeviceToHost, stream_));
    LLAMA3_CUDA_CHECK(cudaMemsetAsync(deferred(0, 0), 0, sizeof h, stream_));
    LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
    LLAMA3_CHECK(h[0] == 0, "embedding: a token id is outside the vocabulary of {} (captured step)",
                 deferred_vocab_[0]);
    LLAMA3_CHECK(h[1] == 0,
                 "cross_entropy: a target is outside the vocabulary of {} (captured step)",
                 deferred_vocab_[1]);
    LLAMA3_CHECK(h[2] == 0, "cross_entropy: no target >= 0 among {} rows (captured step)",
                 deferred_vocab_[2]);
  }

  // ---------------------------------------------------------------- fused kernels
  void embedding_forward(const Tensor& weight, const Tensor& ids, Tensor& out) override {
    contig(weight, "embedding", "weight"), contig(ids, "embedding", "ids");
    contig(out, "embedding", "out");
    LLAMA3_CHECK(ids.dtype() == DType::i32 && weight.dim() == 2 && out.dtype() == weight.dtype() &&
                     out.numel() == ids.numel() * weight.size(1),
                 "embedding: weight {}, ids {}, out {}", weight.str(), ids.str(), out.str());
    const KT t = ft_of(weight.dtype(), "embedding");
    activate();
    auto prof_scope = prof("embedding_forward");
    // Captured: the check waits for check_deferred() (no read back inside a graph).
    int* bad = capturing_ ? deferred(0, weight.size(0)) : flag();
    if (!capturing_) LLAMA3_CUDA_CHECK(cudaMemsetAsync(flag(), 0, sizeof(int), stream_));
    LLAMA3_CUDA_CHECK(cuda::embedding_forward(weight.data_ptr(), ids.data<int32_t>(),
                                              out.data_ptr(), t, ids.numel(), weight.size(1),
                                              weight.size(0), bad, stream_));
    // One small synchronising read per call (once per step): bad ids are an error, as on cpu.
    if (!capturing_)
      LLAMA3_CHECK(read_flag() == 0, "embedding: a token id is outside the vocabulary of {}",
                   weight.size(0));
  }
  void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dweight) override {
    contig(dout, "embedding_backward", "dout"), contig(ids, "embedding_backward", "ids");
    contig(dweight, "embedding_backward", "dweight");
    LLAMA3_CHECK(dout.dtype() == dweight.dtype() && dout.numel() == ids.numel() * dweight.size(1),
                 "embedding_backward: dout {}, ids {}, dweight {}", dout.str(), ids.str(),
                 dweight.str());
    LLAMA3_CHECK(ids.numel() < (int64_t(1) << 31), "embedding_backward: {} ids (at most 2^31 - 1)",
                 ids.numel());
    activate();
    auto prof_scope = prof("embedding_backward");
    Tensor scratch = Tensor::empty({2 * ids.numel()}, DType::i32, device());
    LLAMA3_CUDA_CHECK(cuda::embedding_backward(
        dout.data_ptr(), ids.data<int32_t>(), dweight.data_ptr(),
        ft_of(dweight.dtype(), "embedding_backward"), ids.numel(), dweight.size(1), dweight.size(0),
        scratch.data<int32_t>(), stream_));
  }

  void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y,
                       Tensor& rstd) override {
    contig(x, "rmsnorm", "x"), contig(w, "rmsnorm", "w"), contig(y, "rmsnorm", "y");
    contig(rstd, "rmsnorm", "rstd");
    const int64_t d = x.size(-1), n = x.numel() / std::max<int64_t>(d, 1);
    same_float(x, {&w, &rstd}, "rmsnorm");
    LLAMA3_CHECK(y.dtype() == x.dtype() || (x.dtype() == DType::f32 && y.dtype() == DType::bf16),
                 "rmsnorm: y {} must have x's dtype {} or be bf16 for f32 x", y.str(),
                 dtype_name(x.dtype()));
    activate();
    auto prof_scope = prof("rmsnorm_forward");
    LLAMA3_CUDA_CHECK(cuda::rmsnorm_forward(x.data_ptr(), w.data_ptr(), eps, y.data_ptr(),
                                            rstd.data_ptr(), ft_of(x.dtype(), "rmsnorm"), n, d,
                                            stream_, ft_of(y.dtype(), "rmsnorm")));
  }
  void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                        Tensor& dx, Tensor& dw, bool accumulate_dx) override {
    rmsnorm_bwd(dy, x, w, rstd, dx, dw, accumulate_dx, nullptr);
  }
  void rmsnorm_backward_bf16(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                             Tensor& dx, Tensor& dw, bool accumulate_dx, Tensor& dx_bf16) override {
    LLAMA3_CHECK(
        x.dtype() == DType::f32 && dx_bf16.dtype() == DType::bf16 && dx_bf16.shape() == dx.shape(),
        "rmsnorm_backward_bf16: x {} must be f32 and dx_bf16 {} bf16 of dx's shape {}", x.str(),
        dx_bf16.str(), dx.str());
    rmsnorm_bwd(dy, x, w, rstd, dx, dw, accumulate_dx, &dx_bf16);
  }
  // bf16 parts with f32 x: summed by the backward kernel as it reads them; else the default.
  void rmsnorm_backward_parts(const std::vector<Tensor>& dys, const Tensor& x, const Tensor& w,
                              const Tensor& rstd, Tensor& dx, Tensor& dw, bool accumulate_dx,
                              Tensor* dx_bf16) override {
    bool fused = x.dtype() == DType::f32 && !dys.empty() && dys.size() <= 4;
    for (const Tensor& t : dys)
      fused = fused && t.dtype() == DType::bf16 && t.shape() == x.shape() && t.is_contiguous();
    if (!fused)
      return Backend::rmsnorm_backward_parts(dys, x, w, rstd, dx, dw, accumulate_dx, dx_bf16);
    cuda::RmsDyParts parts;
    for (size_t i = 0; i < dys.size(); ++i) {
      on_device(dys[i], "rmsnorm_backward_parts", "dys");
      parts.p[i] = dys[i].data_ptr();
    }
    parts.n = int(dys.size());
    rmsnorm_bwd(x, x, w, rstd, dx, dw, accumulate_dx, dx_bf16, &parts);  // (dy unread)
  }
  void rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                   Tensor& dx, Tensor& dw, bool accumulate_dx, Tensor* dx_bf16,
                   const cuda::RmsDyParts* parts = nullptr) {
    for (auto [t, nm] :
         {std::pair{&dy, "dy"}, {&x, "x"}, {&w, "w"}, {&rstd, "rstd"}, {&dx, "dx"}, {&dw, "dw"}})
      contig(*t, "rmsnorm_backward", nm);
    if (dx_bf16) contig(*dx_bf16, "rmsnorm_backward", "dx_bf16");
    same_float(x, {&dy, &w, &rstd, &dx, &dw}, "rmsnorm_backward");
    const int64_t d = x.size(-1), n = x.numel() / std::max<int64_t>(d, 1);
    activate();
    auto prof_scope = prof("rmsnorm_backward");
    Tensor partial = Tensor::empty({cuda::rmsnorm_partial_rows(n), d}, DType::f32, device());
    LLAMA3_CUDA_CHECK(cuda::rmsnorm_backward(
        dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(),
        partial.data<float>(), ft_of(x.dtype(), "rmsnorm_backward"), n, d, accumulate_dx, stream_,
        rmsnorm_bwd_prefetch(), dx_bf16 ? dx_bf16->data_ptr() : nullptr, parts));
  }

  void rope(const Tensor& x, const Tensor& inv_freq, const Tensor& pos, bool inverse,
            Tensor& out) override {
    contig(x, "rope", "x"), contig(inv_freq, "rope", "inv_freq"), contig(pos, "rope", "pos");
    contig(out, "rope", "out");
    LLAMA3_CHECK(x.dim() == 4 && x.size(3) % 2 == 0 && inv_freq.numel() == x.size(3) / 2 &&
                     pos.dtype() == DType::i32 && pos.numel() == x.size(1),
                 "rope: x {}, inv_freq {}, pos {}", x.str(), inv_freq.str(), pos.str());
    same_float(x, {&out}, "rope");
    LLAMA3_CHECK(inv_freq.dtype() == DType::f32, "rope: inv_freq {} must be f32 (x {})",
                 inv_freq.str(), x.str());
    activate();
    auto prof_scope = prof("rope");
    LLAMA3_CUDA_CHECK(cuda::rope(x.data_ptr(), inv_freq.data<float>(), pos.data<int32_t>(), inverse,
                                 out.data_ptr(), ft_of(x.dtype(), "rope"), x.size(0), x.size(1),
                                 x.size(2), x.size(3), stream_, rope_positions_per_block()));
  }

  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                         const AttentionParams& p, Tensor& out, Tensor& lse) override {
    for (auto [t, nm] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}, {&lse, "lse"}})
      contig(*t, "attention", nm);
    same_float(q, {&k, &v, &out}, "attention");
    cuda::AttnShape a = attn_shape(q, k, p);
    check_lse(q, lse, a, "attention");
    a.fwd_one_mtile = fwd_one_mtile();
    activate();
    auto prof_scope = prof("attention_forward");
    // The tensor-core kernels write an f32 lse; a bf16 one (allowed for bf16 inputs) is
    // converted after.
    Tensor lse32 =
        a.tc && lse.dtype() != DType::f32 ? Tensor::empty(lse.shape(), DType::f32, device()) : lse;
    Tensor ds, de;
    doc_runs(p, a, ds, de);
    // The mma.sync kernels read bf16: f32 activations are converted once here.
    Tensor q16, k16, v16;
    cuda::AttnBf16Inputs in16;
    if (mma_needs_bf16(a, q)) {
      q16 = q.to(DType::bf16), k16 = k.to(DType::bf16), v16 = v.to(DType::bf16);
      in16 = {q16.data_ptr(), k16.data_ptr(), v16.data_ptr(), nullptr};
    }
    LLAMA3_CUDA_CHECK(cuda::attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), ds.defined() ? ds.data<int32_t>() : nullptr,
        de.defined() ? de.data<int32_t>() : nullptr, out.data_ptr(), lse32.data_ptr(),
        ft_of(q.dtype(), "attention"), a, stream_, in16));
    if (lse32.data_ptr() != lse.data_ptr()) copy(lse32, lse);
  }
  void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& lse, const AttentionParams& p,
                          Tensor& dq, Tensor& dk, Tensor& dv) override {
    for (auto [t, nm] : {std::pair{&dout, "dout"},
                         {&q, "q"},
                         {&k, "k"},
                         {&v, "v"},
                         {&out, "out"},
                         {&lse, "lse"},
                         {&dq, "dq"},
                         {&dk, "dk"},
                         {&dv, "dv"}})
      contig(*t, "attention_backward", nm);
    same_float(q, {&dout, &k, &v, &out, &dq, &dk, &dv}, "attention_backward");
    cuda::AttnShape a = attn_shape(q, k, p);
    check_lse(q, lse, a, "attention_backward");
    activate();
    auto prof_scope = prof("attention_backward");
    Tensor ds, de;
    doc_runs(p, a, ds, de);
    Tensor dsum = Tensor::empty({a.B, a.H, a.T}, DType::f32, device());
    Tensor q16, k16, v16, g16;  // bf16 copies for the mma.sync kernels (dsum uses the f32 dout)
    cuda::AttnBf16Inputs in16;
    if (mma_needs_bf16(a, q)) {
      q16 = q.to(DType::bf16), k16 = k.to(DType::bf16), v16 = v.to(DType::bf16);
      g16 = dout.to(DType::bf16);
      in16 = {q16.data_ptr(), k16.data_ptr(), v16.data_ptr(), g16.data_ptr()};
    }
    Tensor acc = dq.dtype() == DType::f32 ? dq : Tensor::empty(dq.shape(), DType::f32, device());
    // Per-query-head dK/dV partials for the tensor-core backward under GQA (see kernels.h);
    // LLAMA3_ATTN_GQA_SPLIT=0 keeps one block per kv head (bench comparison).
    Tensor part;
    a.no_stats_prefetch = !stats_prefetch_enabled();
    a.bwd_one_mtile = bwd_one_mtile();
    a.bwd_stmatrix = bwd_stmatrix();
    a.gqa_part_bf16 = dk.dtype() == DType::bf16 && gqa_part_bf16();
    if (a.tc && a.H > a.Hkv && gqa_split_enabled())
      part = Tensor::empty({2, a.B, a.Tk, a.H, a.D}, a.gqa_part_bf16 ? DType::bf16 : DType::f32,
                           device());
    const Tensor lse32 = a.tc && lse.dtype() != DType::f32 ? lse.to(DType::f32) : lse;
    LLAMA3_CUDA_CHECK(cuda::attention_backward(
        dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse32.data_ptr(),
        ds.defined() ? ds.data<int32_t>() : nullptr, de.defined() ? de.data<int32_t>() : nullptr,
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dsum.data<float>(), acc.data<float>(),
        ft_of(q.dtype(), "attention_backward"), a, stream_, in16,
        part.defined() ? part.data_ptr() : nullptr));
  }

  void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) override {
    contig(gate, "swiglu", "gate"), contig(up, "swiglu", "up"), contig(out, "swiglu", "out");
    same_float(gate, {&up, &out}, "swiglu");
    LLAMA3_CHECK(gate.numel() == up.numel() && gate.numel() == out.numel(), "swiglu: {} {} {}",
                 gate.str(), up.str(), out.str());
    activate();
    auto prof_scope = prof("swiglu_forward");
    LLAMA3_CUDA_CHECK(cuda::swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(),
                                           ft_of(gate.dtype(), "swiglu"), gate.numel(), stream_));
  }
  void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                       Tensor& dup) override {
    for (auto [t, nm] :
         {std::pair{&dout, "dout"}, {&gate, "gate"}, {&up, "up"}, {&dgate, "dgate"}, {&dup, "dup"}})
      contig(*t, "swiglu_backward", nm);
    same_float(gate, {&dout, &up, &dgate, &dup}, "swiglu_backward");
    activate();
    auto prof_scope = prof("swiglu_backward");
    LLAMA3_CUDA_CHECK(cuda::swiglu_backward(
        dout.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(), dup.data_ptr(),
        ft_of(gate.dtype(), "swiglu_backward"), gate.numel(), stream_));
  }

  double linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                              int64_t chunk, float grad_scale, Tensor* dh, Tensor* dw,
                              Tensor* loss_out = nullptr, double loss_div = 1.0) override {
    return cross_entropy(h, w, targets, chunk, grad_scale, dh, dw, loss_out, loss_div, nullptr);
  }
  bool linear_cross_entropy_keep(const Tensor& h, const Tensor& w, const Tensor& targets,
                                 int64_t chunk, float grad_scale, CrossEntropyKept& kept,
                                 double* total, Tensor* loss_out = nullptr,
                                 double loss_div = 1.0) override {
    if (!ce_deferred_enabled() || (chunk > 0 && chunk < h.size(0))) return false;
    const double t =
        cross_entropy(h, w, targets, 0, grad_scale, nullptr, nullptr, loss_out, loss_div, &kept);
    if (total) *total = t;
    return true;
  }
  void linear_cross_entropy_grad(CrossEntropyKept& kept, const Tensor& h, const Tensor& w,
                                 const Tensor& targets, const Tensor& g, Tensor& dh, Tensor* dw,
                                 bool accumulate_dw) override {
    const int64_t N = h.size(0), V = w.size(0);
    LLAMA3_CHECK(
        kept.logits.defined() && kept.logits.numel() == N * V && kept.stats.numel() == 2 * N,
        "linear_cross_entropy_grad: nothing kept for h {} and w {} (a second backward, "
        "or no linear_cross_entropy_keep before)",
        h.str(), w.str());
    contig(g, "linear_cross_entropy_grad", "g");
    LLAMA3_CHECK(g.dtype() == DType::f32 && g.numel() == 1,
                 "linear_cross_entropy_grad: g {} must be one f32 element", g.str());
    check_ce_grads(h, w, &dh, dw);
    activate();
    auto prof_scope = prof("linear_cross_entropy_grad");
    const bool low = h.dtype() == DType::bf16, l16 = kept.logits.dtype() == DType::bf16;
    // bf16 inputs with f32 logits: the gradient goes to a bf16 buffer for the bf16 GEMMs.
    Tensor d = low && !l16 ? Tensor::empty({N, V}, DType::bf16, device()) : kept.logits;
    cuda::CeSplit sp;
    sp.stats_in = kept.stats.data<float>(), sp.scale_mul = g.data<float>();
    LLAMA3_CUDA_CHECK(cuda::cross_entropy_rows(
        kept.logits.data_ptr(), l16 ? KT::bf16 : KT::f32, targets.data<int32_t>(), N, V, true,
        kept.grad_scale, l16 ? nullptr : kept.logits.data<float>(), low ? d.data_ptr() : nullptr,
        nullptr, nullptr, stream_, count_inverse(kept.count), sp));
    gemm(d, Trans::N, w, Trans::N, dh, 1.f, 0.f);
    if (dw) gemm(d, Trans::T, h, Trans::N, *dw, 1.f, accumulate_dw ? 1.f : 0.f);
    kept = CrossEntropyKept();
  }
  // linear_cross_entropy, or with keep its loss alone (linear_cross_entropy_keep: the rows in
  // one chunk, whose logits and statistics go into *keep).
  double cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets, int64_t chunk,
                       float grad_scale, Tensor* dh, Tensor* dw, Tensor* loss_out, double loss_div,
                       CrossEntropyKept* keep) {
    contig(h, "linear_cross_entropy", "h"), contig(w, "linear_cross_entropy", "w");
    contig(targets, "linear_cross_entropy", "targets");
    LLAMA3_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1) &&
                     targets.dtype() == DType::i32 && targets.numel() == h.size(0) &&
                     h.dtype() == w.dtype() &&
                     (h.dtype() == DType::f32 || h.dtype() == DType::bf16),
                 "linear_cross_entropy: h {} and w {} must be (N, D) and (V, D) of f32 or bf16, "
                 "targets {} (N) int32",
                 h.str(), w.str(), targets.str());
    const int64_t N = h.size(0), V = w.size(0);
    const bool grad = dh != nullptr && dh->defined();
    const bool low = h.dtype() == DType::bf16;
    const bool want_dw = grad && dw != nullptr && dw->defined();
    if (grad) check_ce_grads(h, w, dh, want_dw ? dw : nullptr);
    if (chunk <= 0) chunk = N;
    activate();
    auto prof_scope = prof("linear_cross_entropy");
    const int64_t rows = std::min(chunk, N);
    // bf16 inputs: f32 logits and a bf16 gradient buffer, or (ce_bf16_logits) bf16 logits
    // with their gradient in place.
    const bool l16 = low && ce_bf16_logits();
    Tensor logits = Tensor::empty({rows, V}, l16 ? DType::bf16 : DType::f32, device());
    Tensor dlow = grad && low && !l16 ? Tensor::empty({rows, V}, DType::bf16, device()) : Tensor();
    Tensor losses = Tensor::empty({N}, DType::f32, device());
    cuda::CeSplit sp;
    if (keep) {
      *keep = CrossEntropyKept();
      keep->logits = logits, keep->grad_scale = grad_scale;
      keep->stats = Tensor::empty({N, 2}, DType::f32, device());
      sp.stats_out = keep->stats.data<float>();
    }
    if (loss_out) {
      contig(*loss_out, "linear_cross_entropy", "loss_out");
      LLAMA3_CHECK(loss_out->dtype() == DType::f32 && loss_out->numel() == 1,
                   "linear_cross_entropy: loss_out {} must be one f32 element", loss_out->str());
    }
    // With loss_out nothing is read back: the target check waits for check_deferred().
    int* bad = loss_out ? deferred(1, V) : flag();
    if (!loss_out) LLAMA3_CUDA_CHECK(cudaMemsetAsync(flag(), 0, sizeof(int), stream_));
    // loss_div 0: the mean's divisor and the gradient scale counted on the device.
    Tensor count;  // [0] the f64 count, [1] the f32 inverse (in its first 4 bytes)
    double* div_dev = nullptr;
    if (loss_out && loss_div == 0.0) {
      count = Tensor::empty({2}, DType::i64, device());
      div_dev = static_cast<double*>(count.data_ptr());
      LLAMA3_CUDA_CHECK(cuda::count_valid(targets.data<int32_t>(), N, count_inverse(count), div_dev,
                                          deferred(2, N), stream_));
      if (keep) keep->count = count;
    }
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t nr = std::min(chunk, N - r0);
      Tensor hc = h.narrow(0, r0, nr);
      Tensor lc = logits.narrow(0, 0, nr);
      gemm(hc, Trans::N, w, Trans::T, lc, 1.f, 0.f);
      Tensor g = low && grad && !l16 ? dlow.narrow(0, 0, nr) : lc;
      LLAMA3_CUDA_CHECK(cuda::cross_entropy_rows(
          lc.data_ptr(), l16 ? KT::bf16 : KT::f32, targets.data<int32_t>() + r0, nr, V, grad,
          grad_scale, l16 ? nullptr : lc.data<float>(), low && grad ? g.data_ptr() : nullptr,
          losses.data<float>() + r0, bad, stream_, count_inverse(count), sp));
      if (grad) {
        Tensor dhc = dh->narrow(0, r0, nr);
        gemm(g, Trans::N, w, Trans::N, dhc, 1.f, 0.f);
        if (want_dw) gemm(g, Trans::T, hc, Trans::N, *dw, 1.f, r0 == 0 ? 0.f : 1.f);
      }
    }
    if (loss_out) {
      Tensor total = Tensor::empty({1}, DType::i64, device());  // an f64 slot
      double* d = static_cast<double*>(total.data_ptr());
      reduce_into(losses, KT::f32, false, d);
      LLAMA3_CUDA_CHECK(
          cuda::f64_div_to_f32(d, loss_div, loss_out->data<float>(), stream_, div_dev));
      return 0.0;
    }
    const double total = reduce(losses, false, "linear_cross_entropy");  // synchronises
    LLAMA3_CHECK(read_flag() == 0, "cross_entropy: a target is outside the vocabulary of {}", V);
    return total;
  }
  // The cross-entropy's gradient outputs: dh f32 of h's shape, contiguous; dw (optional) f32
  // of w's shape.
  void check_ce_grads(const Tensor& h, const Tensor& w, const Tensor* dh, const Tensor* dw) const {
    contig(*dh, "linear_cross_entropy", "dh");
    LLAMA3_CHECK(dh->dtype() == DType::f32 && dh->shape() == h.shape(),
                 "linear_cross_entropy: dh {} must be f32 of h's shape {}", dh->str(), h.str());
    if (dw)
      LLAMA3_CHECK(dw->dtype() == DType::f32 && dw->shape() == w.shape(),
                   "linear_cross_entropy: dw {} must be f32 of w's shape {}", dw->str(), w.str());
  }
  // The f32 inverse in a device count's tensor (count_valid), or null for none.
  static float* count_inverse(const Tensor& count) {
    return count.defined() ? reinterpret_cast<float*>(static_cast<double*>(count.data_ptr()) + 1)
                           : nullptr;
  }

  // On the device (the base class runs the softmax on the host): per chunk the logits GEMM,
  // the row max and sum-exp with the target logit (the vocabulary-shard kernels over the
  // whole vocabulary), logp = target logit - lse, and for the gradient dlogits = row_grad *
  // (onehot - softmax) in place, then the dh (=) and dw (+=) GEMMs. One small read: the
  // targets' range check.
  void token_logprobs(const Tensor& h, const Tensor& w, const Tensor& targets, int64_t chunk,
                      Tensor& logp, const Tensor& row_grad, Tensor* dh, Tensor* dw) override {
    contig(h, "token_logprobs", "h"), contig(w, "token_logprobs", "w");
    contig(targets, "token_logprobs", "targets");
    LLAMA3_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1) &&
                     targets.numel() == h.size(0) && targets.dtype() == DType::i32 &&
                     h.dtype() == DType::f32 && w.dtype() == DType::f32,
                 "token_logprobs: h {} (N, D), w {} (V, D) must be f32 and targets {} (N) int32",
                 h.str(), w.str(), targets.str());
    const int64_t N = h.size(0), V = w.size(0);
    const bool grad = row_grad.defined();
    if (grad) {
      contig(row_grad, "token_logprobs", "row_grad");
      LLAMA3_CHECK(row_grad.dtype() == DType::f32 && row_grad.numel() == N && dh && dh->defined() &&
                       dh->dtype() == DType::f32 && dh->shape() == h.shape(),
                   "token_logprobs: row_grad {} must be {} f32 with dh of h's shape {} f32",
                   row_grad.str(), N, h.str());
      contig(*dh, "token_logprobs", "dh");
      if (dw)
        LLAMA3_CHECK(dw->dtype() == DType::f32 && dw->shape() == w.shape() && dw->is_contiguous(),
                     "token_logprobs: dw {} must be contiguous f32 of w's shape {}", dw->str(),
                     w.str());
    }
    const std::vector<int32_t> tg = targets.to_vector<int32_t>();
    for (int64_t i = 0; i < N; ++i)
      LLAMA3_CHECK(tg[size_t(i)] < V, "token_logprobs: target {} at row {} outside vocab {}",
                   tg[size_t(i)], i, V);
    if (chunk <= 0) chunk = N;
    activate();
    auto prof_scope = prof("token_logprobs");
    logp = Tensor::empty({N}, DType::f32, device());
    const int64_t rows = std::min(chunk, std::max<int64_t>(N, 1));
    Tensor logits = Tensor::empty({rows, V}, DType::f32, device());
    Tensor mx = Tensor::empty({rows}, DType::f32, device()),
           se = Tensor::empty({rows}, DType::f32, device()),
           tl = Tensor::empty({rows}, DType::f32, device()),
           valid = Tensor::empty({rows}, DType::f32, device());
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t nr = std::min(chunk, N - r0);
      Tensor hc = h.narrow(0, r0, nr), lc = logits.narrow(0, 0, nr);
      Tensor mc = mx.narrow(0, 0, nr), sc = se.narrow(0, 0, nr), tc = tl.narrow(0, 0, nr);
      Tensor vc = valid.narrow(0, 0, nr), lp = logp.narrow(0, r0, nr);
      Tensor tgc = targets.view({-1}).narrow(0, r0, nr);
      gemm(hc, Trans::N, w, Trans::T, lc, 1.f, 0.f);
      const int32_t* t = tgc.data<int32_t>();
      LLAMA3_CUDA_CHECK(cuda::vocab_shard_max(lc.data<float>(), nr, V, mc.data<float>(), stream_));
      LLAMA3_CUDA_CHECK(cuda::vocab_shard_stats(lc.data<float>(), mc.data<float>(), t, nr, V, 0,
                                                sc.data<float>(), tc.data<float>(), stream_));
      // -logp (0 for rows without a target) into logp, negated below.
      LLAMA3_CUDA_CHECK(cuda::vocab_row_loss(mc.data<float>(), sc.data<float>(), tc.data<float>(), t,
                                             nr, lp.data<float>(), vc.data<float>(), stream_));
      if (!grad) continue;
      // d logp / d logits = onehot - softmax: scale -1 times the row's weight.
      LLAMA3_CUDA_CHECK(cuda::vocab_shard_dlogits(lc.data<float>(), mc.data<float>(),
                                                  sc.data<float>(), t, nr, V, 0, -1.f, stream_,
                                                  row_grad.data<float>() + r0));
      Tensor dhc = dh->narrow(0, r0, nr);
      gemm(lc, Trans::N, w, Trans::N, dhc, 1.f, 0.f);
      if (dw) gemm(lc, Trans::T, hc, Trans::N, *dw, 1.f, 1.f);
    }
    LLAMA3_CUDA_CHECK(
        cuda::scale(logp.data_ptr(), -1.f, KT::f32, N, stream_));  // -0 for rows without target
  }

  void vocab_shard_max(const Tensor& logits, Tensor& mx) override {
    const int64_t C = vocab_rows("vocab_shard_max", logits, Tensor(), {&mx});
    activate();
    auto prof_scope = prof("vocab_shard_max");
    LLAMA3_CUDA_CHECK(
        cuda::vocab_shard_max(logits.data<float>(), C, logits.size(1), mx.data<float>(), stream_));
  }
  void vocab_shard_stats(const Tensor& logits, const Tensor& mx, const Tensor& targets, int64_t v0,
                         Tensor& sum_exp, Tensor& target_logit) override {
    const int64_t C =
        vocab_rows("vocab_shard_stats", logits, targets, {&mx, &sum_exp, &target_logit});
    activate();
    auto prof_scope = prof("vocab_shard_stats");
    LLAMA3_CUDA_CHECK(cuda::vocab_shard_stats(
        logits.data<float>(), mx.data<float>(), targets.data<int32_t>(), C, logits.size(1), v0,
        sum_exp.data<float>(), target_logit.data<float>(), stream_));
  }
  void vocab_shard_dlogits(Tensor& logits, const Tensor& mx, const Tensor& sum_exp,
                           const Tensor& targets, int64_t v0, float scale) override {
    const int64_t C = vocab_rows("vocab_shard_dlogits", logits, targets, {&mx, &sum_exp});
    activate();
    auto prof_scope = prof("vocab_shard_dlogits");
    LLAMA3_CUDA_CHECK(cuda::vocab_shard_dlogits(logits.data<float>(), mx.data<float>(),
                                                sum_exp.data<float>(), targets.data<int32_t>(), C,
                                                logits.size(1), v0, scale, stream_));
  }
  void vocab_row_loss(const Tensor& mx, const Tensor& sum_exp, const Tensor& target_logit,
                      const Tensor& targets, Tensor& loss, Tensor& valid) override {
    const int64_t C = mx.numel();
    for (const Tensor* v :
         std::initializer_list<const Tensor*>{&mx, &sum_exp, &target_logit, &loss, &valid}) {
      contig(*v, "vocab_row_loss", "vector");
      LLAMA3_CHECK(v->dtype() == DType::f32 && v->numel() == C, "vocab_row_loss: {} must be {} f32",
                   v->str(), C);
    }
    contig(targets, "vocab_row_loss", "targets");
    LLAMA3_CHECK(targets.dtype() == DType::i32 && targets.numel() == C,
                 "vocab_row_loss: targets {} must be {} int32", targets.str(), C);
    activate();
    auto prof_scope = prof("vocab_row_loss");
    LLAMA3_CUDA_CHECK(cuda::vocab_row_loss(mx.data<float>(), sum_exp.data<float>(),
                                           target_logit.data<float>(), targets.data<int32_t>(), C,
                                           loss.data<float>(), valid.data<float>(), stream_));
  }

  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p,
                  Tensor* param_bf16 = nullptr) override {
    check_adamw(param, grad, m, v, param_bf16);
    const cuda::AdamWScalars s = adamw_scalars(p);
    activate();
    auto prof_scope = prof("adamw_step");
    LLAMA3_CUDA_CHECK(cuda::adamw(param.data<float>(), grad.data<float>(), m.data<float>(),
                                  v.data<float>(), param.numel(), s, stream_,
                                  param_bf16 ? param_bf16->data_ptr() : nullptr,
                                  p.dynamic.defined() ? p.dynamic.data<float>() : nullptr,
                                  p.weight_decay != 0.f));
  }
  void adamw_step_many(const std::vector<AdamWItem>& items, const AdamWParams& p) override {
    if (!multi_tensor_enabled()) return Backend::adamw_step_many(items, p);
    const cuda::AdamWScalars s = adamw_scalars(p);
    std::vector<cuda::AdamWTensor> ts;
    ts.reserve(items.size());
    for (const AdamWItem& it : items) {
      check_adamw(it.param, it.grad, it.m, it.v,
                  it.param_bf16.defined() ? &it.param_bf16 : nullptr);
      AdamWParams q = p;
      q.weight_decay = it.weight_decay;
      // (captured: the decay group reads its decay from p.dynamic, the rest have none)
      const float decay = p.dynamic.defined() ? 1.f : adamw_step_scalars(q).decay;
      ts.push_back({it.param.data<float>(), it.grad.data<float>(), it.m.data<float>(),
                    it.v.data<float>(),
                    it.param_bf16.defined() ? it.param_bf16.data_ptr() : nullptr, it.param.numel(),
                    decay, it.weight_decay != 0.f});
    }
    activate();
    auto prof_scope = prof("adamw_step_many");
    LLAMA3_CUDA_CHECK(cuda::adamw_multi(ts.data(), int64_t(ts.size()), s, stream_,
                                        p.dynamic.defined() ? p.dynamic.data<float>() : nullptr));
  }

  // Per-op GPU time (cuda_profile_start / cuda_profile_report): while recording, every
  // outermost backend call is bracketed by two events on the stream; the report sums the
  // elapsed times by op name (GEMMs by shape; "+=" marks one that adds into its output, as the
  // weight gradients of later micro-batches do, "+c" one that adds a separate input).
  void profile_start() {
    std::lock_guard<std::mutex> lock(prof_mu_);
    prof_on_ = true;
  }
  std::string profile_report() {
    synchronize();
    std::lock_guard<std::mutex> lock(prof_mu_);
    prof_on_ = false;
    std::map<std::string, std::pair<double, int>> by;
    double total = 0;
    for (auto& r : prof_recs_) {
      float ms = 0;
      LLAMA3_CUDA_CHECK(cudaEventElapsedTime(&ms, r.start, r.end));
      auto& e = by[r.name];
      e.first += ms, e.second += 1, total += ms;
      prof_pool_.push_back(r.start), prof_pool_.push_back(r.end);
    }
    prof_recs_.clear();
    std::vector<std::pair<std::string, std::pair<double, int>>> rows(by.begin(), by.end());
    std::sort(rows.begin(), rows.end(),
              [](const auto& x, const auto& y) { return x.second.first > y.second.first; });
    std::string out = fmt::format("{:<44} {:>10} {:>7} {:>6}\n", "op", "ms", "calls", "%");
    for (auto& [nm, e] : rows)
      out += fmt::format("{:<44} {:>10.3f} {:>7} {:>5.1f}%\n", nm, e.first, e.second,
                         total > 0 ? 100 * e.first / total : 0.0);
    out += fmt::format("{:<44} {:>10.3f}\n", "total (sum of op times)", total);
    return out;
  }

 private:
  static constexpr size_t kWorkspace = size_t(32) << 20;
  static constexpr int kGemmCandidates = 8;  // cuBLASLt heuristic results kept per plan

  struct ProfRec {
    std::string name;
    cudaEvent_t start, end;
  };
  cudaEvent_t prof_event() {
    if (!prof_pool_.empty()) {
      cudaEvent_t e = prof_pool_.back();
      prof_pool_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    LLAMA3_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }
  // Records [start, end) of one outermost backend call while profiling; a no-op otherwise.
  class ProfScope {
   public:
    ProfScope() = default;
    ProfScope(CudaBackend* be, std::string name) : be_(be), name_(std::move(name)) {
      std::lock_guard<std::mutex> lock(be_->prof_mu_);
      start_ = be_->prof_event();
      LLAMA3_CUDA_CHECK(cudaEventRecord(start_, be_->stream_));
    }
    ProfScope(ProfScope&& o) noexcept
        : be_(std::exchange(o.be_, nullptr)), name_(std::move(o.name_)), start_(o.start_) {}
    ProfScope(const ProfScope&) = delete;
    ProfScope& operator=(const ProfScope&) = delete;
    ProfScope& operator=(ProfScope&&) = delete;
    ~ProfScope() {
      if (!be_) return;
      --be_->prof_depth_;
      std::lock_guard<std::mutex> lock(be_->prof_mu_);
      cudaEvent_t end = be_->prof_event();
      if (cudaEventRecord(end, be_->stream_) == cudaSuccess)
        be_->prof_recs_.push_back({std::move(name_), start_, end});
    }

   private:
    CudaBackend* be_ = nullptr;
    std::string name_;
    cudaEvent_t start_ = nullptr;
  };
  template <typename F = std::string (*)()>
  ProfScope prof(const char* op, F detail = nullptr) {
    if (!prof_on_ || prof_depth_ > 0) return {};
    ++prof_depth_;
    if constexpr (std::is_same_v<F, std::string (*)()>)
      return ProfScope(this, op);
    else
      return ProfScope(this, op + detail());
  }

  void activate() {
    if (cuda_device_count() > 1) LLAMA3_CUDA_CHECK(cudaSetDevice(index_));
  }
  void on_device(const Tensor& t, const char* op, const char* nm) const {
    LLAMA3_CHECK(t.defined() && t.device() == device(), "{}: {} must be a tensor on {}, got {}", op,
                 nm, device().str(), t.defined() ? t.str() : std::string("undefined"));
  }
  void contig(const Tensor& t, const char* op, const char* nm) const {
    on_device(t, op, nm);
    LLAMA3_CHECK(t.is_contiguous(), "{}: {} must be contiguous, got {}", op, nm, t.str());
  }
  // AdamW's tensors: f32 param, grad and moments of one size on this device, contiguous;
  // param_bf16 (optional) bf16 of that size.
  void check_adamw(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                   const Tensor* param_bf16) const {
    for (auto [t, nm] : {std::pair<const Tensor*, const char*>{&param, "param"},
                         {&grad, "grad"},
                         {&m, "m"},
                         {&v, "v"}}) {
      contig(*t, "adamw", nm);
      LLAMA3_CHECK(t->dtype() == DType::f32 && t->numel() == param.numel(),
                   "adamw: {} {} must be f32 with {} elements (supported: f32)", nm, t->str(),
                   param.numel());
    }
    if (param_bf16) {
      contig(*param_bf16, "adamw", "param_bf16");
      LLAMA3_CHECK(param_bf16->dtype() == DType::bf16 && param_bf16->numel() == param.numel(),
                   "adamw: the bf16 copy {} of param {} must be bf16 of the param's size",
                   param_bf16->str(), param.str());
    }
  }
  // The kernels' scalars of p: the same arithmetic as the CPU backend (torch.optim.AdamW,
  // single-tensor path). decay: p's, or with p.dynamic 1 (the kernel reads it from there, or
  // there is none).
  cuda::AdamWScalars adamw_scalars(const AdamWParams& p) const {
    cuda::AdamWScalars s{};
    const AdamWStepScalars d = adamw_step_scalars(p);
    s.b1 = p.beta1, s.b2 = p.beta2, s.eps = p.eps, s.grad_scale = p.grad_scale;
    s.step_size = d.step_size, s.bc2_sqrt = d.bc2_sqrt;
    s.decay = p.dynamic.defined() ? 1.f : d.decay;
    if (p.dynamic.defined()) {
      contig(p.dynamic, "adamw", "dynamic");
      LLAMA3_CHECK(p.dynamic.dtype() == DType::f32 && p.dynamic.numel() == AdamWDynamic::size,
                   "adamw: dynamic {} must be {} f32", p.dynamic.str(),
                   int64_t(AdamWDynamic::size));
    }
    return s;
  }
  static void same_float(const Tensor& x, std::initializer_list<const Tensor*> others,
                         const char* op) {
    ft_of(x.dtype(), op);
    for (const Tensor* o : others)
      LLAMA3_CHECK(o->dtype() == x.dtype(), "{}: all tensors must be {} like x, got {}", op,
                   dtype_name(x.dtype()), o->str());
  }
  static int64_t ld(const Tensor& t, const char* nm) {
    const int n = t.dim();
    LLAMA3_CHECK(t.strides()[n - 1] == 1 || t.size(-1) == 1,
                 "gemm: {} must have unit stride in its last dim, got {}", nm, t.str());
    return t.size(-2) == 1 ? std::max<int64_t>(t.size(-1), 1) : t.strides()[n - 2];
  }

  static constexpr size_t kScratchBytes = 64 + sizeof(double) * cuda::kReduceBlocks;
  double* result() { return static_cast<double*>(scratch_); }
  // *out (f64, device) = the sum of x's elements or of their squares, by cuda::reduce_sum with
  // the partials and block count in scratch_ (calls on the one stream share them in order).
  void reduce_into(const Tensor& x, KT t, bool squares, double* out) {
    char* s = static_cast<char*>(scratch_);
    LLAMA3_CUDA_CHECK(cuda::reduce_sum(x.data_ptr(), t, x.numel(), squares, out,
                                       reinterpret_cast<double*>(s + 64),
                                       reinterpret_cast<unsigned*>(s + 32), stream_));
  }
  int* flag() { return reinterpret_cast<int*>(static_cast<char*>(scratch_) + 8); }
  // Deferred check i (0: embedding ids, 1: cross-entropy targets outside the vocabulary, 2: a
  // cross-entropy without any target): a sticky device flag that captured kernels set and
  // check_deferred() reads; vocab (the row count for 2) is remembered for its message.
  int* deferred(int i, int64_t vocab) {
    if (vocab > 0) deferred_vocab_[i] = vocab;
    return reinterpret_cast<int*>(static_cast<char*>(scratch_) + 16) + i;
  }
  int read_flag() {
    int v = 0;
    LLAMA3_CUDA_CHECK(cudaMemcpyAsync(&v, flag(), sizeof(int), cudaMemcpyDeviceToHost, stream_));
    LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return v;
  }
  // The shapes every vocab_* kernel expects (backend.h): logits (C, V) f32, vectors (C).
  int64_t vocab_rows(const char* op, const Tensor& logits, const Tensor& targets,
                     std::initializer_list<const Tensor*> vecs) {
    contig(logits, op, "logits");
    LLAMA3_CHECK(logits.dim() == 2 && logits.dtype() == DType::f32,
                 "{}: logits {} must be (C, V) f32", op, logits.str());
    const int64_t C = logits.size(0);
    if (targets.defined()) {
      contig(targets, op, "targets");
      LLAMA3_CHECK(targets.dtype() == DType::i32 && targets.numel() == C,
                   "{}: targets {} must be {} int32", op, targets.str(), C);
    }
    for (const Tensor* v : vecs) {
      contig(*v, op, "vector");
      LLAMA3_CHECK(v->dtype() == DType::f32 && v->numel() == C, "{}: {} must be {} f32", op,
                   v->str(), C);
    }
    return C;
  }
  double reduce(const Tensor& x, bool squares, const char* op) {
    contig(x, op, "x");
    const KT t = ft_of(x.dtype(), op);
    activate();
    auto prof_scope = prof(op);
    reduce_into(x, t, squares, result());
    double v = 0;
    LLAMA3_CUDA_CHECK(
        cudaMemcpyAsync(&v, result(), sizeof(double), cudaMemcpyDeviceToHost, stream_));
    LLAMA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return v;
  }

  cuda::AttnShape attn_shape(const Tensor& q, const Tensor& k, const AttentionParams& p) const {
    LLAMA3_CHECK(q.dim() == 4 && k.dim() == 4, "attention: q {} and k {} must be (B, T, H, Dh)",
                 q.str(), k.str());
    cuda::AttnShape a{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 0.f, p.causal};
    a.Tk = k.size(1);
    LLAMA3_CHECK(k.size(0) == a.B && k.size(3) == a.D && a.Hkv > 0 && a.H % a.Hkv == 0,
                 "attention: q {} and k {} disagree (heads {} must be a multiple of kv heads {})",
                 q.str(), k.str(), a.H, a.Hkv);
    LLAMA3_CHECK(a.D >= 1 && a.D <= 128,
                 "attention: head dim {} unsupported on cuda (supported: 1..128)", a.D);
    if (p.q_pos.defined()) {
      // Queries at explicit key positions (KV-cache decoding, context-parallel chunks). A
      // position outside [0, Tk) sees no key (the kernels do not read past the keys).
      contig(p.q_pos, "attention", "q_pos");
      LLAMA3_CHECK(p.q_pos.dtype() == DType::i32 && p.q_pos.numel() == a.T,
                   "attention: q_pos {} must be int32 with one position per query ({})",
                   p.q_pos.str(), a.T);
      a.q_pos = p.q_pos.data<int32_t>();
    } else {
      LLAMA3_CHECK(a.Tk == a.T,
                   "attention: {} queries and {} keys need q_pos (the queries' key positions)",
                   a.T, a.Tk);
    }
    a.scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(float(a.D));
    // Tensor cores (bf16 products, f32 accumulation) when asked for or when the inputs are
    // bf16 anyway; the exact f32 SIMT kernels otherwise.
    a.tc = p.compute == AttnCompute::bf16 || q.dtype() == DType::bf16;
    const size_t need = a.tc ? cuda::attention_mma_smem_bytes(a.D, /*backward=*/true)
                             : cuda::attention_smem_bytes(a.D, /*backward=*/true);
    LLAMA3_CHECK(need <= smem_optin_,
                 "attention: head dim {} needs {} bytes of shared memory per block, {} allows {} "
                 "(H100/H200: 227 KB; A100: head dims up to 64)",
                 a.D, need, name_, smem_optin_);
    return a;
  }
  // lse has q's dtype, or is f32 for bf16 inputs (the tensor-core kernels' own precision,
  // what ops::attention allocates).
  static void check_lse(const Tensor& q, const Tensor& lse, const cuda::AttnShape& a,
                        const char* op) {
    LLAMA3_CHECK(lse.dtype() == q.dtype() || (a.tc && lse.dtype() == DType::f32),
                 "{}: lse {} must have q's dtype {} or be f32 (bf16 inputs)", op, lse.str(),
                 dtype_name(q.dtype()));
  }
  static bool mma_needs_bf16(const cuda::AttnShape& a, const Tensor& q) {
    return a.tc && q.dtype() != DType::bf16;
  }
  void doc_runs(const AttentionParams& p, const cuda::AttnShape& a, Tensor& start, Tensor& end) {
    if (!p.doc_ids.defined()) return;
    contig(p.doc_ids, "attention", "doc_ids");
    LLAMA3_CHECK(p.doc_ids.dtype() == DType::i32 && p.doc_ids.numel() == a.B * a.Tk,
                 "attention: doc_ids {} must be int32 (B={}, keys={})", p.doc_ids.str(), a.B,
                 a.Tk);
    start = Tensor::empty({a.B, a.Tk}, DType::i32, device());
    end = Tensor::empty({a.B, a.Tk}, DType::i32, device());
    LLAMA3_CUDA_CHECK(cuda::doc_runs(p.doc_ids.data<int32_t>(), a.B, a.Tk, start.data<int32_t>(),
                                     end.data<int32_t>(), stream_));
  }

  GemmPlan& gemm_plan(const GemmKey& key) {
    std::lock_guard<std::mutex> lock(plans_mu_);
    auto it = plans_.find(key);
    if (it != plans_.end()) return *it->second;
    auto plan = std::make_unique<GemmPlan>();
    const cudaDataType_t in_t = key.at == int(DType::bf16) ? CUDA_R_16BF : CUDA_R_32F;
    // CUBLAS_COMPUTE_32F: true f32 (no TF32) for f32 inputs; f32 accumulation for bf16.
    LLAMA3_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t opa = key.tb == int(Trans::N) ? CUBLAS_OP_N : CUBLAS_OP_T;  // our b
    const cublasOperation_t opb = key.ta == int(Trans::N) ? CUBLAS_OP_N : CUBLAS_OP_T;  // our a
    LLAMA3_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
    LLAMA3_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
    // Stored (column-major) shapes: our b viewed column-major, our a, and c^T (n x m).
    const uint64_t la_rows = opa == CUBLAS_OP_N ? key.n : key.k,
                   la_cols = opa == CUBLAS_OP_N ? key.k : key.n;
    const uint64_t lb_rows = opb == CUBLAS_OP_N ? key.k : key.m,
                   lb_cols = opb == CUBLAS_OP_N ? key.m : key.k;
    LLAMA3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->la, in_t, la_rows, la_cols, key.ldb));
    LLAMA3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->lb, in_t, lb_rows, lb_cols, key.lda));
    const cudaDataType_t out_t = key.ct == int(DType::bf16) ? CUDA_R_16BF : CUDA_R_32F;
    LLAMA3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->lc, out_t, key.n, key.m, key.ldc));
    if (key.batch > 1) {
      const int32_t bc = int32_t(key.batch);
      for (auto [l, st] : {std::pair{plan->la, key.sb}, {plan->lb, key.sa}, {plan->lc, key.sc}}) {
        LLAMA3_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                             &bc, sizeof(bc)));
        const int64_t s64 = st;
        LLAMA3_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
            l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &s64, sizeof(s64)));
      }
    }
    cublasLtMatmulPreference_t pref = nullptr;
    LLAMA3_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = kWorkspace;
    const uint32_t al_a = uint32_t(key.al_b), al_b = uint32_t(key.al_a), al_c = uint32_t(key.al_c);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                         sizeof(ws));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                         sizeof(al_a));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                         sizeof(al_b));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c,
                                         sizeof(al_c));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c,
                                         sizeof(al_c));
    cublasLtMatmulHeuristicResult_t res[kGemmCandidates] = {};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
        lt_, plan->op, plan->la, plan->lb, plan->lc, plan->lc, pref, kGemmCandidates, res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
      plan->algo = res[0].algo;
      for (int i = 0; i < found; ++i)
        if (res[i].state == CUBLAS_STATUS_SUCCESS) plan->candidates.push_back(res[i].algo);
    } else {
      // Misaligned views (e.g. a narrowed bf16 matrix): the classic API handles any alignment.
      LLAMA3_CHECK(key.m <= INT32_MAX && key.n <= INT32_MAX && key.k <= INT32_MAX &&
                       key.lda <= INT32_MAX && key.ldb <= INT32_MAX && key.ldc <= INT32_MAX,
                   "gemm: no cuBLASLt algorithm and sizes m={} n={} k={} too large for cuBLAS",
                   key.m, key.n, key.k);
      plan->legacy = true;
    }
    return *plans_.emplace(key, std::move(plan)).first->second;
  }

  int index_;
  size_t smem_optin_ = 0;  // the device's opt-in shared memory per block
  double peak_bf16_ = 0, peak_f32_ = 0;  // nvidia_peak_flops of this card (0: not in the table)
  CachingAllocator alloc_;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  cublasHandle_t legacy_ = nullptr;
  void* workspace_ = nullptr;
  void* scratch_ = nullptr;
  bool capturing_ = false;
  int64_t deferred_vocab_[3] = {0, 0, 0};
  std::mutex plans_mu_;
  std::map<GemmKey, std::unique_ptr<GemmPlan>> plans_;
  cudaEvent_t tune_ev_[2] = {nullptr, nullptr};  // autotune's timing events
  std::mutex prof_mu_;
  bool prof_on_ = false;
  int prof_depth_ = 0;  // nesting of backend calls inside a recorded one (fill -> copy)
  std::vector<ProfRec> prof_recs_;
  std::vector<cudaEvent_t> prof_pool_;
};

// A captured graph: its executable and the allocator pool that holds its buffers.
class CudaGraph final : public DeviceGraph {
 public:
  CudaGraph(cudaGraphExec_t exec, cudaStream_t stream, CachingAllocator& alloc, int pool,
            int index)
      : exec_(exec), stream_(stream), alloc_(alloc), pool_(pool), index_(index) {}
  ~CudaGraph() override {
    // A replay may still run: its blocks go back to the shared cache only once it is done.
    if (cuda_device_count() > 1) cudaSetDevice(index_);
    cudaStreamSynchronize(stream_);
    cudaGraphExecDestroy(exec_);
    alloc_.release_pool(pool_);
  }
  void replay() override {
    if (cuda_device_count() > 1) LLAMA3_CUDA_CHECK(cudaSetDevice(index_));
    LLAMA3_CUDA_CHECK(cudaGraphLaunch(exec_, stream_));
  }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
  CachingAllocator& alloc_;
  int pool_, index_;
};

std::unique_ptr<DeviceGraph> CudaBackend::capture(const std::function<void()>& work) {
  LLAMA3_CHECK(!capturing_, "capture: {} is already capturing (captures do not nest)", name_);
  LLAMA3_CHECK(!prof_on_, "capture: per-op profiling (cuda_profile_start) is on for {}; its "
                          "events time eager calls only",
               name_);
  activate();
  synchronize();  // errors of earlier work surface here, not inside the capture
  const int pool = alloc_.begin_pool();
  const auto abandon = [&] {
    capturing_ = false;
    alloc_.end_pool();
    alloc_.release_pool(pool);
  };
  const cudaError_t began = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal);
  if (began != cudaSuccess) {
    abandon();
    LLAMA3_CUDA_CHECK(began);
  }
  capturing_ = true;
  cudaGraph_t graph = nullptr;
  try {
    work();
  } catch (...) {
    // A synchronising call inside work() failed (and invalidated the capture), or work threw.
    (void)cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    abandon();
    throw;
  }
  capturing_ = false;
  alloc_.end_pool();
  const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
  if (ended != cudaSuccess) {
    alloc_.release_pool(pool);
    fail("capture on {}: the capture failed ({}): the captured work made a call that cannot be "
         "captured",
         name_, cudaGetErrorName(ended));
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (inst != cudaSuccess) {
    alloc_.release_pool(pool);
    fail("capture on {}: cudaGraphInstantiate failed ({})", name_, cudaGetErrorName(inst));
  }
  return std::make_unique<CudaGraph>(exec, stream_, alloc_, pool, index_);
}

CudaBackend* g_backends[kMaxDevices] = {};

std::mutex g_init_mu;
int g_count = -1;  // -1: not initialised yet

}  // namespace

bool cuda_init() {
  std::lock_guard<std::mutex> lock(g_init_mu);
  if (g_count >= 0) return g_count > 0;
  g_count = 0;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();  // no driver / no device: not an error for a CPU machine
    return false;
  }
  n = std::min(n, kMaxDevices);
  for (int i = 0; i < n; ++i) {
    // Backends live for the whole process: tensors may outlive statics.
    g_backends[i] = new CudaBackend(i);
    register_backend(g_backends[i]);
    g_count = i + 1;
  }
  return g_count > 0;
}

int cuda_device_count() {
  return g_count < 0 ? 0 : g_count;
}

void cuda_profile_start(int index) {
  LLAMA3_CHECK(index >= 0 && index < cuda_device_count(), "cuda_profile_start: no device {}",
               index);
  g_backends[index]->profile_start();
}

std::string cuda_profile_report(int index) {
  LLAMA3_CHECK(index >= 0 && index < cuda_device_count(), "cuda_profile_report: no device {}",
               index);
  return g_backends[index]->profile_report();
}

void* cuda_stream(int index) {
  LLAMA3_CHECK(index >= 0 && index < cuda_device_count(), "cuda_stream: no device {}", index);
  return g_backends[index]->stream();
}

double nvidia_peak_flops(const std::string& name, int major, bool bf16) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  // Dense (no structured sparsity) datasheet figures, GFLOP/s: {bf16 tensor cores, f32}.
  std::pair<double, double> t{0, 0};
  if (major == 9 && (has("H100") || has("H200") || has("GH200"))) {
    if (has("NVL"))
      t = {835000, 60000};  // H100 NVL, H200 NVL
    else if (has("PCIe"))
      t = {756000, 51000};  // H100 PCIe
    else
      t = {989400, 66900};  // H100 SXM (the "80GB HBM3"), H200 SXM, GH200
  } else if (major == 8 && has("A100")) {
    t = {312000, 19500};
  }
  return (bf16 ? t.first : t.second) * 1e9;
}

double cuda_peak_flops(int index, bool bf16) {
  if (index < 0 || index >= cuda_device_count()) return 0;
  return g_backends[index]->peak_flops(bf16);
}

#ifdef LLAMA3_CUDA_EMU
}  // namespace emulated
#endif
}  // namespace llama3
#endif  // LLAMA3_WITH_CUDA || LLAMA3_CUDA_EMU
