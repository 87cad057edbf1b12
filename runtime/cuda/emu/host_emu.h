// The host-side CUDA that cuda_backend.cpp uses, for running the whole CUDA backend on the
// SIMT emulator (LLAMA3_CUDA_EMU): one emulated device whose memory is host memory, streams
// and events that do nothing (every launch completes before it returns; under stream capture
// work is recorded and a graph launch runs it, simt.h), and cuBLAS /
// cuBLASLt GEMMs computed by a reference loop (f64 accumulation of f32 or bf16 inputs, f32
// or bf16 output) from the same descriptors the backend builds. cuBLASLt offers no algorithm
// for operands aligned to less than 4 bytes, so the backend's cublasGemmStridedBatchedEx
// fallback runs too. What it checks is the backend's host logic and its kernels together,
// not cuBLAS.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "runtime/cuda/emu/cuda_emu.h"

// ---- runtime API
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  size_t sharedMemPerBlockOptin;
  int multiProcessorCount;
};
using cudaEvent_t = struct CUevent_st*;
constexpr unsigned cudaStreamNonBlocking = 1;
inline const char* cudaGetErrorName(cudaError_t e) {
  return llama3::emu::error_text(e).name;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  *p = {};
  std::strcpy(p->name, "SIMT emulator");
  p->major = 9, p->minor = 0;
  p->sharedMemPerBlockOptin = 227 * 1024;  // as an H100
  p->multiProcessorCount = 132;
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::aligned_alloc(256, (n + 255) / 256 * 256);
  return *p ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  *s = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  return llama3::emu::capture_violation() ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) {
  return cudaSuccess;
}
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 0.f;
  return cudaSuccess;
}

// ---- graphs: a capture is the recorded work (simt.h), a launch runs it in order
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2
};
struct CUgraph_st {
  std::vector<std::function<void()>> work;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> work;
};
using cudaGraph_t = CUgraph_st*;
using cudaGraphExec_t = CUgraphExec_st*;
inline cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode*) {
  return cudaSuccess;
}
inline cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) {
  if (llama3::emu::recording()) return cudaErrorInvalidValue;
  llama3::emu::begin_recording();
  return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* g) {
  *g = nullptr;
  if (!llama3::emu::recording()) return cudaErrorInvalidValue;
  const bool bad = llama3::emu::capture_invalidated();
  auto work = llama3::emu::end_recording();
  if (bad) return cudaErrorStreamCaptureInvalidated;
  *g = new CUgraph_st{std::move(work)};
  return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long = 0) {
  *e = new CUgraphExec_st{g->work};
  return cudaSuccess;
}
namespace llama3::emu {
// Graph launches so far (tests check that a captured path really ran).
inline uint64_t& graph_launches() {
  static uint64_t n = 0;
  return n;
}
}  // namespace llama3::emu
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t) {
  if (llama3::emu::recording()) return cudaErrorStreamCaptureUnsupported;  // not nested here
  ++llama3::emu::graph_launches();
  for (auto& w : e->work) w();
  return cudaSuccess;
}
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
  delete e;
  return cudaSuccess;
}

// ---- cuBLAS / cuBLASLt
enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_SUPPORTED = 15 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
enum cublasLtMatmulDescAttributes_t { CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB };
enum cublasLtMatrixLayoutAttribute_t {
  CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
  CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET
};
enum cublasLtMatmulPreferenceAttributes_t {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES
};
inline const char* cublasLtGetStatusString(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_NOT_SUPPORTED";
}

struct cublasLtContext {};
struct cublasContext {};
struct cublasLtMatmulDescOpaque {
  cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
};
struct cublasLtMatrixLayoutOpaque {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld, batch = 1, stride = 0;
};
struct cublasLtMatmulPreferenceOpaque {
  uint32_t min_align = 256;
};
struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
};
using cublasLtHandle_t = cublasLtContext*;
using cublasHandle_t = cublasContext*;
using cublasLtMatmulDesc_t = cublasLtMatmulDescOpaque*;
using cublasLtMatrixLayout_t = cublasLtMatrixLayoutOpaque*;
using cublasLtMatmulPreference_t = cublasLtMatmulPreferenceOpaque*;

// Descriptors are plain heap objects.
template <typename T>
inline cublasStatus_t emu_create(T** p, T v = {}) {
  *p = new T(v);
  return CUBLAS_STATUS_SUCCESS;
}
template <typename T>
inline cublasStatus_t emu_destroy(T* p) {
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
  static cublasLtContext ctx;
  *h = &ctx;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
  static cublasContext ctx;
  *h = &ctx;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) {
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) {
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetWorkspace(cublasHandle_t, void*, size_t) {
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t,
                                               cudaDataType_t) {
  return emu_create(d);
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  return emu_destroy(d);
}
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                                     cublasLtMatmulDescAttributes_t a,
                                                     const void* v, size_t n) {
  if (n != sizeof(cublasOperation_t)) return CUBLAS_STATUS_NOT_SUPPORTED;
  std::memcpy(a == CUBLASLT_MATMUL_DESC_TRANSA ? &d->ta : &d->tb, v, n);
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType_t t,
                                                 uint64_t rows, uint64_t cols, int64_t ld) {
  return emu_create(l, {t, rows, cols, ld});
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  return emu_destroy(l);
}
inline cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l,
                                                       cublasLtMatrixLayoutAttribute_t a,
                                                       const void* v, size_t n) {
  if (a == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT && n == sizeof(int32_t)) {
    int32_t b;
    std::memcpy(&b, v, n);
    l->batch = b;
  } else if (a == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET && n == sizeof(int64_t)) {
    std::memcpy(&l->stride, v, n);
  } else {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
  return emu_create(p);
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
  return emu_destroy(p);
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                           cublasLtMatmulPreferenceAttributes_t a,
                                                           const void* v, size_t n) {
  if (a != CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && n == sizeof(uint32_t)) {
    uint32_t al;
    std::memcpy(&al, v, n);
    if (al < p->min_align) p->min_align = al;
  }
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t,
                                                     cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                                     cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                                     cublasLtMatmulPreference_t p, int requested,
                                                     cublasLtMatmulHeuristicResult_t* r,
                                                     int* found) {
  // Up to three "algorithms" (data[0] = 0, 1, 2; they all run the reference loop, except that
  // 1 fails at cublasLtMatmul, as a candidate can, so the backend's autotune must skip it).
  // (none for 2-byte aligned operands, as cuBLASLt has no kernel for them)
  *found = p->min_align >= 4 ? std::min(requested, 3) : 0;
  for (int i = 0; i < *found; ++i) {
    r[i] = {};
    r[i].algo.data[0] = uint64_t(i);
    r[i].state = CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_SUCCESS;
}

namespace llama3::emu {

inline float gemm_load(const void* p, cudaDataType_t t, int64_t i) {
  return t == CUDA_R_32F ? static_cast<const float*>(p)[i]
                         : __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
inline void gemm_store(void* p, cudaDataType_t t, int64_t i, float v) {
  if (t == CUDA_R_32F)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}
// Column-major D (m x n) = alpha op(A) op(B) + beta C (C not read when beta is 0).
struct GemmOperand {
  const void* p;
  cudaDataType_t t;
  int64_t ld, stride;
};
inline void gemm_reference(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n,
                           int64_t k, float alpha, GemmOperand a, GemmOperand b, float beta,
                           GemmOperand c, void* d, int64_t ldd, int64_t sd, int64_t batch) {
  for (int64_t bt = 0; bt < batch; ++bt)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) {
        double acc = 0;
        for (int64_t l = 0; l < k; ++l) {
          const int64_t ai = bt * a.stride + (ta == CUBLAS_OP_N ? i + l * a.ld : l + i * a.ld);
          const int64_t bi = bt * b.stride + (tb == CUBLAS_OP_N ? l + j * b.ld : j + l * b.ld);
          acc += double(gemm_load(a.p, a.t, ai)) * gemm_load(b.p, b.t, bi);
        }
        double v = double(alpha) * acc;
        if (beta != 0.f) v += double(beta) * gemm_load(c.p, c.t, bt * c.stride + i + j * c.ld);
        gemm_store(d, c.t, bt * sd + i + j * ldd, float(v));
      }
}

}  // namespace llama3::emu

inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t op, const void* alpha,
                                     const void* A, cublasLtMatrixLayout_t la, const void* B,
                                     cublasLtMatrixLayout_t lb, const void* beta, const void* C,
                                     cublasLtMatrixLayout_t lc, void* D, cublasLtMatrixLayout_t ld,
                                     const cublasLtMatmulAlgo_t* algo, void*, size_t,
                                     cudaStream_t) {
  if (algo && algo->data[0] == 1) return CUBLAS_STATUS_NOT_SUPPORTED;  // (the failing candidate)
  const int64_t m = int64_t(lc->rows), n = int64_t(lc->cols);
  const int64_t k = int64_t(op->ta == CUBLAS_OP_N ? la->cols : la->rows);
  const int64_t mb = int64_t(op->tb == CUBLAS_OP_N ? lb->rows : lb->cols);
  const int64_t ma = int64_t(op->ta == CUBLAS_OP_N ? la->rows : la->cols);
  const int64_t nb = int64_t(op->tb == CUBLAS_OP_N ? lb->cols : lb->rows);
  if (ma != m || nb != n || mb != k || ld->rows != lc->rows || ld->cols != lc->cols)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  // Host alpha/beta and the descriptors are read now: a captured GEMM keeps them.
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  const llama3::emu::GemmOperand a{A, la->type, la->ld, la->stride},
      b{B, lb->type, lb->ld, lb->stride}, c{C, lc->type, lc->ld, lc->stride};
  const cublasOperation_t ta = op->ta, tb = op->tb;
  const int64_t ldd = ld->ld, sd = ld->stride, batch = lc->batch;
  llama3::emu::run_or_record(
      [=] { llama3::emu::gemm_reference(ta, tb, m, n, k, al, a, b, be, c, D, ldd, sd, batch); });
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
    const void* alpha, const void* A, cudaDataType_t at, int lda, long long sa, const void* B,
    cudaDataType_t bt, int ldb, long long sb, const void* beta, void* C, cudaDataType_t ct, int ldc,
    long long sc, int batch, cublasComputeType_t, cublasGemmAlgo_t) {
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  llama3::emu::run_or_record([=] {
    llama3::emu::gemm_reference(ta, tb, m, n, k, al, {A, at, lda, sa}, {B, bt, ldb, sb}, be,
                                {C, ct, ldc, sc}, C, ldc, sc, batch);
  });
  return CUBLAS_STATUS_SUCCESS;
}
