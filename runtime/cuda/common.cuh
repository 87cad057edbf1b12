// Device helpers shared by the CUDA kernel files: typed loads/stores with f32 compute,
// warp/block reductions, launch geometry.
#pragma once

#ifndef LLAMA3_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "runtime/cuda/kernels.h"

LLAMA3_CUDA_NS_BEGIN

__device__ __forceinline__ float to_f32(float x) {
  return x;
}
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; every thread gets the result. blockDim.x a multiple of 32, <= 1024.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T buf[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[w] = v;
  __syncthreads();
  T r = lane < nw ? buf[lane] : T(0);
  return warp_sum(r);
}

// k<<<grid, block, smem, s>>>(args...), in the one spelling the SIMT emulator replaces
// (emu/cuda_emu.h runs the blocks on the CPU).
#ifdef LLAMA3_CUDA_EMU
using ::llama3::emu::launch_kernel;
#else
template <typename... P, typename... A>
void launch_kernel(void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                   A&&... args) {
  // clang-format off (it takes .cuh for C++ and splits the chevrons)
  k<<<grid, block, smem, s>>>(static_cast<A&&>(args)...);
  // clang-format on
}
#endif

inline int grid_for(int64_t n, int threads, int max_blocks = 132 * 16) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return int(b < max_blocks ? b : max_blocks);
}

// Runs f.template operator()<T>() with T = float or __nv_bfloat16.
template <typename F>
cudaError_t dispatch_ft(KT t, F&& f) {
  if (t == KT::f32) return f.template operator()<float>();
  if (t == KT::bf16) return f.template operator()<__nv_bfloat16>();
  return cudaErrorInvalidValue;
}

LLAMA3_CUDA_NS_END  // llama3::cuda
