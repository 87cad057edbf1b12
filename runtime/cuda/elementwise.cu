// Memory, element-wise, reduction and fused Llama kernels (everything but attention).
// All floating kernels compute in f32 whatever the storage type (f32 or bf16).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "runtime/cuda/common.cuh"

LLAMA3_CUDA_NS_BEGIN

namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------- memory
__device__ double load_any(const void* p, int64_t i, KT t) {
  switch (t) {
    case KT::f32:
      return static_cast<const float*>(p)[i];
    case KT::bf16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case KT::f16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case KT::i32:
      return static_cast<const int32_t*>(p)[i];
    case KT::i64:
      return double(static_cast<const int64_t*>(p)[i]);
    case KT::u8:
      return static_cast<const uint8_t*>(p)[i];
  }
  return 0;
}
__device__ void store_any(void* p, int64_t i, KT t, double v) {
  switch (t) {
    case KT::f32:
      static_cast<float*>(p)[i] = float(v);
      return;
    case KT::bf16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(float(v));
      return;
    case KT::f16:
      static_cast<__half*>(p)[i] = __float2half_rn(float(v));
      return;
    case KT::i32:
      static_cast<int32_t*>(p)[i] = int32_t(v);
      return;
    case KT::i64:
      static_cast<int64_t*>(p)[i] = int64_t(v);
      return;
    case KT::u8:
      static_cast<uint8_t*>(p)[i] = uint8_t(v);
      return;
  }
}

__global__ void f32_to_bf16_kernel(const float* s, __nv_bfloat16* d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    d[i] = __float2bfloat16_rn(s[i]);
}
__global__ void bf16_to_f32_kernel(const __nv_bfloat16* s, float* d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    d[i] = __bfloat162float(s[i]);
}
// Four elements a thread (16-byte loads of f32, 8-byte stores of bf16, and back): the
// casts of mixed precision are pure bandwidth. n4 = n / 4 groups; both pointers 16-byte
// aligned; the launcher converts the tail with the scalar kernels.
__global__ void f32_to_bf16_x4_kernel(const float4* s, uint2* d, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = s[i];
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    d[i] =
        make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
  }
}
__global__ void bf16_to_f32_x4_kernel(const uint2* s, float4* d, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint2 u = s[i];
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    d[i] = make_float4(a.x, a.y, b.x, b.y);
  }
}
__global__ void convert_kernel(const void* s, KT st, void* d, KT dt, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_any(d, i, dt, load_any(s, i, st));
}
__global__ void strided_kernel(const void* s, KT st, void* d, KT dt, Strided desc, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rem = i, so = 0, dof = 0;
    for (int k = desc.nd - 1; k >= 0; --k) {
      const int64_t idx = rem % desc.shape[k];
      rem /= desc.shape[k];
      so += idx * desc.src_stride[k];
      dof += idx * desc.dst_stride[k];
    }
    store_any(d, dof, dt, load_any(s, so, st));
  }
}
template <typename T>
__global__ void fill_kernel(T* d, int64_t n, T v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    d[i] = v;
}

// ---------------------------------------------------------------- element-wise
template <typename T>
__global__ void add_kernel(const T* a, const T* b, T* o, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    o[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}
// y += alpha x; alpha_dev (when set): alpha read when the kernel runs (a captured upstream
// gradient).
template <typename T>
__global__ void axpy_kernel(float alpha, const float* alpha_dev, const T* x, T* y, int64_t n) {
  const float a = alpha_dev ? *alpha_dev : alpha;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = from_f32<T>(to_f32(y[i]) + a * to_f32(x[i]));
}
template <typename T>
__global__ void scale_kernel(T* x, float alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = from_f32<T>(to_f32(x[i]) * alpha);
}
// x *= s[0], read when the kernel runs (a captured upstream gradient); s == 1 leaves x as is.
template <typename T>
__global__ void scale_by_kernel(T* x, const float* s, int64_t n) {
  const float alpha = *s;
  if (alpha == 1.f) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = from_f32<T>(to_f32(x[i]) * alpha);
}
// One thread: the slots summed in order (as the host sums sum_squares_many's slots, so the
// norm and clip factor have the same bits), then the clipping state (AdamWDynamic layout:
// [0] norm, [1] grad_scale, [2] skip).
__global__ void clip_state_kernel(const double* slots, int64_t n, const float* loss, float max_norm,
                                  float* state, const int* bad, int n_bad) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += slots[i];
  const double norm = sqrt(ss);
  state[0] = float(norm);
  state[1] = max_norm > 0.f ? float(fmin(1.0, double(max_norm) / (norm + 1e-6))) : 1.f;
  bool ok = isfinite(norm) && (!loss || isfinite(*loss));
  for (int i = 0; i < n_bad; ++i) ok = ok && bad[i] == 0;
  state[2] = ok ? 0.f : 1.f;
}
__global__ void f64_div_to_f32_kernel(const double* x, double div, float* out,
                                      const double* div_dev) {
  *out = float(*x / (div_dev ? *div_dev : div));
}
// Multi-tensor kernels (sumsq_multi_kernel, adamw_multi_kernel).
// The table of one multi-tensor launch (a kernel argument): tensor k owns chunks
// [chunk0[k], chunk0[k + 1]) of kMultiChunk elements; vec[k]: its arrays allow 16-byte
// accesses. Blocks take chunks blockIdx.x, + gridDim.x, ...
template <typename T, int K>
struct MultiTable {
  T t[K];
  uint32_t chunk0[K + 1];
  bool vec[K];
  int count;
};
// The tensor of chunk c (block-uniform): the last k with chunk0[k] <= c.
template <typename Table>
__device__ __forceinline__ int multi_tensor_of(const Table& tab, uint32_t c) {
  int lo = 0, hi = tab.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab.chunk0[mid] <= c)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}
// The end of a deterministic reduction: every block's acc summed, written to partial
// [blockIdx.x]; the last block to finish (counted in *done) adds the partials in block order
// (a fixed grid for given inputs), writes *out = sum (+ *out when accumulate) and resets *done.
__device__ __forceinline__ void finish_partials(double acc, double* out, bool accumulate,
                                                double* partial, unsigned* done) {
  acc = block_sum(acc);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = acc;
    __threadfence();  // the partial is visible before the count that announces it
    last = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double s = 0;
  for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x)
    s += *static_cast<volatile const double*>(partial + b);
  s = block_sum(s);
  if (threadIdx.x == 0) *out = accumulate ? *out + s : s, *done = 0;
}
template <typename T>
__global__ void reduce_kernel(const T* x, int64_t n, bool squares, double* out, double* partial,
                              unsigned* done) {
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double v = to_f32(x[i]);
    acc += squares ? v * v : v;
  }
  finish_partials(acc, out, false, partial, done);
}
// The multi-tensor sum of squares (sum_squares_multi): f64 per element as reduce_kernel, each
// chunk's sum weighted by its tensor's weight.
using SumSqTable = MultiTable<SumSqTensor, kSumSqTensors>;
__global__ void sumsq_multi_kernel(SumSqTable tab, double* out, bool accumulate, double* partial,
                                   unsigned* done) {
  double acc = 0;
  const uint32_t total = tab.chunk0[tab.count];
  for (uint32_t c = blockIdx.x; c < total; c += gridDim.x) {
    const int k = multi_tensor_of(tab, c);
    const SumSqTensor& t = tab.t[k];
    const int64_t e0 = int64_t(c - tab.chunk0[k]) * kMultiChunk;
    const int64_t e1 = min(e0 + kMultiChunk, t.n);
    int64_t tail = e0;
    double part = 0;
    if (tab.vec[k]) {
      const float4* x = reinterpret_cast<const float4*>(t.x + e0);
      const int64_t n4 = (e1 - e0) / 4;
#pragma unroll 4
      for (int64_t i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 f = __ldcs(x + i);
        part += double(f.x) * f.x + double(f.y) * f.y + double(f.z) * f.z + double(f.w) * f.w;
      }
      tail = e0 + n4 * 4;
    }
    for (int64_t i = tail + threadIdx.x; i < e1; i += blockDim.x) {
      const double f = t.x[i];
      part += f * f;
    }
    acc += t.weight * part;
  }
  finish_partials(acc, out, accumulate, partial, done);
}
template <typename T>
__global__ void nonfinite_kernel(const T* x, int64_t n, int* bad) {
  int b = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    b |= !isfinite(to_f32(x[i]));
  if (__syncthreads_or(b) && threadIdx.x == 0) atomicOr(bad, 1);
}

// ---------------------------------------------------------------- embedding
template <typename T>
__global__ void embedding_fwd_kernel(const T* w, const int32_t* ids, T* out, int64_t d, int64_t v,
                                     int* bad) {
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  T* o = out + i * d;
  if (id < 0 || id >= v) {
    if (threadIdx.x == 0) atomicOr(bad, 1);
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) o[c] = from_f32<T>(0.f);
    return;
  }
  const T* r = w + int64_t(id) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) o[c] = r[c];
}
// The backward in two passes, so that every run adds the same numbers in the same order (f32
// atomics into a row would add a repeated token's gradients in arrival order):
// 1. each position's slot among the n positions sorted by (id, position): the count of the
//    positions before it in that order, by n^2 comparisons tiled through shared memory (about
//    17M at 4096 tokens, 270M at 16384);
// 2. one block per run of equal ids adds its positions' gradient rows into the table's row in
//    position order, in f32: the CPU backend's order, so f32 results match it bit for bit.
constexpr int kEmbRankThreads = 128, kEmbRankTile = 1024;
__global__ void embedding_rank_kernel(const int32_t* ids, int64_t n, int32_t* order,
                                      int32_t* sorted) {
  __shared__ int32_t tile[kEmbRankTile];
  const int64_t i = blockIdx.x * int64_t(kEmbRankThreads) + threadIdx.x;
  const int32_t id = i < n ? ids[i] : 0;
  int64_t rank = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kEmbRankTile) {
    const int m = n - j0 < kEmbRankTile ? int(n - j0) : kEmbRankTile;
    __syncthreads();  // the previous tile is read
    for (int k = threadIdx.x; k < m; k += kEmbRankThreads) tile[k] = ids[j0 + k];
    __syncthreads();
    // positions j0 + k before i: k < before
    const int before = i - j0 < 0 ? 0 : (i - j0 > m ? m : int(i - j0));
    int r = 0;
    for (int k = 0; k < m; ++k) {
      const int32_t o = tile[k];
      r += (o < id) | ((o == id) & (k < before));
    }
    rank += r;
  }
  if (i < n) order[rank] = int32_t(i), sorted[rank] = id;
}
template <typename T>
__global__ void embedding_bwd_kernel(const T* g, const int32_t* order, const int32_t* sorted,
                                     int64_t n, T* dw, int64_t d, int64_t v) {
  const int64_t s = blockIdx.x;
  const int32_t id = sorted[s];
  // A run's first slot adds the run; ids outside the table (reported by the forward) add
  // nothing.
  if ((s > 0 && sorted[s - 1] == id) || id < 0 || id >= v) return;
  int64_t e = s + 1;
  while (e < n && sorted[e] == id) ++e;
  T* r = dw + int64_t(id) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = to_f32(r[c]);
    for (int64_t t = s; t < e; ++t) acc += to_f32(g[int64_t(order[t]) * d + c]);
    r[c] = from_f32<T>(acc);
  }
}

// ---------------------------------------------------------------- rmsnorm
// y may be bf16 for f32 x (a normalised input that only feeds bf16 GEMMs).
template <typename T, typename TY>
__global__ void rmsnorm_fwd_kernel(const T* x, const T* w, float eps, TY* y, T* rstd, int64_t d) {
  const int64_t i = blockIdx.x;
  const T* xr = x + i * d;
  float ss = 0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = to_f32(xr[c]);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float r = 1.f / sqrtf(ss / float(d) + eps);
  if (threadIdx.x == 0) rstd[i] = from_f32<T>(r);
  TY* yr = y + i * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
    yr[c] = from_f32<TY>(to_f32(xr[c]) * r * to_f32(w[c]));
}
// f32 rows of d = 4 d4 columns (d4 <= NV blockDim.x; x, w 16-byte aligned, y aligned to four
// elements), one row a block: each thread loads its NV float4 of the row once and keeps them
// in registers for the output (the kernel above reads the row twice in 4-byte loads, and
// writes y two bytes at a time when it is bf16). Same arithmetic per element.
template <typename TY, int NV>
__global__ void rmsnorm_fwd_vec_kernel(const float* x, const float* w, float eps, TY* y,
                                       float* rstd, uint32_t d4) {
  const float4* xr = reinterpret_cast<const float4*>(x) + size_t(blockIdx.x) * d4;
  float4 v[NV];
  float ss = 0;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const uint32_t c = threadIdx.x + k * blockDim.x;
    v[k] = c < d4 ? xr[c] : make_float4(0.f, 0.f, 0.f, 0.f);
    ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
  }
  ss = block_sum(ss);
  const float r = 1.f / sqrtf(ss / float(4 * d4) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  TY* yr = y + size_t(blockIdx.x) * d4 * 4;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const uint32_t c = threadIdx.x + k * blockDim.x;
    if (c >= d4) break;
    const float4 wv = reinterpret_cast<const float4*>(w)[c];
    const float o[4] = {v[k].x * r * wv.x, v[k].y * r * wv.y, v[k].z * r * wv.z, v[k].w * r * wv.w};
    store4(yr + 4 * c, o);
  }
}
// dx's new value: v, or (acc_dx) the old dx plus v with the add rounded on its own (no
// multiply-add contraction), as a separate add of the two gradients would round it.
template <typename T>
__device__ __forceinline__ T dx_out(T old, float v, bool acc_dx) {
  return from_f32<T>(acc_dx ? __fadd_rn(to_f32(old), v) : v);
}
// dy element e: dy[e], or (PARTS) the f32 sum of the parts' bf16 elements e in their order
// (each add rounded alone, as the default's copy and axpy passes round them).
template <bool PARTS, typename T>
__device__ __forceinline__ float dy_at(const T* dy, const RmsDyParts& P, int64_t e) {
  if constexpr (!PARTS) {
    return to_f32(dy[e]);
  } else {
    // (Constant indices: the pointers stay in the parameter bank; a loop over j put the
    // struct in a 40-byte stack frame.)
    const auto at = [&](int j) {
      return __bfloat162float(static_cast<const __nv_bfloat16*>(P.p[j])[e]);
    };
    float s = at(0);
    if (P.n > 1) s = __fadd_rn(s, at(1));
    if (P.n > 2) s = __fadd_rn(s, at(2));
    if (P.n > 3) s = __fadd_rn(s, at(3));
    return s;
  }
}
// Grid-strided over rows; each block keeps its dw partial in its own row of `partial`.
// dx16 (when not null): the bf16 rounding of each new dx element too (the completed residual
// gradient a bf16 GEMM reads next; Backend::rmsnorm_backward_bf16). PARTS: dy from parts.
template <typename T, bool PARTS>
__global__ void rmsnorm_bwd_kernel(const T* dy, const T* x, const T* w, const T* rstd, T* dx,
                                   float* partial, int64_t n, int64_t d, bool acc_dx,
                                   __nv_bfloat16* dx16, RmsDyParts parts) {
  float* acc = partial + int64_t(blockIdx.x) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) acc[c] = 0.f;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* xr = x + i * d;
    const float r = to_f32(rstd[i]);
    float dot = 0;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
      dot += dy_at<PARTS>(dy, parts, i * d + c) * to_f32(w[c]) * to_f32(xr[c]);
    dot = block_sum(dot);
    const float k = dot * r * r / float(d);
    T* dr = dx + i * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const float g = dy_at<PARTS>(dy, parts, i * d + c), xv = to_f32(xr[c]);
      const T o = dx_out<T>(dr[c], r * (g * to_f32(w[c]) - xv * k), acc_dx);
      dr[c] = o;
      if (dx16) dx16[i * d + c] = __float2bfloat16_rn(to_f32(o));
      acc[c] += g * xv * r;
    }
  }
}
// The same for d <= CPT * blockDim.x: each thread holds its columns of w, of the current
// row (dy, x) and of the dw partial in registers, so a row is read from memory once and
// the partial is written once at the end (the kernel above re-reads each row and
// read-modify-writes the partial for every row). PF (LLAMA3_RMSNORM_BWD_PREFETCH=1, a
// candidate not yet timed on a GPU): the block's next row is loaded before this row's block
// reduction, so its loads are in flight while the block waits at the barriers (without it,
// each of a block's about 8 rows exposes a full memory latency); the same arithmetic, so the
// same bits.
template <typename T, int CPT, bool PF, bool PARTS>
__global__ void rmsnorm_bwd_reg_kernel(const T* dy, const T* x, const T* w, const T* rstd, T* dx,
                                       float* partial, int64_t n, int64_t d, bool acc_dx,
                                       __nv_bfloat16* dx16, RmsDyParts parts) {
  float wv[CPT], acc[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
    wv[k] = c < d ? to_f32(w[c]) : 0.f;
    acc[k] = 0.f;
  }
  // Row i's dy, x, rstd and (acc_dx) old dx. (The sum's old dx is loaded with the row,
  // before the block reduction: loaded after it, its latency was exposed on every row and the
  // accumulating pass ran 1.7x slower.)
  const auto load = [&](int64_t i, float(&g)[CPT], float(&xx)[CPT], float(&o)[CPT], float& r) {
    const T *xr = x + i * d, *dr = dx + i * d;
    r = to_f32(rstd[i]);
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
      g[k] = c < d ? dy_at<PARTS>(dy, parts, i * d + c) : 0.f;
      xx[k] = c < d ? to_f32(xr[c]) : 0.f;
      o[k] = acc_dx && c < d ? to_f32(dr[c]) : 0.f;
    }
  };
  float gv[CPT], xv[CPT], ov[CPT], r = 0.f;
  if (int64_t(blockIdx.x) < n) load(blockIdx.x, gv, xv, ov, r);
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t next = i + gridDim.x;
    float gn[CPT], xn[CPT], on[CPT], rn = 0.f;
    if (PF && next < n) load(next, gn, xn, on, rn);
    float dot = 0;
#pragma unroll
    for (int k = 0; k < CPT; ++k) dot += gv[k] * wv[k] * xv[k];
    dot = block_sum(dot);
    const float kk = dot * r * r / float(d);
    T* dr = dx + i * d;
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
      const float v = r * (gv[k] * wv[k] - xv[k] * kk);
      if (c < d) {
        const T o = from_f32<T>(acc_dx ? __fadd_rn(ov[k], v) : v);
        dr[c] = o;
        if (dx16) dx16[i * d + c] = __float2bfloat16_rn(to_f32(o));
      }
      acc[k] += gv[k] * xv[k] * r;
    }
    if (next >= n) break;
    if constexpr (PF) {
#pragma unroll
      for (int k = 0; k < CPT; ++k) gv[k] = gn[k], xv[k] = xn[k], ov[k] = on[k];
      r = rn;
    } else {
      load(next, gv, xv, ov, r);
    }
  }
  float* out = partial + int64_t(blockIdx.x) * d;
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
    if (c < d) out[c] = acc[k];
  }
}
// dw += the column sums of partial (rows, d). Blocks of 32 columns x 8 row phases: each
// thread sums every 8th row of its column, then the 8 phases are added in shared memory (one
// thread a column over every row kept d / 256 blocks busy and ran 500+ dependent loads each).
constexpr int kReduceCols = 32, kReducePhases = 8;
template <typename T>
__global__ void rmsnorm_dw_reduce_kernel(const float* partial, int64_t rows, int64_t d, T* dw) {
  __shared__ float sh[kReducePhases][kReduceCols + 1];
  const int64_t c = int64_t(blockIdx.x) * kReduceCols + threadIdx.x;
  float s = 0;
  if (c < d)
    for (int64_t r = threadIdx.y; r < rows; r += kReducePhases) s += partial[r * d + c];
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    float t = 0;
#pragma unroll
    for (int k = 0; k < kReducePhases; ++k) t += sh[k][threadIdx.x];
    dw[c] = from_f32<T>(to_f32(dw[c]) + t);
  }
}

// ---------------------------------------------------------------- rope
template <typename T>
__global__ void rope_kernel(const T* x, const float* inv_freq, const int32_t* pos, bool inverse,
                            T* out, int64_t b, int64_t tt, int64_t h, int64_t dh) {
  const int64_t half = dh / 2, n = b * tt * h * half;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % half, row = e / half;  // row = (bi * tt + ti) * h + hi
    const int64_t ti = (row / h) % tt;
    const float a = float(pos[ti]) * inv_freq[j];
    float sn, cs;
    sincosf(a, &sn, &cs);
    if (inverse) sn = -sn;
    const T* xr = x + row * dh;
    T* orow = out + row * dh;
    const float x1 = to_f32(xr[j]), x2 = to_f32(xr[j + half]);
    orow[j] = from_f32<T>(x1 * cs - x2 * sn);
    orow[j + half] = from_f32<T>(x2 * cs + x1 * sn);
  }
}

// One block per per_block positions (b, t) (1 by default), four rotation pairs a thread
// (half % 4 == 0; x and out aligned to 4 elements): threadIdx.x walks the row's groups of
// four pairs, threadIdx.y the heads. The positions' half angles are computed once into shared
// memory and serve every head (a sincosf per element was ~20 instructions with a range
// reduction; q at 32 heads now takes one per 32 elements). 8- or 16-byte accesses; the only
// division is in the angles' setup. The same per-element arithmetic as rope_kernel.
template <typename T>
__global__ void rope_pos_kernel(const T* x, const float* inv_freq, const int32_t* pos, bool inverse,
                                T* out, uint32_t tt, uint32_t h, uint32_t dh, uint32_t n_pos,
                                uint32_t per_block) {
  LLAMA3_DYNAMIC_SMEM(float, cs);  // per position: [half] cos, then [half] sin
  const uint32_t half = dh / 2, p0 = blockIdx.x * per_block;  // positions bi * tt + ti
  const uint32_t np = min(per_block, n_pos - p0);
  const uint32_t nt = blockDim.x * blockDim.y, tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (uint32_t q = tid; q < np * half; q += nt) {
    const uint32_t r = q / half, j = q - r * half;
    float sn, c;
    sincosf(float(pos[(p0 + r) % tt]) * inv_freq[j], &sn, &c);
    cs[r * dh + j] = c, cs[r * dh + half + j] = inverse ? -sn : sn;
  }
  __syncthreads();
  const uint32_t j = threadIdx.x * 4;  // blockDim.x = half / 4
  for (uint32_t r = 0; r < np; ++r) {
    const float *cr = cs + r * dh, *sr = cr + half;
    for (uint32_t hi = threadIdx.y; hi < h; hi += blockDim.y) {
      const size_t row = size_t(p0 + r) * h + hi;
      const T* xr = x + row * dh;
      T* orow = out + row * dh;
      float x1[4], x2[4], o1[4], o2[4];
      load4(xr + j, x1), load4(xr + j + half, x2);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float c = cr[j + k], sn = sr[j + k];
        o1[k] = x1[k] * c - x2[k] * sn;
        o2[k] = x2[k] * c + x1[k] * sn;
      }
      store4(orow + j, o1), store4(orow + j + half, o2);
    }
  }
}

// ---------------------------------------------------------------- swiglu
template <typename T>
__global__ void swiglu_fwd_kernel(const T* g, const T* u, T* o, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float gv = to_f32(g[i]);
    const float s = 1.f / (1.f + expf(-gv));
    o[i] = from_f32<T>(gv * s * to_f32(u[i]));
  }
}
template <typename T>
__global__ void swiglu_bwd_kernel(const T* d, const T* g, const T* u, T* dg, T* du, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float gv = to_f32(g[i]), uv = to_f32(u[i]), dv = to_f32(d[i]);
    const float s = 1.f / (1.f + expf(-gv));
    du[i] = from_f32<T>(dv * gv * s);
    dg[i] = from_f32<T>(dv * uv * s * (1.f + gv * (1.f - s)));
  }
}

// f32 over float4 (every pointer 16-byte aligned; the launchers run the scalar kernels on
// the n % 4 tail): these passes are pure bandwidth, and 16-byte accesses move more per
// instruction than 4-byte ones.
__device__ __forceinline__ float silu_gate(float g, float& s) {
  s = 1.f / (1.f + expf(-g));
  return g * s;
}
__global__ void add_f32x4_kernel(const float4* a, const float4* b, float4* o, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 x = a[i], y = b[i];
    o[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
  }
}
__global__ void axpy_f32x4_kernel(float alpha, const float* alpha_dev, const float4* x, float4* y,
                                  int64_t n4) {
  const float a = alpha_dev ? *alpha_dev : alpha;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = x[i];
    float4 w = y[i];
    w.x += a * v.x, w.y += a * v.y, w.z += a * v.z, w.w += a * v.w;
    y[i] = w;
  }
}
__global__ void swiglu_fwd_f32x4_kernel(const float4* g, const float4* u, float4* o, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 gv = g[i], uv = u[i];
    float s;
    float4 r;
    r.x = silu_gate(gv.x, s) * uv.x, r.y = silu_gate(gv.y, s) * uv.y;
    r.z = silu_gate(gv.z, s) * uv.z, r.w = silu_gate(gv.w, s) * uv.w;
    o[i] = r;
  }
}
__global__ void swiglu_bwd_f32x4_kernel(const float4* d, const float4* g, const float4* u,
                                        float4* dg, float4* du, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 dv = d[i], gv = g[i], uv = u[i];
    const float dd[4] = {dv.x, dv.y, dv.z, dv.w}, gg[4] = {gv.x, gv.y, gv.z, gv.w},
                uu[4] = {uv.x, uv.y, uv.z, uv.w};
    float rg[4], ru[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float s;
      const float act = silu_gate(gg[k], s);
      ru[k] = dd[k] * act;
      rg[k] = dd[k] * uu[k] * s * (1.f + gg[k] * (1.f - s));
    }
    du[i] = make_float4(ru[0], ru[1], ru[2], ru[3]);
    dg[i] = make_float4(rg[0], rg[1], rg[2], rg[3]);
  }
}
// bf16 over 8 elements (one 16-byte access of each operand; the scalar bf16 kernels move
// 2 bytes per access and ran the bf16 SwiGLU of the mixed-precision step at about half the
// bandwidth of the f32 ones). The same per-element arithmetic as the kernels above.
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 t = __bfloat1622float2(h[k]);
    f[2 * k] = t.x, f[2 * k + 1] = t.y;
  }
}
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
  return u;
}
__global__ void swiglu_fwd_bf16x8_kernel(const uint4* g, const uint4* u, uint4* o, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8;
       i += int64_t(gridDim.x) * blockDim.x) {
    float gg[8], uu[8], r[8];
    unpack8(g[i], gg), unpack8(u[i], uu);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float s;
      r[k] = silu_gate(gg[k], s) * uu[k];
    }
    o[i] = pack8(r);
  }
}
__global__ void swiglu_bwd_bf16x8_kernel(const uint4* d, const uint4* g, const uint4* u, uint4* dg,
                                         uint4* du, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8;
       i += int64_t(gridDim.x) * blockDim.x) {
    float dd[8], gg[8], uu[8], rg[8], ru[8];
    unpack8(d[i], dd), unpack8(g[i], gg), unpack8(u[i], uu);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float s = 1.f / (1.f + expf(-gg[k]));
      ru[k] = dd[k] * gg[k] * s;
      rg[k] = dd[k] * uu[k] * s * (1.f + gg[k] * (1.f - s));
    }
    du[i] = pack8(ru);
    dg[i] = pack8(rg);
  }
}
// Runs launch(nv) over the first nv = n / width groups of `width` elements (when there are
// any) and returns how many elements that covers; the caller finishes the tail.
template <typename Launch>
int64_t vector_head(int64_t n, int64_t width, Launch&& launch) {
  const int64_t nv = n / width;
  if (nv > 0) launch(nv);
  return nv * width;
}
// Whether the 16-byte kernels (float4 of f32, 8 bf16) apply: storage type `want`, every
// pointer 16-byte aligned.
bool vec16_ok(KT t, KT want, std::initializer_list<const void*> ps) {
  if (t != want) return false;
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}
bool f32x4_ok(KT t, std::initializer_list<const void*> ps) {
  return vec16_ok(t, KT::f32, ps);
}

// ---------------------------------------------------------------- adamw
// One element (same arithmetic order as the CPU backend and torch's single-tensor AdamW).
__device__ __forceinline__ void adamw_one(float& p, float g, float& m, float& v,
                                          const AdamWScalars& a) {
  const float gi = g * a.grad_scale;
  float pi = p * a.decay;
  const float mi = m * a.b1 + (1.f - a.b1) * gi;
  const float vi = v * a.b2 + (1.f - a.b2) * gi * gi;
  const float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
  pi -= a.step_size * mi / denom;
  p = pi, m = mi, v = vi;
}
// dyn (optional): the AdamWDynamic values of a captured step, read when the kernel runs.
__device__ __forceinline__ bool adamw_dynamic(AdamWScalars& a, const float* dyn, bool dyn_decay) {
  if (!dyn) return true;
  if (dyn[2] != 0.f) return false;  // skip: a non-finite step
  a.grad_scale = dyn[1], a.step_size = dyn[3], a.bc2_sqrt = dyn[4];
  if (dyn_decay) a.decay = dyn[5];
  return true;
}
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n,
                             AdamWScalars a, __nv_bfloat16* p16, const float* dyn, bool dyn_decay) {
  if (!adamw_dynamic(a, dyn, dyn_decay)) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    adamw_one(p[i], g[i], m[i], v[i], a);
    if (p16) p16[i] = __float2bfloat16_rn(p[i]);
  }
}
// 16-byte accesses (all four arrays 16-byte aligned): the step is a pure stream of 28 bytes
// per parameter, and wide loads keep more of it in flight per thread.
// p16 (optional, 8-byte aligned): the four updated values rounded to bf16, one 8-byte store.
// Four elements at i of 16-byte aligned arrays; p16 (optional, 8-byte aligned): the four
// updated values rounded to bf16, one 8-byte store.
__device__ __forceinline__ void adamw4_at(float4* p, const float4* g, float4* m, float4* v,
                                          uint2* p16, int64_t i, const AdamWScalars& a) {
  float4 pp = p[i], mm = m[i], vv = v[i];
  const float4 gg = __ldcs(g + i);  // read once: streaming
  adamw_one(pp.x, gg.x, mm.x, vv.x, a);
  adamw_one(pp.y, gg.y, mm.y, vv.y, a);
  adamw_one(pp.z, gg.z, mm.z, vv.z, a);
  adamw_one(pp.w, gg.w, mm.w, vv.w, a);
  p[i] = pp, m[i] = mm, v[i] = vv;
  if (p16) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(pp.x, pp.y),
                         hi = __floats2bfloat162_rn(pp.z, pp.w);
    p16[i] = make_uint2(*reinterpret_cast<const uint32_t*>(&lo),
                        *reinterpret_cast<const uint32_t*>(&hi));
  }
}
__global__ void adamw4_kernel(float4* p, const float4* g, float4* m, float4* v, int64_t n4,
                              AdamWScalars a, uint2* p16, const float* dyn, bool dyn_decay) {
  if (!adamw_dynamic(a, dyn, dyn_decay)) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x)
    adamw4_at(p, g, m, v, p16, i, a);
}

using AdamWTable = MultiTable<AdamWTensor, kAdamWTensors>;
__global__ void adamw_multi_kernel(AdamWTable tab, AdamWScalars a, const float* dyn) {
  if (!adamw_dynamic(a, dyn, true)) return;  // a.decay: the captured step's decay
  const uint32_t total = tab.chunk0[tab.count];
  for (uint32_t c = blockIdx.x; c < total; c += gridDim.x) {
    const int k = multi_tensor_of(tab, c);
    const AdamWTensor& t = tab.t[k];
    AdamWScalars ak = a;
    ak.decay = dyn && t.dyn_decay ? a.decay : t.decay;
    const int64_t e0 = int64_t(c - tab.chunk0[k]) * kMultiChunk;
    const int64_t e1 = min(e0 + kMultiChunk, t.n);
    int64_t tail = e0;  // the elements from here on one at a time
    __nv_bfloat16* p16 = static_cast<__nv_bfloat16*>(t.p16);
    if (tab.vec[k]) {
      const int64_t n4 = (e1 - e0) / 4;
      for (int64_t i = threadIdx.x; i < n4; i += blockDim.x)
        adamw4_at(reinterpret_cast<float4*>(t.p + e0), reinterpret_cast<const float4*>(t.g + e0),
                  reinterpret_cast<float4*>(t.m + e0), reinterpret_cast<float4*>(t.v + e0),
                  p16 ? reinterpret_cast<uint2*>(p16 + e0) : nullptr, i, ak);
      tail = e0 + n4 * 4;
    }
    for (int64_t i = tail + threadIdx.x; i < e1; i += blockDim.x) {
      adamw_one(t.p[i], t.g[i], t.m[i], t.v[i], ak);
      if (p16) p16[i] = __float2bfloat16_rn(t.p[i]);
    }
  }
}

// ---------------------------------------------------------------- cross-entropy rows
// One block per row: an online (max, sum-exp) pass, then the loss and optionally dlogits.
// VEC (V % 4 == 0, 16-byte aligned logits rows, dlogits rows aligned to four elements):
// float4 loads with one online update per four logits (their max first) instead of a compare
// and branch per logit, and 8- or 16-byte dlogits stores. (The step's vocabulary, 128256,
// qualifies: its 2.1 GB of f32 logits are read twice, statistics then gradient.)
// TL: the logits' type. bf16 logits (LLAMA3_CE_BF16_LOGITS, cuda_backend.cpp) move half the bytes;
// their gradient is then written in place (dl16 = logits: each element is read, then written, by
// the same thread).
// One row's softmax statistics: the running (max, sum-exp) of every thread, combined over
// the block (every thread gets them); with loss, thread 0 writes the row's loss there (the
// target's logit read before any thread overwrites the row with its gradient).
template <typename TL, bool VEC>
__device__ __forceinline__ void ce_row_stats(const TL* row, int32_t tg, int64_t V, float& m,
                                             float& s, float* loss) {
  const float target_logit = loss ? to_f32(row[tg]) : 0.f;
  if constexpr (VEC) {
    for (int64_t j = threadIdx.x; j < V / 4; j += blockDim.x) {
      float f[4];
      load4(row + 4 * j, f);
      const float4 x = make_float4(f[0], f[1], f[2], f[3]);
      const float mx = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
      if (mx > m) {
        s *= __expf(m - mx);  // (0 while m is -inf)
        m = mx;
      }
      s += __expf(x.x - m) + __expf(x.y - m) + __expf(x.z - m) + __expf(x.w - m);
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const float x = to_f32(row[j]);
      if (x > m) {
        s = s * __expf(m - x) + 1.f;
        m = x;
      } else {
        s += __expf(x - m);
      }
    }
  }
  // Combine (m, s) across the block.
  __shared__ float sm[32], ss[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const float mx = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.f : s * __expf(m - mx)) +
        (m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mx));
    m = mx;
  }
  if (lane == 0) sm[w] = m, ss[w] = s;
  __syncthreads();
  if (w == 0) {
    m = lane < nw ? sm[lane] : -INFINITY;
    s = lane < nw ? ss[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      const float mx = fmaxf(m, m2);
      s = (m == -INFINITY ? 0.f : s * __expf(m - mx)) +
          (m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mx));
      m = mx;
    }
    if (lane == 0) sm[0] = m, ss[0] = s;
  }
  __syncthreads();
  m = sm[0], s = ss[0];
  if (threadIdx.x == 0 && loss) *loss = (m + logf(s)) - target_logit;
}
template <typename TL, bool VEC>
__global__ void ce_rows_kernel(TL* logits, const int32_t* targets, int64_t V, bool grad,
                               float scale, float* dl32, __nv_bfloat16* dl16, float* loss, int* bad,
                               const float* scale_dev, CeSplit sp) {
  if (scale_dev) scale = *scale_dev;
  if (sp.scale_mul) scale *= *sp.scale_mul;
  const int64_t i = blockIdx.x;
  const TL* row = logits + i * V;
  const int32_t tg = targets[i];
  if (tg < 0 || tg >= V) {
    if (tg >= V && threadIdx.x == 0 && bad) atomicOr(bad, 1);
    if (threadIdx.x == 0 && loss) loss[i] = 0.f;
    if (grad)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        if (dl16)
          dl16[i * V + j] = __float2bfloat16_rn(0.f);
        else
          dl32[i * V + j] = 0.f;
      }
    return;
  }
  float m = -INFINITY, s = 0.f;
  if (sp.stats_in) {  // (a deferred gradient: the loss call's statistics)
    m = sp.stats_in[2 * i], s = sp.stats_in[2 * i + 1];
  } else {
    ce_row_stats<TL, VEC>(row, tg, V, m, s, loss ? loss + i : nullptr);
    if (threadIdx.x == 0 && sp.stats_out) sp.stats_out[2 * i] = m, sp.stats_out[2 * i + 1] = s;
  }
  if (!grad) return;
  const float inv = scale / s;
  if constexpr (VEC) {
    for (int64_t j = threadIdx.x; j < V / 4; j += blockDim.x) {
      float x[4];
      load4(row + 4 * j, x);
      float p[4] = {__expf(x[0] - m) * inv, __expf(x[1] - m) * inv, __expf(x[2] - m) * inv,
                    __expf(x[3] - m) * inv};
      const int64_t t = tg - 4 * j;  // the target's place in these four, if there
      if (t >= 0 && t < 4) p[t] -= scale;
      if (dl16)
        store4(dl16 + i * V + 4 * j, p);
      else
        store4(dl32 + i * V + 4 * j, p);
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      float p = __expf(to_f32(row[j]) - m) * inv;
      if (j == tg) p -= scale;
      if (dl16)
        dl16[i * V + j] = __float2bfloat16_rn(p);
      else
        dl32[i * V + j] = p;
    }
  }
}

}  // namespace

// ================================================================ launchers
cudaError_t convert_contiguous(const void* src, KT st, void* dst, KT dt, int64_t n,
                               cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  if (st == dt)
    return cudaMemcpyAsync(dst, src,
                           n * int64_t(st == KT::f32 || st == KT::i32 ? 4
                                       : st == KT::i64                ? 8
                                       : st == KT::u8                 ? 1
                                                                      : 2),
                           cudaMemcpyDeviceToDevice, s);
  const bool a16 =
      reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  const int64_t n4 = a16 ? n / 4 : 0, done = n4 * 4;  // vectorised head, scalar tail
  if (st == KT::f32 && dt == KT::bf16) {
    if (n4 > 0)
      launch_kernel(f32_to_bf16_x4_kernel, grid_for(n4, kThreads), kThreads, 0, s,
                    static_cast<const float4*>(src), static_cast<uint2*>(dst), n4);
    if (n > done)
      launch_kernel(f32_to_bf16_kernel, grid_for(n - done, kThreads), kThreads, 0, s,
                    static_cast<const float*>(src) + done, static_cast<__nv_bfloat16*>(dst) + done,
                    n - done);
  } else if (st == KT::bf16 && dt == KT::f32) {
    if (n4 > 0)
      launch_kernel(bf16_to_f32_x4_kernel, grid_for(n4, kThreads), kThreads, 0, s,
                    static_cast<const uint2*>(src), static_cast<float4*>(dst), n4);
    if (n > done)
      launch_kernel(bf16_to_f32_kernel, grid_for(n - done, kThreads), kThreads, 0, s,
                    static_cast<const __nv_bfloat16*>(src) + done, static_cast<float*>(dst) + done,
                    n - done);
  } else
    launch_kernel(convert_kernel, grid_for(n, kThreads), kThreads, 0, s, src, st, dst, dt, n);
  return cudaGetLastError();
}

cudaError_t copy_strided(const void* src, KT st, void* dst, KT dt, const Strided& d, int64_t n,
                         cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  launch_kernel(strided_kernel, grid_for(n, kThreads), kThreads, 0, s, src, st, dst, dt, d, n);
  return cudaGetLastError();
}

cudaError_t fill(void* dst, KT t, int64_t n, double value, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  const int g = grid_for(n, kThreads);
  switch (t) {
    case KT::f32:
      launch_kernel(fill_kernel<float>, g, kThreads, 0, s, static_cast<float*>(dst), n,
                    float(value));
      break;
    case KT::bf16:
      launch_kernel(fill_kernel<__nv_bfloat16>, g, kThreads, 0, s, static_cast<__nv_bfloat16*>(dst),
                    n, __float2bfloat16_rn(float(value)));
      break;
    case KT::f16:
      launch_kernel(fill_kernel<__half>, g, kThreads, 0, s, static_cast<__half*>(dst), n,
                    __float2half_rn(float(value)));
      break;
    case KT::i32:
      launch_kernel(fill_kernel<int32_t>, g, kThreads, 0, s, static_cast<int32_t*>(dst), n,
                    int32_t(value));
      break;
    case KT::i64:
      launch_kernel(fill_kernel<int64_t>, g, kThreads, 0, s, static_cast<int64_t*>(dst), n,
                    int64_t(value));
      break;
    case KT::u8:
      launch_kernel(fill_kernel<uint8_t>, g, kThreads, 0, s, static_cast<uint8_t*>(dst), n,
                    uint8_t(value));
      break;
  }
  return cudaGetLastError();
}

cudaError_t add(const void* a, const void* b, void* out, KT t, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  int64_t done = 0;
  if (f32x4_ok(t, {a, b, out}) && n >= 4) {
    const int64_t n4 = n / 4;
    launch_kernel(add_f32x4_kernel, grid_for(n4, kThreads), kThreads, 0, s,
                  static_cast<const float4*>(a), static_cast<const float4*>(b),
                  static_cast<float4*>(out), n4);
    done = n4 * 4;
    if (done == n) return cudaGetLastError();
  }
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(add_kernel<T>, grid_for(n - done, kThreads), kThreads, 0, s,
                  static_cast<const T*>(a) + done, static_cast<const T*>(b) + done,
                  static_cast<T*>(out) + done, n - done);
    return cudaGetLastError();
  });
}

cudaError_t axpy(float alpha, const void* x, void* y, KT t, int64_t n, cudaStream_t s,
                 const float* alpha_dev) {
  if (n == 0) return cudaSuccess;
  int64_t done = 0;
  if (f32x4_ok(t, {x, y}) && n >= 4) {
    const int64_t n4 = n / 4;
    launch_kernel(axpy_f32x4_kernel, grid_for(n4, kThreads), kThreads, 0, s, alpha, alpha_dev,
                  static_cast<const float4*>(x), static_cast<float4*>(y), n4);
    done = n4 * 4;
    if (done == n) return cudaGetLastError();
  }
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(axpy_kernel<T>, grid_for(n - done, kThreads), kThreads, 0, s, alpha, alpha_dev,
                  static_cast<const T*>(x) + done, static_cast<T*>(y) + done, n - done);
    return cudaGetLastError();
  });
}

cudaError_t scale(void* x, float alpha, KT t, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(scale_kernel<T>, grid_for(n, kThreads), kThreads, 0, s, static_cast<T*>(x), alpha,
                  n);
    return cudaGetLastError();
  });
}

cudaError_t scale_by(void* x, const float* alpha, KT t, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(scale_by_kernel<T>, grid_for(n, kThreads), kThreads, 0, s, static_cast<T*>(x),
                  alpha, n);
    return cudaGetLastError();
  });
}

cudaError_t clip_state(const double* slots, int64_t n, const float* loss, float max_norm,
                       float* state, cudaStream_t s, const int* bad, int n_bad) {
  launch_kernel(clip_state_kernel, 1, 1, 0, s, slots, n, loss, max_norm, state, bad, n_bad);
  return cudaGetLastError();
}

cudaError_t f64_div_to_f32(const double* x, double div, float* out, cudaStream_t s,
                           const double* div_dev) {
  launch_kernel(f64_div_to_f32_kernel, 1, 1, 0, s, x, div, out, div_dev);
  return cudaGetLastError();
}

cudaError_t reduce_sum(const void* x, KT t, int64_t n, bool squares, double* out, double* partial,
                       unsigned* done, cudaStream_t s) {
  if (n == 0) return cudaMemsetAsync(out, 0, sizeof(double), s);
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(reduce_kernel<T>, grid_for(n, kThreads, kReduceBlocks), kThreads, 0, s,
                  static_cast<const T*>(x), n, squares, out, partial, done);
    return cudaGetLastError();
  });
}

cudaError_t any_nonfinite(const void* x, KT t, int64_t n, int* bad, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(nonfinite_kernel<T>, grid_for(n, kThreads, 132 * 4), kThreads, 0, s,
                  static_cast<const T*>(x), n, bad);
    return cudaGetLastError();
  });
}

cudaError_t embedding_forward(const void* w, const int32_t* ids, void* out, KT t, int64_t n,
                              int64_t d, int64_t v, int* bad, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(embedding_fwd_kernel<T>, unsigned(n), kThreads, 0, s, static_cast<const T*>(w),
                  ids, static_cast<T*>(out), d, v, bad);
    return cudaGetLastError();
  });
}

cudaError_t embedding_backward(const void* dout, const int32_t* ids, void* dw, KT t, int64_t n,
                               int64_t d, int64_t v, int32_t* scratch, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  int32_t *order = scratch, *sorted = scratch + n;
  launch_kernel(embedding_rank_kernel, unsigned((n + kEmbRankThreads - 1) / kEmbRankThreads),
                kEmbRankThreads, 0, s, ids, n, order, sorted);
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(embedding_bwd_kernel<T>, unsigned(n), kThreads, 0, s, static_cast<const T*>(dout),
                  order, sorted, n, static_cast<T*>(dw), d, v);
    return cudaGetLastError();
  });
}

cudaError_t rmsnorm_forward(const void* x, const void* w, float eps, void* y, void* rstd, KT t,
                            int64_t n, int64_t d, cudaStream_t s, KT ty) {
  if (n == 0) return cudaSuccess;
  const size_t yal = ty == KT::bf16 ? 8 : 16;
  if (t == KT::f32 && (ty == KT::f32 || ty == KT::bf16) && d % 4 == 0 && d / 4 <= 8 * kThreads &&
      reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(y) % yal == 0 && n <= INT32_MAX) {
    const uint32_t d4 = uint32_t(d / 4);
    // (a warp multiple of threads, at most kThreads; NV float4 each)
    const unsigned threads = unsigned(std::min<int64_t>(kThreads, (d4 + 31) / 32 * 32));
    auto go = [&]<typename TY>(auto kern) {
      launch_kernel(kern, unsigned(n), threads, 0, s, static_cast<const float*>(x),
                    static_cast<const float*>(w), eps, static_cast<TY*>(y),
                    static_cast<float*>(rstd), d4);
    };
    auto pick = [&]<typename TY>() {
      if (d4 <= threads) return go.template operator()<TY>(rmsnorm_fwd_vec_kernel<TY, 1>);
      if (d4 <= 2 * threads) return go.template operator()<TY>(rmsnorm_fwd_vec_kernel<TY, 2>);
      if (d4 <= 4 * threads) return go.template operator()<TY>(rmsnorm_fwd_vec_kernel<TY, 4>);
      go.template operator()<TY>(rmsnorm_fwd_vec_kernel<TY, 8>);
    };
    if (ty == KT::bf16)
      pick.template operator()<__nv_bfloat16>();
    else
      pick.template operator()<float>();
    return cudaGetLastError();
  }
  if (t == KT::f32 && ty == KT::bf16) {
    launch_kernel(rmsnorm_fwd_kernel<float, __nv_bfloat16>, unsigned(n), kThreads, 0, s,
                  static_cast<const float*>(x), static_cast<const float*>(w), eps,
                  static_cast<__nv_bfloat16*>(y), static_cast<float*>(rstd), d);
    return cudaGetLastError();
  }
  if (ty != t) return cudaErrorInvalidValue;
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(rmsnorm_fwd_kernel<T, T>, unsigned(n), kThreads, 0, s, static_cast<const T*>(x),
                  static_cast<const T*>(w), eps, static_cast<T*>(y), static_cast<T*>(rstd), d);
    return cudaGetLastError();
  });
}

// Blocks (and dw partial rows) of the backward: 4 per SM of a 132-SM H100, each streaming
// its rows one after the other (with 2 per SM, 264, the pass moved 1.3 TB/s: too few loads
// in flight).
int64_t rmsnorm_partial_rows(int64_t n) {
  return n < 528 ? (n < 1 ? 1 : n) : 528;
}

cudaError_t rmsnorm_backward(const void* dy, const void* x, const void* w, const void* rstd,
                             void* dx, void* dw, float* partial, KT t, int64_t n, int64_t d,
                             bool accumulate_dx, cudaStream_t s, bool prefetch, void* dx_bf16,
                             const RmsDyParts* parts) {
  if (n == 0) return cudaSuccess;
  if (parts && (t != KT::f32 || parts->n < 1 || parts->n > 4)) return cudaErrorInvalidValue;
  const int64_t rows = rmsnorm_partial_rows(n);
  const RmsDyParts pv = parts ? *parts : RmsDyParts{};
  return dispatch_ft(t, [&]<typename T>() {
    auto args = [&](auto kern) {
      launch_kernel(kern, unsigned(rows), kThreads, 0, s, static_cast<const T*>(dy),
                    static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(rstd),
                    static_cast<T*>(dx), partial, n, d, accumulate_dx,
                    static_cast<__nv_bfloat16*>(dx_bf16), pv);
    };
    auto pick = [&]<bool P>() {
      if (d <= 8 * kThreads)
        args(prefetch ? rmsnorm_bwd_reg_kernel<T, 8, true, P>
                      : rmsnorm_bwd_reg_kernel<T, 8, false, P>);
      else if (d <= 16 * kThreads)
        args(prefetch ? rmsnorm_bwd_reg_kernel<T, 16, true, P>
                      : rmsnorm_bwd_reg_kernel<T, 16, false, P>);
      else
        args(rmsnorm_bwd_kernel<T, P>);
    };
    if constexpr (std::is_same_v<T, float>) {
      if (parts) pick.template operator()<true>();  // (f32 x only, checked above)
    }
    if (!parts) pick.template operator()<false>();
    launch_kernel(rmsnorm_dw_reduce_kernel<T>, unsigned((d + kReduceCols - 1) / kReduceCols),
                  dim3(kReduceCols, kReducePhases), 0, s, partial, rows, d, static_cast<T*>(dw));
    return cudaGetLastError();
  });
}

cudaError_t rope(const void* x, const float* inv_freq, const int32_t* pos, bool inverse, void* out,
                 KT t, int64_t b, int64_t tt, int64_t h, int64_t dh, cudaStream_t s,
                 int per_block) {
  const int64_t n = b * tt * h * (dh / 2);
  if (n == 0) return cudaSuccess;
  const size_t esz = t == KT::bf16 ? 2 : 4;
  if ((t == KT::bf16 || t == KT::f32) && (dh / 2) % 4 == 0 && dh / 8 <= 1024 &&
      b * tt <= INT32_MAX && b * tt * h * dh <= UINT32_MAX &&
      reinterpret_cast<uintptr_t>(x) % (4 * esz) == 0 &&
      reinterpret_cast<uintptr_t>(out) % (4 * esz) == 0) {
    // (half / 4) x rows threads, at least 128 a block where the head dim allows.
    const unsigned gx = unsigned(dh / 8), gy = std::max(1u, 128u / gx);
    const dim3 block(gx, unsigned(std::min<int64_t>(gy, h)));
    // (the angles of a block's positions stay within 48 KB of shared memory)
    const int64_t max_per = std::max<int64_t>(1, std::min<int64_t>(64, 12288 / dh));
    const uint32_t n_pos = uint32_t(b * tt),
                   per = uint32_t(std::clamp<int64_t>(per_block, 1, max_per));
    const size_t smem = size_t(per) * size_t(dh) * sizeof(float);
    const unsigned grid = (n_pos + per - 1) / per;
    if (t == KT::bf16)
      launch_kernel(rope_pos_kernel<__nv_bfloat16>, grid, block, smem, s,
                    static_cast<const __nv_bfloat16*>(x), inv_freq, pos, inverse,
                    static_cast<__nv_bfloat16*>(out), uint32_t(tt), uint32_t(h), uint32_t(dh),
                    n_pos, per);
    else
      launch_kernel(rope_pos_kernel<float>, grid, block, smem, s, static_cast<const float*>(x),
                    inv_freq, pos, inverse, static_cast<float*>(out), uint32_t(tt), uint32_t(h),
                    uint32_t(dh), n_pos, per);
    return cudaGetLastError();
  }
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(rope_kernel<T>, grid_for(n, kThreads), kThreads, 0, s, static_cast<const T*>(x),
                  inv_freq, pos, inverse, static_cast<T*>(out), b, tt, h, dh);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_forward(const void* gate, const void* up, void* out, KT t, int64_t n,
                           cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  int64_t done = 0;
  if (f32x4_ok(t, {gate, up, out}))
    done = vector_head(n, 4, [&](int64_t nv) {
      launch_kernel(swiglu_fwd_f32x4_kernel, grid_for(nv, kThreads), kThreads, 0, s,
                    static_cast<const float4*>(gate), static_cast<const float4*>(up),
                    static_cast<float4*>(out), nv);
    });
  else if (vec16_ok(t, KT::bf16, {gate, up, out}))
    done = vector_head(n, 8, [&](int64_t nv) {
      launch_kernel(swiglu_fwd_bf16x8_kernel, grid_for(nv, kThreads), kThreads, 0, s,
                    static_cast<const uint4*>(gate), static_cast<const uint4*>(up),
                    static_cast<uint4*>(out), nv);
    });
  if (done == n) return cudaGetLastError();
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(swiglu_fwd_kernel<T>, grid_for(n - done, kThreads), kThreads, 0, s,
                  static_cast<const T*>(gate) + done, static_cast<const T*>(up) + done,
                  static_cast<T*>(out) + done, n - done);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_backward(const void* dout, const void* gate, const void* up, void* dgate,
                            void* dup, KT t, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  int64_t done = 0;
  if (f32x4_ok(t, {dout, gate, up, dgate, dup}))
    done = vector_head(n, 4, [&](int64_t nv) {
      launch_kernel(swiglu_bwd_f32x4_kernel, grid_for(nv, kThreads), kThreads, 0, s,
                    static_cast<const float4*>(dout), static_cast<const float4*>(gate),
                    static_cast<const float4*>(up), static_cast<float4*>(dgate),
                    static_cast<float4*>(dup), nv);
    });
  else if (vec16_ok(t, KT::bf16, {dout, gate, up, dgate, dup}))
    done = vector_head(n, 8, [&](int64_t nv) {
      launch_kernel(swiglu_bwd_bf16x8_kernel, grid_for(nv, kThreads), kThreads, 0, s,
                    static_cast<const uint4*>(dout), static_cast<const uint4*>(gate),
                    static_cast<const uint4*>(up), static_cast<uint4*>(dgate),
                    static_cast<uint4*>(dup), nv);
    });
  if (done == n) return cudaGetLastError();
  return dispatch_ft(t, [&]<typename T>() {
    launch_kernel(swiglu_bwd_kernel<T>, grid_for(n - done, kThreads), kThreads, 0, s,
                  static_cast<const T*>(dout) + done, static_cast<const T*>(gate) + done,
                  static_cast<const T*>(up) + done, static_cast<T*>(dgate) + done,
                  static_cast<T*>(dup) + done, n - done);
    return cudaGetLastError();
  });
}

cudaError_t adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& a,
                  cudaStream_t s, void* p16, const float* dyn, bool dyn_decay) {
  if (n == 0) return cudaSuccess;
  int64_t head = 0;
  const auto al16 = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  __nv_bfloat16* c = static_cast<__nv_bfloat16*>(p16);
  if (al16(p) && al16(g) && al16(m) && al16(v) && reinterpret_cast<uintptr_t>(c) % 8 == 0 &&
      n >= 4) {
    head = n / 4 * 4;
    launch_kernel(adamw4_kernel, grid_for(head / 4, kThreads), kThreads, 0, s,
                  reinterpret_cast<float4*>(p), reinterpret_cast<const float4*>(g),
                  reinterpret_cast<float4*>(m), reinterpret_cast<float4*>(v), head / 4, a,
                  reinterpret_cast<uint2*>(c), dyn, dyn_decay);
  }
  if (head < n)
    launch_kernel(adamw_kernel, grid_for(n - head, kThreads), kThreads, 0, s, p + head, g + head,
                  m + head, v + head, n - head, a, c ? c + head : nullptr, dyn, dyn_decay);
  return cudaGetLastError();
}

namespace {
// Fills tables of at most K tensors (entries of n == 0 skipped) and calls launch(table) for
// each, full or last. vec(t): whether t allows 16-byte accesses.
template <typename Table, typename T, typename Vec, typename Launch>
void for_multi_tables(const T* ts, int64_t n, Vec&& vec, Launch&& launch) {
  constexpr int K = int(sizeof(Table::vec));
  Table tab{};
  uint64_t chunks = 0;
  const auto flush = [&] {
    if (tab.count == 0) return;
    tab.chunk0[tab.count] = uint32_t(chunks);
    launch(tab, chunks);
    tab.count = 0, chunks = 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    if (ts[i].n <= 0) continue;
    const uint64_t c = uint64_t((ts[i].n + kMultiChunk - 1) / kMultiChunk);
    if (tab.count == K || chunks + c > UINT32_MAX) flush();
    tab.t[tab.count] = ts[i];
    tab.vec[tab.count] = vec(ts[i]);
    tab.chunk0[tab.count] = uint32_t(chunks);
    chunks += c;
    ++tab.count;
  }
  flush();
}
bool al(const void* p, uintptr_t b) {
  return reinterpret_cast<uintptr_t>(p) % b == 0;
}
}  // namespace

// (CUDA passes at most 4 KB of kernel arguments.)
static_assert(sizeof(AdamWTable) + sizeof(AdamWScalars) + sizeof(float*) <= 4000);
static_assert(sizeof(SumSqTable) + 4 * sizeof(double*) <= 4000);

cudaError_t adamw_multi(const AdamWTensor* ts, int64_t n, const AdamWScalars& a, cudaStream_t s,
                        const float* dyn) {
  for_multi_tables<AdamWTable>(
      ts, n,
      [](const AdamWTensor& t) {
        return al(t.p, 16) && al(t.g, 16) && al(t.m, 16) && al(t.v, 16) && al(t.p16, 8);
      },
      [&](const AdamWTable& tab, uint64_t chunks) {
        launch_kernel(adamw_multi_kernel, unsigned(std::min<uint64_t>(chunks, 132 * 16)), kThreads,
                      0, s, tab, a, dyn);
      });
  return cudaGetLastError();
}

cudaError_t sum_squares_multi(const SumSqTensor* ts, int64_t n, double* out, double* partial,
                              unsigned* done, cudaStream_t s) {
  bool first = true;
  for_multi_tables<SumSqTable>(
      ts, n, [](const SumSqTensor& t) { return al(t.x, 16); },
      [&](const SumSqTable& tab, uint64_t chunks) {
        launch_kernel(sumsq_multi_kernel, unsigned(std::min<uint64_t>(chunks, kReduceBlocks)),
                      kThreads, 0, s, tab, out, !first, partial, done);
        first = false;
      });
  if (first) return cudaMemsetAsync(out, 0, sizeof(double), s);  // no elements
  return cudaGetLastError();
}

cudaError_t cross_entropy_rows(void* logits, KT lt, const int32_t* targets, int64_t nr, int64_t V,
                               bool grad, float scale, float* dlogits_f32, void* dlogits_bf16,
                               float* loss, int* bad, cudaStream_t s, const float* scale_dev,
                               const CeSplit& split) {
  if (nr == 0) return cudaSuccess;
  if (lt != KT::f32 && lt != KT::bf16) return cudaErrorInvalidValue;
  // (bf16 logits have a bf16 gradient: dlogits_f32 is for f32 logits only)
  if (lt == KT::bf16 && grad && !dlogits_bf16) return cudaErrorInvalidValue;
  const auto al = [](const void* p, size_t b) { return reinterpret_cast<uintptr_t>(p) % b == 0; };
  const bool vec = V % 4 == 0 && al(logits, lt == KT::f32 ? 16 : 8) &&
                   (!grad || (dlogits_bf16 ? al(dlogits_bf16, 8) : al(dlogits_f32, 16)));
  __nv_bfloat16* d16 = static_cast<__nv_bfloat16*>(dlogits_bf16);
  if (lt == KT::bf16)
    launch_kernel(vec ? ce_rows_kernel<__nv_bfloat16, true> : ce_rows_kernel<__nv_bfloat16, false>,
                  unsigned(nr), 512, 0, s, static_cast<__nv_bfloat16*>(logits), targets, V, grad,
                  scale, dlogits_f32, d16, loss, bad, scale_dev, split);
  else
    launch_kernel(vec ? ce_rows_kernel<float, true> : ce_rows_kernel<float, false>, unsigned(nr),
                  512, 0, s, static_cast<float*>(logits), targets, V, grad, scale, dlogits_f32, d16,
                  loss, bad, scale_dev, split);
  return cudaGetLastError();
}

// One block: the targets >= 0 counted, then (thread 0) inv = float(1 / double(n)) and
// nd = double(n), as the host computes them from its own count; *none |= 1 when n is 0.
__global__ void count_valid_kernel(const int32_t* targets, int64_t n, float* inv, double* nd,
                                   int* none) {
  __shared__ long long part[32];
  long long c = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) c += targets[i] >= 0;
  for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) part[w] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long total = 0;
    for (int k = 0; k < int(blockDim.x >> 5); ++k) total += part[k];
    *inv = float(1.0 / double(total));
    *nd = double(total);
    if (total == 0) atomicOr(none, 1);
  }
}
cudaError_t count_valid(const int32_t* targets, int64_t n, float* inv, double* nd, int* none,
                        cudaStream_t s) {
  launch_kernel(count_valid_kernel, 1, 256, 0, s, targets, n, inv, nd, none);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- vocabulary-parallel CE
// One block per row for the row reductions (max, then sum of exponentials with the global
// max); dlogits and the row losses are elementwise.
namespace {
constexpr int kVocabThreads = 256;

// The reduction of v over the block (op: max or sum); every thread gets the result.
template <bool kMax>
__device__ float vocab_block_reduce(float v) {
  __shared__ float part[kVocabThreads / 32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, u) : v + u;
  }
  if (lane == 0) part[w] = v;
  __syncthreads();
  if (w == 0) {
    v = lane < kVocabThreads / 32 ? part[lane] : (kMax ? -INFINITY : 0.f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float u = __shfl_xor_sync(0xffffffffu, v, o);
      v = kMax ? fmaxf(v, u) : v + u;
    }
    if (lane == 0) part[0] = v;
  }
  __syncthreads();
  return part[0];
}

__global__ void vocab_max_kernel(const float* logits, int64_t V, float* mx) {
  const float* row = logits + int64_t(blockIdx.x) * V;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, row[j]);
  m = vocab_block_reduce<true>(m);
  if (threadIdx.x == 0) mx[blockIdx.x] = m;
}

__global__ void vocab_stats_kernel(const float* logits, const float* mx, const int32_t* targets,
                                   int64_t V, int64_t v0, float* sum_exp, float* target_logit) {
  const int64_t i = blockIdx.x;
  const float* row = logits + i * V;
  const float m = mx[i];
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += __expf(row[j] - m);
  s = vocab_block_reduce<false>(s);
  if (threadIdx.x == 0) {
    sum_exp[i] = s;
    const int64_t t = int64_t(targets[i]) - v0;
    target_logit[i] = targets[i] >= 0 && t >= 0 && t < V ? row[t] : 0.f;
  }
}

// Rows by blocks (block-stride), columns by threads: the row's statistics are read once per
// thread and row, and no element needs a 64-bit division to find its row (the flat form's
// k / V and k % V compiled to two calls of a ~70-instruction routine per element).
__global__ void vocab_dlogits_kernel(float* logits, const float* mx, const float* sum_exp,
                                     const int32_t* targets, int64_t nr, int64_t V, int64_t v0,
                                     float scale, const float* row_scale) {
  for (int64_t i = blockIdx.x; i < nr; i += gridDim.x) {
    float* row = logits + i * V;
    const int32_t tg = targets[i];
    if (tg < 0) {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) row[j] = 0.f;
      continue;
    }
    const float sc = row_scale ? scale * row_scale[i] : scale;
    const float m = mx[i], f = sc / sum_exp[i];
    const int64_t jt = int64_t(tg) - v0;  // the target's column in this shard (maybe outside)
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      float g = __expf(row[j] - m) * f;
      if (j == jt) g -= sc;
      row[j] = g;
    }
  }
}

__global__ void vocab_loss_kernel(const float* mx, const float* sum_exp, const float* target_logit,
                                  const int32_t* targets, int64_t nr, float* loss, float* valid) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nr) return;
  const bool ok = targets[i] >= 0;
  loss[i] = ok ? logf(sum_exp[i]) + mx[i] - target_logit[i] : 0.f;
  valid[i] = ok ? 1.f : 0.f;
}
}  // namespace

cudaError_t vocab_shard_max(const float* logits, int64_t nr, int64_t V, float* mx, cudaStream_t s) {
  if (nr == 0) return cudaSuccess;
  launch_kernel(vocab_max_kernel, unsigned(nr), kVocabThreads, 0, s, logits, V, mx);
  return cudaGetLastError();
}
cudaError_t vocab_shard_stats(const float* logits, const float* mx, const int32_t* targets,
                              int64_t nr, int64_t V, int64_t v0, float* sum_exp,
                              float* target_logit, cudaStream_t s) {
  if (nr == 0) return cudaSuccess;
  launch_kernel(vocab_stats_kernel, unsigned(nr), kVocabThreads, 0, s, logits, mx, targets, V, v0,
                sum_exp, target_logit);
  return cudaGetLastError();
}
cudaError_t vocab_shard_dlogits(float* logits, const float* mx, const float* sum_exp,
                                const int32_t* targets, int64_t nr, int64_t V, int64_t v0,
                                float scale, cudaStream_t s, const float* row_scale) {
  if (nr == 0 || V == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(nr, 65535);
  launch_kernel(vocab_dlogits_kernel, unsigned(blocks), kVocabThreads, 0, s, logits, mx, sum_exp,
                targets, nr, V, v0, scale, row_scale);
  return cudaGetLastError();
}
cudaError_t vocab_row_loss(const float* mx, const float* sum_exp, const float* target_logit,
                           const int32_t* targets, int64_t nr, float* loss, float* valid,
                           cudaStream_t s) {
  if (nr == 0) return cudaSuccess;
  launch_kernel(vocab_loss_kernel, unsigned((nr + 255) / 256), 256, 0, s, mx, sum_exp, target_logit,
                targets, nr, loss, valid);
  return cudaGetLastError();
}

LLAMA3_CUDA_NS_END  // llama3::cuda
