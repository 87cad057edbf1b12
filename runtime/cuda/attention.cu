// Flash attention on CUDA (SIMT, f32 accumulation; q/k/v f32 or bf16).
//
// Forward: one block per (batch, head, 64-query tile); keys are visited in 64-key tiles with
// an online softmax (FlashAttention-2), so no (T, T) matrix exists. lse (B, H, T) is saved.
// Backward: one block per (batch, kv head, 64-key tile) that loops over the query heads of
// its group and the query tiles that can see its keys, recomputing P from lse; dK/dV stay
// in registers (written once, `=`), dQ is accumulated with f32 atomics.
//
// Masks: causal and/or document. Document ids form contiguous runs per row (as the CPU
// reference): doc_runs() turns them into, per position, the first and one-past-last index
// of its run; a query i sees key j iff start[i] <= j < end[i] (and j <= i when causal).
//
// Thread layout (256 threads, tr = t/16, tc = t%16): thread t owns score rows 4 tr + ii and
// score columns tc + 16 jj (ii, jj < 4) of a 64x64 tile, and output columns 4 tc + 64 q + e
// (e < 4, q < DMAX/64) so that shared-memory reads are float4. Row reductions stay inside
// 16-lane halves of a warp. Head dims are padded with zeros to DMAX = 64 or 128.
#include <cfloat>
#ifndef LLAMA3_CUDA_EMU
#include <cub/block/block_scan.cuh>
#endif

#include "runtime/cuda/common.cuh"

LLAMA3_CUDA_NS_BEGIN

namespace {

constexpr int kTile = 64;      // queries and keys per tile
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 scores each
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct MaxOp {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};
struct MinOp {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};

// One block of 1024 threads per batch row: start = running max of run starts (left to
// right), end = running min of run ends (right to left).
__global__ void doc_runs_kernel(const int32_t* doc, int64_t T, int32_t* start, int32_t* end) {
  using Scan = cub::BlockScan<int, 1024>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  const int64_t b = blockIdx.x;
  const int32_t* d = doc + b * T;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < T; base += 1024) {
    const int64_t t = base + threadIdx.x;
    int v = (t < T && (t == 0 || d[t] != d[t - 1])) ? int(t) : 0;
    v = v > carry ? v : carry;
    Scan(tmp).InclusiveScan(v, v, MaxOp());
    if (t < T) start[b * T + t] = v;
    __syncthreads();
    if (threadIdx.x == 1023) carry = v;
    __syncthreads();
  }
  if (threadIdx.x == 0) carry = int(T);
  __syncthreads();
  for (int64_t base = 0; base < T; base += 1024) {
    const int64_t t = T - 1 - (base + threadIdx.x);
    int v = (t >= 0 && (t == T - 1 || d[t] != d[t + 1])) ? int(t + 1) : int(T);
    v = v < carry ? v : carry;
    Scan(tmp).InclusiveScan(v, v, MinOp());
    if (t >= 0) end[b * T + t] = v;
    __syncthreads();
    if (threadIdx.x == 1023) carry = v;
    __syncthreads();
  }
}

// Shared-memory row strides: a multiple of 4 floats keeps float4 accesses aligned, and the
// extra 4 spreads the 16 rows a quarter-warp reads over all 32 banks.
template <int DMAX>
constexpr int row_stride() {
  return DMAX + 4;
}
constexpr int kPS = kTile + 4;  // stride of the P / dS tiles

__device__ __forceinline__ float4 ld4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float comp(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;  // i is a compile-time constant
}
__device__ __forceinline__ float dot4(const float4& a, const float4& b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// Loads rows [r0, r0 + 64) of a (B, T, nh, D) tensor at (b, head) into s[64][row_stride] as
// f32, zero outside [0, T) x [0, D).
template <typename T, int DMAX>
__device__ void load_tile(float* s, const T* x, int64_t b, int64_t head, int64_t nh, int64_t r0,
                          int64_t Tn, int64_t D) {
  constexpr int S = row_stride<DMAX>();
  for (int idx = threadIdx.x; idx < kTile * DMAX; idx += kThreads) {
    const int r = idx / DMAX, c = idx % DMAX;
    const int64_t row = r0 + r;
    float v = 0.f;
    if (row < Tn && c < D) v = to_f32(x[((b * Tn + row) * nh + head) * D + c]);
    s[r * S + c] = v;
  }
}

// s[ii][jj] (+)= sum_d A[4 tr + ii][d] * B[tc + 16 jj][d] over shared tiles of stride S.
template <int DMAX>
__device__ __forceinline__ void tile_dot(const float* A, const float* Bm, int tr, int tc,
                                         float (&s)[4][4]) {
  constexpr int S = row_stride<DMAX>();
#pragma unroll 4
  for (int d = 0; d < DMAX; d += 4) {
    float4 av[4], bv[4];
#pragma unroll
    for (int ii = 0; ii < 4; ++ii) av[ii] = ld4(A + (tr * 4 + ii) * S + d);
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) bv[jj] = ld4(Bm + (tc + 16 * jj) * S + d);
#pragma unroll
    for (int ii = 0; ii < 4; ++ii)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) s[ii][jj] = dot4(av[ii], bv[jj], s[ii][jj]);
  }
}

// acc[ii][4 q + e] += sum_j P[4 tr + ii][j] * V[j][4 tc + 64 q + e]  (P stride kPS).
template <int DMAX>
__device__ __forceinline__ void tile_pv(const float* P, const float* V, int tr, int tc,
                                        float (&acc)[4][DMAX / 16]) {
  constexpr int S = row_stride<DMAX>(), NQ = DMAX / 64;
#pragma unroll 2
  for (int j = 0; j < kTile; j += 4) {
    float4 pv[4];
#pragma unroll
    for (int ii = 0; ii < 4; ++ii) pv[ii] = ld4(P + (tr * 4 + ii) * kPS + j);
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const float4 vv = ld4(V + (j + jj) * S + 4 * tc + 64 * q);
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const float p = comp(pv[ii], jj);
          acc[ii][4 * q + 0] = fmaf(p, vv.x, acc[ii][4 * q + 0]);
          acc[ii][4 * q + 1] = fmaf(p, vv.y, acc[ii][4 * q + 1]);
          acc[ii][4 * q + 2] = fmaf(p, vv.z, acc[ii][4 * q + 2]);
          acc[ii][4 * q + 3] = fmaf(p, vv.w, acc[ii][4 * q + 3]);
        }
      }
    }
  }
}

// Output column of accumulator slot c (c < DMAX/16) for thread column tc.
__device__ __forceinline__ int out_col(int tc, int c) {
  return 4 * tc + 64 * (c / 4) + (c % 4);
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(const T* q, const T* k, const T* v, const int32_t* dstart, const int32_t* dend,
                    T* out, T* lse, AttnShape a) {
  constexpr int S = row_stride<DMAX>(), NC = DMAX / 16;
  LLAMA3_DYNAMIC_SMEM(float4, smem4);
  float* smem = reinterpret_cast<float*>(smem4);
  float* Qs = smem;            // [64][S]
  float* Ks = Qs + kTile * S;  // [64][S]
  float* Vs = Ks + kTile * S;  // [64][S]
  float* Ps = Vs + kTile * S;  // [64][kPS]

  // Heaviest (latest, for causal) query tiles first.
  const int64_t qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kvh = h / (a.H / a.Hkv);
  const int64_t i0 = qt * kTile;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  const float sl2 = a.scale * kLog2e;  // scores in log2 units

  load_tile<T, DMAX>(Qs, q, b, h, a.H, i0, a.T, a.D);

  const int64_t last = min(i0 + kTile, a.T) - 1;
  int64_t lo = dstart ? dstart[b * a.Tk + i0] : 0;
  int64_t hi = dend ? dend[b * a.Tk + last] : a.Tk;
  if (a.causal) hi = min(hi, last + 1);
  if (a.q_pos) visible_keys_of_rows(a, dstart, dend, b, i0, kTile, lo, hi);

  int64_t qi[4], qlo[4], qhi[4];
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    qi[ii] = i0 + tr * 4 + ii;
    visible_keys(a, dstart, dend, b, qi[ii], qlo[ii], qhi[ii]);  // padding rows see nothing
  }
  float m[4], l[4], acc[4][NC];
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    m[ii] = -INFINITY, l[ii] = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[ii][c] = 0.f;
  }

  for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
    __syncthreads();  // previous tile's Ks/Vs/Ps fully consumed
    load_tile<T, DMAX>(Ks, k, b, kvh, a.Hkv, j0, a.Tk, a.D);
    load_tile<T, DMAX>(Vs, v, b, kvh, a.Hkv, j0, a.Tk, a.D);
    __syncthreads();
    float s[4][4];
#pragma unroll
    for (int ii = 0; ii < 4; ++ii)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) s[ii][jj] = 0.f;
    tile_dot<DMAX>(Qs, Ks, tr, tc, s);
#pragma unroll
    for (int ii = 0; ii < 4; ++ii) {
      float mx = m[ii];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int64_t j = j0 + tc + 16 * jj;
        const bool valid = j >= qlo[ii] && j < qhi[ii] && j < hi;
        s[ii][jj] = valid ? s[ii][jj] * sl2 : -INFINITY;
        mx = fmaxf(mx, s[ii][jj]);
      }
      // The 16 threads of a row are one half-warp: xor offsets < 16 stay inside it.
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float ms = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m[ii] - ms);  // 0 when m was -inf
      float sum = 0.f;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const float p = exp2f(s[ii][jj] - ms);
        Ps[(tr * 4 + ii) * kPS + tc + 16 * jj] = p;
        sum += p;
      }
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l[ii] = l[ii] * alpha + sum;
      m[ii] = mx;
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[ii][c] *= alpha;
    }
    __syncthreads();
    tile_pv<DMAX>(Ps, Vs, tr, tc, acc);
  }
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int64_t i = qi[ii];
    if (i >= a.T) continue;
    const float inv = l[ii] > 0.f ? 1.f / l[ii] : 0.f;
    T* orow = out + ((b * a.T + i) * a.H + h) * a.D;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int d = out_col(tc, c);
      if (d < a.D) orow[d] = from_f32<T>(acc[ii][c] * inv);
    }
    if (tc == 0)
      lse[(b * a.H + h) * a.T + i] =
          from_f32<T>(l[ii] > 0.f ? m[ii] * kLn2 + logf(l[ii]) : -INFINITY);
  }
}

// dsum[b, h, i] = sum_d dout * out (f32), one warp a row. I: the index type, 32-bit when
// every element index fits (in 64 bits lane 0's row decomposition was four divisions, each a
// call of a ~70-instruction routine, per row of 64 elements, while the other lanes waited).
template <typename T, typename I>
__global__ void attn_dsum_kernel(const T* dout, const T* out, float* dsum, AttnShape a) {
  const I rows = I(a.B * a.T * a.H), D = I(a.D), H = I(a.H), TT = I(a.T);
  const int lane = threadIdx.x & 31;
  for (I r = (I(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += I(gridDim.x) * blockDim.x / 32) {
    float s = 0.f;
    for (I d = lane; d < D; d += 32) s += to_f32(dout[r * D + d]) * to_f32(out[r * D + d]);
    s = warp_sum(s);
    if (lane == 0) {  // r = (b*T + i)*H + h
      const I bi = r / H, h = r - bi * H, b = bi / TT, i = bi - b * TT;
      dsum[(b * H + h) * TT + i] = s;
    }
  }
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_kernel(const T* dout, const T* q, const T* k, const T* v, const T* lse,
                    const float* dsum, const int32_t* dstart, const int32_t* dend, T* dk, T* dv,
                    float* dq_acc, AttnShape a) {
  constexpr int S = row_stride<DMAX>(), NC = DMAX / 16, NQ = DMAX / 64;
  LLAMA3_DYNAMIC_SMEM(float4, smem4);
  float* smem = reinterpret_cast<float*>(smem4);
  float* Ks = smem;              // [64][S] keys of this block
  float* Vs = Ks + kTile * S;    // [64][S]
  float* Qs = Vs + kTile * S;    // [64][S] current query tile (unscaled)
  float* Gs = Qs + kTile * S;    // [64][S] dout tile
  float* Ps = Gs + kTile * S;    // [64][kPS] probabilities (query row, key col)
  float* Ds = Ps + kTile * kPS;  // [64][kPS] dS
  float* Ls = Ds + kTile * kPS;  // [64] lse * log2e
  float* Dd = Ls + kTile;        // [64] dsum

  const int64_t kt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int64_t group = a.H / a.Hkv;
  const int64_t j0 = kt * kTile;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  const float sl2 = a.scale * kLog2e;

  load_tile<T, DMAX>(Ks, k, b, kvh, a.Hkv, j0, a.Tk, a.D);
  load_tile<T, DMAX>(Vs, v, b, kvh, a.Hkv, j0, a.Tk, a.D);

  const int64_t jlast = min(j0 + kTile, a.Tk) - 1;
  int64_t qlo = a.causal ? j0 : 0;
  if (dstart) qlo = max(qlo, int64_t(dstart[b * a.Tk + j0]));
  int64_t qhi = dend ? dend[b * a.Tk + jlast] : a.T;
  if (a.q_pos) qlo = 0, qhi = a.T;  // (positions need not be monotonic: visit every tile)

  float dka[4][NC], dva[4][NC];  // key rows 4 tr + jj, columns out_col(tc, c)
#pragma unroll
  for (int jj = 0; jj < 4; ++jj)
#pragma unroll
    for (int c = 0; c < NC; ++c) dka[jj][c] = 0.f, dva[jj][c] = 0.f;

  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = qlo; i0 < qhi; i0 += kTile) {
      __syncthreads();
      load_tile<T, DMAX>(Qs, q, b, h, a.H, i0, a.T, a.D);
      load_tile<T, DMAX>(Gs, dout, b, h, a.H, i0, a.T, a.D);
      for (int r = threadIdx.x; r < kTile; r += kThreads) {
        const int64_t i = i0 + r;
        const bool in = i < a.T;
        Ls[r] = in ? to_f32(lse[(b * a.H + h) * a.T + i]) * kLog2e : 0.f;
        Dd[r] = in ? dsum[(b * a.H + h) * a.T + i] : 0.f;
      }
      __syncthreads();
      // Scores and dP for query rows 4 tr + ii and key columns tc + 16 jj.
      float s[4][4], dp[4][4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) s[ii][jj] = 0.f, dp[ii][jj] = 0.f;
      tile_dot<DMAX>(Qs, Ks, tr, tc, s);
      tile_dot<DMAX>(Gs, Vs, tr, tc, dp);
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {
        const int r = tr * 4 + ii;
        const int64_t i = i0 + r;
        int64_t lo, hi;
        visible_keys(a, dstart, dend, b, i, lo, hi);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int64_t j = j0 + tc + 16 * jj;
          const bool valid = j >= lo && j < hi && j < a.Tk;
          const float p = valid ? exp2f(s[ii][jj] * sl2 - Ls[r]) : 0.f;
          Ps[r * kPS + tc + 16 * jj] = p;
          Ds[r * kPS + tc + 16 * jj] = p * (dp[ii][jj] - Dd[r]) * a.scale;
        }
      }
      __syncthreads();
      // dV += P^T dO and dK += dS^T Q over the 64 query rows, for key rows 4 tr + jj.
#pragma unroll 2
      for (int r = 0; r < kTile; ++r) {
        const float4 pv = ld4(Ps + r * kPS + tr * 4), dsv = ld4(Ds + r * kPS + tr * 4);
#pragma unroll
        for (int qd = 0; qd < NQ; ++qd) {
          const float4 gq = ld4(Gs + r * S + 4 * tc + 64 * qd);
          const float4 qq = ld4(Qs + r * S + 4 * tc + 64 * qd);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const float p = comp(pv, jj), d = comp(dsv, jj);
            dva[jj][4 * qd + 0] = fmaf(p, gq.x, dva[jj][4 * qd + 0]);
            dva[jj][4 * qd + 1] = fmaf(p, gq.y, dva[jj][4 * qd + 1]);
            dva[jj][4 * qd + 2] = fmaf(p, gq.z, dva[jj][4 * qd + 2]);
            dva[jj][4 * qd + 3] = fmaf(p, gq.w, dva[jj][4 * qd + 3]);
            dka[jj][4 * qd + 0] = fmaf(d, qq.x, dka[jj][4 * qd + 0]);
            dka[jj][4 * qd + 1] = fmaf(d, qq.y, dka[jj][4 * qd + 1]);
            dka[jj][4 * qd + 2] = fmaf(d, qq.z, dka[jj][4 * qd + 2]);
            dka[jj][4 * qd + 3] = fmaf(d, qq.w, dka[jj][4 * qd + 3]);
          }
        }
      }
      // dQ (query rows 4 tr + ii) += dS K, accumulated in global f32.
      float dqa[4][NC];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int c = 0; c < NC; ++c) dqa[ii][c] = 0.f;
      tile_pv<DMAX>(Ds, Ks, tr, tc, dqa);
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {
        const int64_t i = i0 + tr * 4 + ii;
        if (i >= a.T) continue;
        float* dqr = dq_acc + ((b * a.T + i) * a.H + h) * a.D;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int d = out_col(tc, c);
          if (d < a.D) atomicAdd(dqr + d, dqa[ii][c]);
        }
      }
    }
  }
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    const int64_t j = j0 + tr * 4 + jj;
    if (j >= a.Tk) continue;
    T* dkr = dk + ((b * a.Tk + j) * a.Hkv + kvh) * a.D;
    T* dvr = dv + ((b * a.Tk + j) * a.Hkv + kvh) * a.D;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int d = out_col(tc, c);
      if (d < a.D) dkr[d] = from_f32<T>(dka[jj][c]), dvr[d] = from_f32<T>(dva[jj][c]);
    }
  }
}

size_t fwd_smem(int dmax) {
  return size_t(3 * kTile * (dmax + 4) + kTile * kPS) * 4;
}
size_t bwd_smem(int dmax) {
  return size_t(4 * kTile * (dmax + 4) + 2 * kTile * kPS + 2 * kTile) * 4;
}

// Runs f.template operator()<DMAX>() for the smallest supported DMAX >= D.
template <typename F>
cudaError_t dispatch_d(int64_t D, F&& f) {
  if (D <= 64) return f.template operator()<64>();
  if (D <= 128) return f.template operator()<128>();
  return cudaErrorInvalidValue;
}

}  // namespace

size_t attention_smem_bytes(int64_t D, bool backward) {
  const int dmax = D <= 64 ? 64 : 128;
  return backward ? bwd_smem(dmax) : fwd_smem(dmax);
}

cudaError_t doc_runs(const int32_t* doc, int64_t B, int64_t T, int32_t* start, int32_t* end,
                     cudaStream_t s) {
  if (B == 0 || T == 0) return cudaSuccess;
  launch_kernel(doc_runs_kernel, unsigned(B), 1024, 0, s, doc, T, start, end);
  return cudaGetLastError();
}

cudaError_t attention_forward(const void* q, const void* k, const void* v, const int32_t* dstart,
                              const int32_t* dend, void* out, void* lse, KT t,
                              const AttnShape& shape, cudaStream_t s, const AttnBf16Inputs& in16) {
  AttnShape a = shape;
  if (a.Tk == 0) a.Tk = a.T;
  if (a.B == 0 || a.T == 0 || a.H == 0) return cudaSuccess;
  if (a.tc)
    return attention_forward_mma(in16.q ? in16.q : q, in16.k ? in16.k : k, in16.v ? in16.v : v,
                                 dstart, dend, out, lse, t, a, s);
  return dispatch_ft(t, [&]<typename T>() {
    return dispatch_d(a.D, [&]<int DMAX>() {
      auto kern = attn_fwd_kernel<T, DMAX>;
      const size_t sm = fwd_smem(DMAX);
      cudaError_t e =
          cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sm));
      if (e != cudaSuccess) return e;
      dim3 grid(unsigned((a.T + kTile - 1) / kTile), unsigned(a.H), unsigned(a.B));
      launch_kernel(kern, grid, kThreads, sm, s, static_cast<const T*>(q), static_cast<const T*>(k),
                    static_cast<const T*>(v), dstart, dend, static_cast<T*>(out),
                    static_cast<T*>(lse), a);
      return cudaGetLastError();
    });
  });
}

cudaError_t attention_backward(const void* dout, const void* q, const void* k, const void* v,
                               const void* out, const void* lse, const int32_t* dstart,
                               const int32_t* dend, void* dq, void* dk, void* dv, float* dsum,
                               float* dq_acc, KT t, const AttnShape& shape, cudaStream_t s,
                               const AttnBf16Inputs& in16, void* dkv_part) {
  AttnShape a = shape;
  if (a.Tk == 0) a.Tk = a.T;
  if (a.B == 0 || a.T == 0 || a.H == 0) return cudaSuccess;
  const int64_t nq = a.B * a.T * a.H * a.D;
  cudaError_t e = cudaMemsetAsync(dq_acc, 0, size_t(nq) * 4, s);
  if (e != cudaSuccess) return e;
  return dispatch_ft(t, [&]<typename T>() {
    // (32-bit indices when the largest element index and the grid's thread count fit)
    const int64_t nthreads = a.B * a.T * a.H * 32;
    if (nq < (int64_t(1) << 31) && nthreads < (int64_t(1) << 31))
      launch_kernel(attn_dsum_kernel<T, uint32_t>, grid_for(nthreads, 256), 256, 0, s,
                    static_cast<const T*>(dout), static_cast<const T*>(out), dsum, a);
    else
      launch_kernel(attn_dsum_kernel<T, int64_t>, grid_for(nthreads, 256), 256, 0, s,
                    static_cast<const T*>(dout), static_cast<const T*>(out), dsum, a);
    cudaError_t e2 =
        a.tc ? attention_backward_mma(in16.dout ? in16.dout : dout, in16.q ? in16.q : q,
                                      in16.k ? in16.k : k, in16.v ? in16.v : v, lse, dsum, dstart,
                                      dend, dk, dv, dq_acc, dkv_part, t, a, s)
             : dispatch_d(a.D, [&]<int DMAX>() {
                 auto kern = attn_bwd_kernel<T, DMAX>;
                 const size_t sm = bwd_smem(DMAX);
                 cudaError_t e3 = cudaFuncSetAttribute(
                     kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sm));
                 if (e3 != cudaSuccess) return e3;
                 dim3 grid(unsigned((a.Tk + kTile - 1) / kTile), unsigned(a.Hkv), unsigned(a.B));
                 launch_kernel(kern, grid, kThreads, sm, s, static_cast<const T*>(dout),
                               static_cast<const T*>(q), static_cast<const T*>(k),
                               static_cast<const T*>(v), static_cast<const T*>(lse), dsum, dstart,
                               dend, static_cast<T*>(dk), static_cast<T*>(dv), dq_acc, a);
                 return cudaGetLastError();
               });
    if (e2 != cudaSuccess) return e2;
    // dQ from its f32 accumulator (the vectorised conversion: 16-byte loads).
    if (static_cast<void*>(dq_acc) != dq) return convert_contiguous(dq_acc, KT::f32, dq, t, nq, s);
    return cudaGetLastError();
  });
}

LLAMA3_CUDA_NS_END  // llama3::cuda
