// The CPU backend: oneDNN for GEMMs (f32, and bf16 inputs with f32 accumulation), OpenMP
// vectorised loops for everything else. It is the reference the CUDA backend is tested
// against, and it also runs in f64 so that every backward can be checked against finite
// differences.
#pragma once

#include "runtime/backend/backend.h"

namespace llama3 {

Backend& cpu_backend();

// The number of OpenMP threads the CPU kernels use.
int cpu_threads();

// oneDNN's GEMM on raw pointers (also used by benchmarks to measure the ceiling).
// c(M,N) = alpha * op(a) op(b) + beta c; lda/ldb/ldc are row strides in elements.
void cpu_gemm_f32(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void cpu_gemm_bf16(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a,
                   int64_t lda, const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc);

// bf16 weights packed for decode-step GEMMs (a few activation rows times a weight, reused for
// every step of a generation): B (n, k) row-major -> panels of 16 output features with k in
// pairs, zero-padded (cpu_packed_bf16_elems elements). cpu_gemm_bf16_packed computes
// c (m x n, row stride ldc) = a (m x k) B^T from the packed form; f32 accumulation.
int64_t cpu_packed_bf16_elems(int64_t n, int64_t k);
void cpu_pack_bf16_panels(const bf16* b, int64_t n, int64_t k, int64_t ldb, bf16* out);
void cpu_gemm_bf16_packed(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda,
                          const bf16* packed, float* c, int64_t ldc);

// The GEMM ceiling of this machine: best oneDNN square GEMM rate (FLOP/s) for n = 1024 up
// to max_n, f32 or bf16 inputs. Used for "% of GEMM peak" in progress lines and benchmarks.
double cpu_gemm_peak_flops(bool bf16_inputs, int64_t max_n = 1024);

}  // namespace llama3
