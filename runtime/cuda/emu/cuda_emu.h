// The subset of CUDA that the kernels of runtime/cuda use, for compiling them as C++ against
// the SIMT emulator (simt.h) when LLAMA3_CUDA_EMU is defined: qualifiers, the thread
// coordinates, bf16/f16 types and conversions, float2/float4, shuffles, atomics, barriers,
// the warp-level tensor-core instructions (mma.sync m16n8k16 bf16, ldmatrix x4), cp.async,
// the handful of runtime calls the launchers make, a cub::BlockScan and launch_kernel.
// Device pointers are host pointers here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "runtime/cuda/emu/simt.h"

// ---- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so a block's shared variables can be function statics.
#define __shared__ static
// Dynamic shared memory: `extern __shared__ T name[]` in CUDA.
#define LLAMA3_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::llama3::emu::dynamic_smem())

// ---- coordinates
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
#define threadIdx (reinterpret_cast<const uint3&>(::llama3::emu::thread_idx()))
#define blockIdx (reinterpret_cast<const uint3&>(::llama3::emu::block_idx()))
#define blockDim (reinterpret_cast<const dim3&>(::llama3::emu::block_dim()))
#define gridDim (reinterpret_cast<const dim3&>(::llama3::emu::grid_dim()))

// ---- vector types
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float2 make_float2(float x, float y) {
  return {x, y};
}
inline uint2 make_uint2(unsigned x, unsigned y) {
  return {x, y};
}
inline float4 make_float4(float x, float y, float z, float w) {
  return {x, y, z, w};
}

// ---- bf16 and f16 (round to nearest even, NaN kept quiet)
struct __nv_bfloat16 {
  uint16_t x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
  return {__bfloat162float(v.x), __bfloat162float(v.y)};
}
struct __half {
  _Float16 v;
};
inline __half __float2half_rn(float f) {
  return {static_cast<_Float16>(f)};
}
inline float __half2float(__half h) {
  return static_cast<float>(h.v);
}

// ---- CUDA's global min/max/isfinite overloads (one per integer width, so mixed calls
// convert as they do under nvcc)
#define LLAMA3_EMU_MINMAX(T) \
  inline T min(T a, T b) {   \
    return a < b ? a : b;    \
  }                          \
  inline T max(T a, T b) {   \
    return a > b ? a : b;    \
  }
LLAMA3_EMU_MINMAX(int)
LLAMA3_EMU_MINMAX(unsigned)
LLAMA3_EMU_MINMAX(long)
LLAMA3_EMU_MINMAX(unsigned long)
LLAMA3_EMU_MINMAX(long long)
#undef LLAMA3_EMU_MINMAX
inline float min(float a, float b) {
  return std::fmin(a, b);
}
inline float max(float a, float b) {
  return std::fmax(a, b);
}
using std::isfinite;

// ---- math intrinsics (the fast forms compute exactly here)
inline float __expf(float x) {
  return std::exp(x);
}
inline float __fadd_rn(float a, float b) {
  return a + b;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}

// ---- atomics (one OS thread runs every emulated thread: plain read-modify-write)
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T o = *p;
  *p = o + v;
  return o;
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  const __nv_bfloat16 o = *p;
  *p = __float2bfloat16_rn(__bfloat162float(o) + __bfloat162float(v));
  return o;
}
inline int atomicMax(int* p, int v) {
  return std::exchange(*p, *p > v ? *p : v);
}
inline int atomicMin(int* p, int v) {
  return std::exchange(*p, *p < v ? *p : v);
}
inline int atomicOr(int* p, int v) {
  return std::exchange(*p, *p | v);
}

// ---- barriers and shuffles
// (Blocks run one at a time and threads switch only at barriers: every write is visible.)
inline void __threadfence() {}
inline void __syncthreads() {
  ::llama3::emu::sync_block();
}
inline int __syncthreads_and(int p) {
  return ::llama3::emu::sync_block(1, p);
}
inline int __syncthreads_or(int p) {
  return ::llama3::emu::sync_block(2, p);
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= ::llama3::emu::kSlotBytes && std::is_trivially_copyable_v<T>);
  const unsigned char* s = ::llama3::emu::warp_exchange(&v, sizeof(T));
  T r;
  std::memcpy(&r, s + ((::llama3::emu::lane_id() ^ mask) & 31) * ::llama3::emu::kSlotBytes,
              sizeof(T));
  return r;
}
// Warp vote over the whole warp (every lane takes part, as with the shuffles).
inline int __all_sync(unsigned, int p) {
  const int mine = p != 0;
  const unsigned char* s = ::llama3::emu::warp_exchange(&mine, sizeof(int));
  for (int l = 0; l < 32; ++l) {
    int v;
    std::memcpy(&v, s + l * ::llama3::emu::kSlotBytes, sizeof(int));
    if (!v) return 0;
  }
  return 1;
}

// ---- runtime API subset
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901
};
using cudaStream_t = struct CUstream_st*;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline cudaError_t cudaGetLastError() {
  return cudaSuccess;
}
namespace llama3::emu {
// The emulated errors' names and texts (as CUDA's cudaGetErrorName / cudaGetErrorString).
struct ErrorText {
  cudaError_t code;
  const char *name, *text;
};
inline const ErrorText& error_text(cudaError_t e) {
  static const ErrorText table[] = {
      {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid value"},
      {cudaSuccess, "cudaSuccess", "no error"},
      {cudaErrorStreamCaptureUnsupported, "cudaErrorStreamCaptureUnsupported",
       "operation not permitted when stream is capturing"},
      {cudaErrorStreamCaptureInvalidated, "cudaErrorStreamCaptureInvalidated",
       "operation failed due to a previous error during capture"}};
  for (const ErrorText& t : table)
    if (t.code == e) return t;
  return table[0];
}
}  // namespace llama3::emu
inline const char* cudaGetErrorString(cudaError_t e) {
  return llama3::emu::error_text(e).text;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
namespace llama3::emu {
// A synchronising call during capture: the capture is invalidated (cudaStreamEndCapture
// then fails too) and the call fails, as on a GPU.
inline bool capture_violation() {
  if (!recording()) return false;
  capture_invalidated() = true;
  return true;
}
}  // namespace llama3::emu
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  llama3::emu::run_or_record([=] { std::memset(p, v, n); });
  return cudaSuccess;
}
// Host memory here is pageable: copies to or from it cannot be captured (on a GPU they
// would also need pinned memory to be asynchronous), so they fail under capture.
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  if (kind != cudaMemcpyDeviceToDevice && llama3::emu::capture_violation())
    return cudaErrorStreamCaptureUnsupported;
  llama3::emu::run_or_record([=] { std::memmove(d, s, n); });
  return cudaSuccess;
}

namespace llama3::emu {

// launch_kernel(k, grid, block, smem, stream, args...) = k<<<grid, block, smem, stream>>>(args...):
// the arguments are converted to the kernel's parameter types once, and every thread gets
// its own copy, as CUDA passes them.
template <typename... P, typename... A>
void launch_kernel(void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... a) {
  // Converted now, so a captured launch keeps the values of capture time.
  const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
  run_or_record([=] {
    run_grid({grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem, [&] {
      std::tuple<std::decay_t<P>...> mine = args;
      std::apply(k, mine);
    });
  });
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += a b, with the PTX ISA's
// fragment layout (lane = 4 g + t4): a[0] = A(g, 2 t4..+1), a[1] = A(g + 8, ..),
// a[2] = A(g, 2 t4 + 8..+9), a[3] = A(g + 8, 2 t4 + 8..); b0 = B(2 t4..+1, g),
// b1 = B(2 t4 + 8..+9, g); c0, c1 = C(g, 2 t4..+1), c2, c3 = C(g + 8, ..). Products are
// exact in f32 and summed in k order (the hardware's summation order is unspecified).
inline void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Ops {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const unsigned char* s = warp_exchange(&mine, sizeof mine);
  auto lo = [](uint32_t w) { return __bfloat162float({uint16_t(w & 0xffffu)}); };
  auto hi = [](uint32_t w) { return __bfloat162float({uint16_t(w >> 16)}); };
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    Ops o;
    std::memcpy(&o, s + l * kSlotBytes, sizeof o);
    const int gg = l >> 2, t = l & 3;
    A[gg][2 * t] = lo(o.a[0]), A[gg][2 * t + 1] = hi(o.a[0]);
    A[gg + 8][2 * t] = lo(o.a[1]), A[gg + 8][2 * t + 1] = hi(o.a[1]);
    A[gg][2 * t + 8] = lo(o.a[2]), A[gg][2 * t + 9] = hi(o.a[2]);
    A[gg + 8][2 * t + 8] = lo(o.a[3]), A[gg + 8][2 * t + 9] = hi(o.a[3]);
    B[2 * t][gg] = lo(o.b[0]), B[2 * t + 1][gg] = hi(o.b[0]);
    B[2 * t + 8][gg] = lo(o.b[1]), B[2 * t + 9][gg] = hi(o.b[1]);
  }
  const int l = lane_id(), gg = l >> 2, t = l & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = gg + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[i] = acc;
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8; it receives (row l / 4, cols 2 (l % 4), +1) of each matrix, or with .trans
// (rows 2 (l % 4), +1; col l / 4): the matrix transposed.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  const unsigned char* s = warp_exchange(&p, sizeof p);
  auto row = [&](int i) {
    const void* q;
    std::memcpy(&q, s + i * kSlotBytes, sizeof q);
    return static_cast<const uint16_t*>(q);
  };
  const int l = lane_id();
  for (int j = 0; j < 4; ++j) {
    uint16_t e0, e1;
    if (!trans) {
      const uint16_t* rp = row(8 * j + l / 4);
      e0 = rp[2 * (l % 4)], e1 = rp[2 * (l % 4) + 1];
    } else {
      e0 = row(8 * j + 2 * (l % 4))[l / 4], e1 = row(8 * j + 2 * (l % 4) + 1)[l / 4];
    }
    r[j] = uint32_t(e0) | (uint32_t(e1) << 16);
  }
}

// stmatrix.sync.aligned.m8n8.x4[.trans].shared.b16, the inverse of ldmatrix: lane l gives
// the address of row l % 8 of matrix l / 8 and holds (row l / 4, cols 2 (l % 4), +1) of each
// matrix in r; with .trans the matrices are stored transposed (stored row c = column c).
inline void stmatrix_x4(const uint32_t (&r)[4], void* p, bool trans) {
  struct Mine {
    void* p;
    uint32_t r[4];
  } mine{p, {r[0], r[1], r[2], r[3]}};
  const unsigned char* s = warp_exchange(&mine, sizeof mine);
  auto slot = [&](int l) {
    Mine m;
    std::memcpy(&m, s + l * kSlotBytes, sizeof m);
    return m;
  };
  // This lane stores the row it addressed: row c of matrix i.
  const int l = lane_id(), i = l / 8, c = l % 8;
  uint16_t* row = static_cast<uint16_t*>(slot(l).p);
  for (int e = 0; e < 8; ++e) {
    // Element e of the stored row: (row c, col e) of the matrix, or (row e, col c) with .trans.
    const int fr = trans ? e : c, fc = trans ? c : e;
    const uint32_t w = slot(4 * fr + fc / 2).r[i];
    row[e] = uint16_t(fc % 2 ? w >> 16 : w & 0xffffu);
  }
}

// cp.async: completes at once (zero fill when !valid).
inline void cp_async(void* smem, const void* gmem, size_t bytes, bool valid) {
  if (valid)
    std::memcpy(smem, gmem, bytes);
  else
    std::memset(smem, 0, bytes);
}

}  // namespace llama3::emu

// ---- cub::BlockScan (InclusiveScan with an operator; what doc_runs_kernel uses)
namespace cub {
template <typename T, int N>
class BlockScan {
 public:
  struct TempStorage {
    T v[N];
  };
  explicit BlockScan(TempStorage& t) : t_(t) {}
  template <typename Op>
  void InclusiveScan(T in, T& out, Op op) {
    const unsigned i = threadIdx.x;
    t_.v[i] = in;
    __syncthreads();
    T acc = t_.v[0];
    for (unsigned j = 1; j <= i; ++j) acc = op(acc, t_.v[j]);
    __syncthreads();
    out = acc;
  }

 private:
  TempStorage& t_;
};
}  // namespace cub
