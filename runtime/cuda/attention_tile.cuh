// Tile staging for the tensor-core attention kernels (attention_mma.cu): rows of a
// (B, T, heads, D) tensor, f32 or bf16, loaded into a bf16 shared-memory tile with zero
// padding, and the vector f32 atomics of the dQ sums.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "runtime/cuda/common.cuh"

namespace llama3::cuda::attn_tile {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float4 load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 load4(const bf16* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

// Rows [r0, r0 + ROWS) of a (B, T, nh, D) tensor at (b, head) -> s[ROWS][DP] bf16, zero
// outside [0, T) x [0, D), by THREADS threads. vec: D == DMAX and 16-byte aligned base
// pointers (4 elements a thread).
template <typename T, int DMAX, int DP, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_bf16(bf16* s, const T* x, int64_t b, int64_t head,
                                               int64_t nh, int64_t r0, int64_t Tn, int64_t D,
                                               bool vec) {
  if (vec) {
    constexpr int C4 = DMAX / 4;
    for (int idx = threadIdx.x; idx < ROWS * C4; idx += THREADS) {
      const int r = idx / C4, c = (idx % C4) * 4;
      const int64_t row = r0 + r;
      float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < Tn) f = load4(x + ((b * Tn + row) * nh + head) * D + c);
      __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(s + r * DP + c);
      d[0] = __floats2bfloat162_rn(f.x, f.y);
      d[1] = __floats2bfloat162_rn(f.z, f.w);
    }
    return;
  }
  for (int idx = threadIdx.x; idx < ROWS * DMAX; idx += THREADS) {
    const int r = idx / DMAX, c = idx % DMAX;
    const int64_t row = r0 + r;
    float v = 0.f;
    if (row < Tn && c < D) v = to_f32(x[((b * Tn + row) * nh + head) * D + c]);
    s[r * DP + c] = __float2bfloat16_rn(v);
  }
}

// p[0..1] += (x, y) atomically (one vector atomic on Hopper; p 8-byte aligned).
__device__ __forceinline__ void add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p + 0, x), atomicAdd(p + 1, y);
#endif
}

}  // namespace llama3::cuda::attn_tile
