// Device helpers shared by the CUDA kernel files: typed loads/stores with f32 compute,
// warp/block reductions, launch geometry.
#pragma once

#ifndef LLAMA3_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <type_traits>

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

// Four consecutive elements (p aligned to four of them) as floats, and back: one 16-byte (f32)
// or 8-byte (bf16) access.
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&f)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    f[0] = a.x, f[1] = a.y, f[2] = c.x, f[3] = c.y;
  }
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&f)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
  } else {
    const __nv_bfloat162 a = __floats2bfloat162_rn(f[0], f[1]),
                         c = __floats2bfloat162_rn(f[2], f[3]);
    *reinterpret_cast<uint2*>(p) =
        make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&c));
  }
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
  // (clang-format takes .cuh for C++ and would split the chevrons.)
  // clang-format off
  k<<<grid, block, smem, s>>>(static_cast<A&&>(args)...);
  // clang-format on
}
#endif

// Keys [lo, hi) that query row i of batch row b sees (AttnShape: its key position q_pos[i]
// or i, the document run of that key, the causal bound); rows past T see nothing.
__device__ __forceinline__ void visible_keys(const AttnShape& a, const int32_t* dstart,
                                             const int32_t* dend, int64_t b, int64_t i, int64_t& lo,
                                             int64_t& hi) {
  if (i >= a.T) {
    lo = hi = 0;
    return;
  }
  const int64_t p = a.q_pos ? a.q_pos[i] : i;
  if (p < 0 || p >= a.Tk) {  // (a bad q_pos sees nothing rather than reading past the keys)
    lo = hi = 0;
    return;
  }
  lo = dstart ? dstart[b * a.Tk + p] : 0;
  hi = dend ? dend[b * a.Tk + p] : a.Tk;
  if (a.causal) hi = min(hi, p + 1);
}
// The keys [lo, hi) that any of query rows [i0, i0 + n) sees (empty rows ignored), each thread
// computing it alone: for q_pos, whose rows need not be monotonic.
__device__ __forceinline__ void visible_keys_of_rows(const AttnShape& a, const int32_t* dstart,
                                                     const int32_t* dend, int64_t b, int64_t i0,
                                                     int64_t n, int64_t& lo, int64_t& hi) {
  lo = a.Tk, hi = 0;
  for (int64_t r = 0; r < n; ++r) {
    int64_t l, h;
    visible_keys(a, dstart, dend, b, i0 + r, l, h);
    if (l < h) lo = min(lo, l), hi = max(hi, h);
  }
}

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
