// Flash attention on tensor cores (bf16 products, f32 accumulation), for the mixed-precision
// path (AttentionParams::compute == AttnCompute::bf16, or bf16 inputs). Same masks, GQA,
// grids and tile visiting order as the exact SIMT kernels of attention.cu; only the products
// differ:
//
// Forward: one block of 4 warps per (batch, head, 64-query tile). Q, K, V tiles are loaded
// from global memory (f32 or bf16) and stored as bf16 in shared memory. Warp w owns query
// rows 16 w .. 16 w + 15 of the tile: S = Q K^T (wmma bf16 16x16x16, f32 accumulate) goes to
// a shared f32 tile, the warp runs the online softmax on its own rows in f32 (P rounded to
// bf16 for the product, row sums from the f32 values), rescales its rows of the f32 output
// tile O (shared memory) only when a row's reference max moves by more than 2^8 (lazy
// rescaling), and adds P V with wmma. lse = m ln2 + ln l is saved per row (m the reference).
//
// Backward (FA2): one block of 4 warps per (batch, kv head, 64-key tile), looping over the
// query heads of its group and the query tiles that can see its keys. Per query tile: warp w
// computes S = Q K^T and dP = dO V^T for query rows 16 w.., then P = exp(S scale - lse) and
// dS = P (dP - dsum) scale (f32, rounded to bf16); after a block barrier warp w accumulates
// dV += P^T dO and dK += dS^T Q for key rows 16 w.. in wmma accumulators (registers, for
// the whole block life), and dQ = dS K for query rows 16 w.., which goes through shared
// memory to f32 atomics in dq_acc.
//
// Correctness notes: every shared region a warp reads was written either by the same warp
// (separated by __syncwarp) or by the block before a __syncthreads; the tile loop starts
// with a __syncthreads so no warp overwrites K/V/Q/dO tiles another warp still reads.
// Head dims up to 64 use DMAX 64, up to 128 DMAX 128 (zero padding, which adds nothing).
#include <mma.h>

#include <cfloat>

#include "runtime/cuda/attention_tile.cuh"
#include "runtime/cuda/common.cuh"

namespace llama3::cuda {

namespace {

using namespace nvcuda;
using bf16 = __nv_bfloat16;

constexpr int kBr = 64;          // query rows per tile
constexpr int kBc = 64;          // key rows per tile
constexpr int kTcThreads = 128;  // 4 warps, 16 tile rows each
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kBr == 16 * (kTcThreads / 32) && kBc == 16 * (kTcThreads / 32),
              "each warp owns 16 rows of the query tile and 16 rows of the key tile");

template <int DMAX>
struct TcLayout {
  static constexpr int DP = DMAX + 8;  // bf16 row stride of the Q / K / V / dO tiles
  static constexpr int SP = kBc + 4;   // f32 row stride of the S / dP tiles
  static constexpr int PP = kBc + 8;   // bf16 row stride of the P / dS tiles
  static constexpr int OP = DMAX + 4;  // f32 row stride of the O / dQ / dK / dV staging tiles
  static constexpr size_t tile_b = size_t(kBr) * DP * 2;
  static constexpr size_t score_b = size_t(kBr) * SP * 4;
  static constexpr size_t p_b = size_t(kBr) * PP * 2;
  static constexpr size_t o_b = size_t(kBr) * OP * 4;
  // Forward: Q, K, V, S, P, O.
  static constexpr size_t fwd = 3 * tile_b + score_b + p_b + o_b;
  // Backward: K, V, Q, dO, S, dP (the f32 dQ/dK/dV staging tile aliases S + dP), P, dS,
  // lse and dsum rows.
  static constexpr size_t bwd = 4 * tile_b + 2 * score_b + 2 * p_b + 2 * size_t(kBr) * 4;

  static_assert(kBr == kBc, "the staging tile holds 64 query rows or 64 key rows");
  static_assert(DMAX % 16 == 0, "wmma tiles are 16 wide");
  // wmma: ldm a multiple of 8 elements for bf16 and of 4 for f32; every fragment pointer
  // 32-byte aligned, so each region and each 16-row / 16-column step must be too.
  static_assert(DP % 8 == 0 && PP % 8 == 0 && SP % 4 == 0 && OP % 4 == 0, "wmma ldm");
  static_assert((16 * DP * 2) % 32 == 0 && (16 * PP * 2) % 32 == 0, "bf16 fragment rows");
  static_assert((16 * SP * 4) % 32 == 0 && (16 * OP * 4) % 32 == 0, "f32 fragment rows");
  static_assert(tile_b % 32 == 0 && score_b % 32 == 0 && p_b % 32 == 0 && o_b % 32 == 0,
                "region sizes keep 32-byte alignment");
  static_assert(2 * score_b >= o_b, "the staging tile fits in S + dP");
  static_assert(fwd <= 160 * 1024 && bwd <= 160 * 1024,
                "fits an A100 (163 KB) and a Hopper (227 KB) block with the static arrays");
};

// Rows [r0, r0 + 64) of a (B, T, nh, D) tensor at (b, head) -> s[64][DP] bf16.
template <typename T, int DMAX>
__device__ __forceinline__ void load_tile_bf16(bf16* s, const T* x, int64_t b, int64_t head,
                                               int64_t nh, int64_t r0, int64_t Tn, int64_t D,
                                               bool vec) {
  attn_tile::load_tile_bf16<T, DMAX, TcLayout<DMAX>::DP, kBr, kTcThreads>(s, x, b, head, nh, r0, Tn,
                                                                          D, vec);
}
using attn_tile::add4;

using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
using FragARow = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragACol = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;

// out[16][64] (f32, stride SP) = A[16 rows][DMAX] . B[64 rows][DMAX]^T, both bf16 stride DP.
template <int DMAX>
__device__ __forceinline__ void rows_dot_tile(const bf16* A, const bf16* Bm, float* out) {
  constexpr int DP = TcLayout<DMAX>::DP, SP = TcLayout<DMAX>::SP;
  FragAcc acc[kBc / 16];
#pragma unroll
  for (int n = 0; n < kBc / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
  for (int kk = 0; kk < DMAX; kk += 16) {
    FragARow fa;
    wmma::load_matrix_sync(fa, A + kk, DP);
#pragma unroll
    for (int n = 0; n < kBc / 16; ++n) {
      FragBCol fb;  // B^T: key rows of Bm read column-major
      wmma::load_matrix_sync(fb, Bm + (n * 16) * DP + kk, DP);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < kBc / 16; ++n)
    wmma::store_matrix_sync(out + n * 16, acc[n], SP, wmma::mem_row_major);
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kTcThreads)
    attn_fwd_tc_kernel(const T* q, const T* k, const T* v, const int32_t* dstart,
                       const int32_t* dend, T* out, T* lse, AttnShape a, bool vec) {
  using L = TcLayout<DMAX>;
  constexpr int DP = L::DP, SP = L::SP, PP = L::PP, OP = L::OP, NDT = DMAX / 16;
  extern __shared__ float4 smem4[];
  char* sm = reinterpret_cast<char*>(smem4);
  bf16* Qs = reinterpret_cast<bf16*>(sm);
  bf16* Ks = reinterpret_cast<bf16*>(sm + L::tile_b);
  bf16* Vs = reinterpret_cast<bf16*>(sm + 2 * L::tile_b);
  float* Ss = reinterpret_cast<float*>(sm + 3 * L::tile_b);
  bf16* Ps = reinterpret_cast<bf16*>(sm + 3 * L::tile_b + L::score_b);
  float* Os = reinterpret_cast<float*>(sm + 3 * L::tile_b + L::score_b + L::p_b);
  __shared__ int Rlo[kBr], Rhi[kBr];  // per query row: visible keys [Rlo, Rhi)

  // Heaviest (latest, for causal) query tiles first.
  const int64_t qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kvh = h / (a.H / a.Hkv);
  const int64_t i0 = qt * kBr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = warp * 16;
  const float sl2 = a.scale * kLog2e;  // scores in log2 units

  load_tile_bf16<T, DMAX>(Qs, q, b, h, a.H, i0, a.T, a.D, vec);
  for (int idx = threadIdx.x; idx < kBr * OP; idx += kTcThreads) Os[idx] = 0.f;
  for (int r = threadIdx.x; r < kBr; r += kTcThreads) {
    const int64_t i = i0 + r;
    const bool in = i < a.T;
    int64_t lo = (in && dstart) ? dstart[b * a.T + i] : 0;
    int64_t hi = (in && dend) ? dend[b * a.T + i] : a.T;
    if (a.causal) hi = min(hi, i + 1);
    if (!in) hi = 0;  // padding rows see nothing
    Rlo[r] = int(lo), Rhi[r] = int(hi);
  }

  const int64_t last = min(i0 + kBr, a.T) - 1;
  const int64_t lo = dstart ? dstart[b * a.T + i0] : 0;
  int64_t hi = dend ? dend[b * a.T + last] : a.T;
  if (a.causal) hi = min(hi, last + 1);

  float m[16], l[16];  // running max (log2 units) and sum of this warp's rows
#pragma unroll
  for (int rr = 0; rr < 16; ++rr) m[rr] = -INFINITY, l[rr] = 0.f;

  __syncthreads();  // Q, O = 0, Rlo/Rhi visible to every warp
  for (int64_t j0 = lo; j0 < hi; j0 += kBc) {
    __syncthreads();  // every warp is done with the previous K/V tiles
    load_tile_bf16<T, DMAX>(Ks, k, b, kvh, a.Hkv, j0, a.T, a.D, vec);
    load_tile_bf16<T, DMAX>(Vs, v, b, kvh, a.Hkv, j0, a.T, a.D, vec);
    __syncthreads();
    rows_dot_tile<DMAX>(Qs + r0 * DP, Ks, Ss + r0 * SP);
    __syncwarp();
    // Online softmax on the warp's rows; lane owns columns lane and lane + 32.
#pragma unroll
    for (int rr = 0; rr < 16; ++rr) {
      const int r = r0 + rr;
      const int64_t rlo = Rlo[r], rhi = Rhi[r];
      float s[2];
      float mx = m[rr];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = lane + 32 * c;
        const int64_t j = j0 + col;
        const bool valid = j >= rlo && j < rhi && j < hi;
        s[c] = valid ? Ss[r * SP + col] * sl2 : -INFINITY;
        mx = fmaxf(mx, s[c]);
      }
      mx = warp_max(mx);
      // Lazy rescaling: the reference max only moves when the row max grows by more than
      // 2^8 (then p <= 256 here, harmless in f32 and bf16), so O is rarely rescaled. The
      // result is the same softmax: l and O always refer to the same reference mref.
      const float mref = mx > m[rr] + 8.f ? mx : m[rr];  // -inf + 8 = -inf: first finite max
      const float ms = mref == -INFINITY ? 0.f : mref;
      const float alpha = exp2f(m[rr] - ms);  // 1 when mref did not move, 0 when m was -inf
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float p = exp2f(s[c] - ms);
        Ps[r * PP + lane + 32 * c] = __float2bfloat16_rn(p);
        sum += p;
      }
      sum = warp_sum(sum);
      l[rr] = l[rr] * alpha + sum;
      m[rr] = mref;
      if (alpha != 1.f) {  // warp-uniform: every lane holds the same m, mx
#pragma unroll
        for (int d = lane; d < DMAX; d += 32) Os[r * OP + d] *= alpha;
      }
    }
    __syncwarp();
    // O[16 rows] += P[16][64] V[64][DMAX]
    FragARow pa[kBc / 16];
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk)
      wmma::load_matrix_sync(pa[kk], Ps + r0 * PP + kk * 16, PP);
#pragma unroll
    for (int n = 0; n < NDT; ++n) {
      FragAcc oacc;
      wmma::load_matrix_sync(oacc, Os + r0 * OP + n * 16, OP, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBc / 16; ++kk) {
        FragBRow vb;
        wmma::load_matrix_sync(vb, Vs + (kk * 16) * DP + n * 16, DP);
        wmma::mma_sync(oacc, pa[kk], vb, oacc);
      }
      wmma::store_matrix_sync(Os + r0 * OP + n * 16, oacc, OP, wmma::mem_row_major);
    }
  }
  __syncwarp();  // the warp's O rows stored by every lane
#pragma unroll
  for (int rr = 0; rr < 16; ++rr) {
    const int r = r0 + rr;
    const int64_t i = i0 + r;
    if (i >= a.T) continue;
    const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
    T* orow = out + ((b * a.T + i) * a.H + h) * a.D;
    for (int d = lane; d < a.D; d += 32) orow[d] = from_f32<T>(Os[r * OP + d] * inv);
    if (lane == 0)
      lse[(b * a.H + h) * a.T + i] =
          from_f32<T>(l[rr] > 0.f ? m[rr] * kLn2 + logf(l[rr]) : -INFINITY);
  }
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kTcThreads)
    attn_bwd_tc_kernel(const T* dout, const T* q, const T* k, const T* v, const T* lse,
                       const float* dsum, const int32_t* dstart, const int32_t* dend, T* dk, T* dv,
                       float* dq_acc, AttnShape a, bool vec) {
  using L = TcLayout<DMAX>;
  constexpr int DP = L::DP, SP = L::SP, PP = L::PP, OP = L::OP, NDT = DMAX / 16;
  extern __shared__ float4 smem4[];
  char* sm = reinterpret_cast<char*>(smem4);
  bf16* Ks = reinterpret_cast<bf16*>(sm);
  bf16* Vs = reinterpret_cast<bf16*>(sm + L::tile_b);
  bf16* Qs = reinterpret_cast<bf16*>(sm + 2 * L::tile_b);
  bf16* Gs = reinterpret_cast<bf16*>(sm + 3 * L::tile_b);
  float* Ss = reinterpret_cast<float*>(sm + 4 * L::tile_b);
  float* DPs = reinterpret_cast<float*>(sm + 4 * L::tile_b + L::score_b);
  float* Xs = Ss;  // staging tile (stride OP) for dQ / dK / dV; aliases Ss + DPs
  bf16* Ps = reinterpret_cast<bf16*>(sm + 4 * L::tile_b + 2 * L::score_b);
  bf16* Dss = reinterpret_cast<bf16*>(sm + 4 * L::tile_b + 2 * L::score_b + L::p_b);
  float* Ls = reinterpret_cast<float*>(sm + 4 * L::tile_b + 2 * L::score_b + 2 * L::p_b);
  float* Dd = Ls + kBr;
  __shared__ int Rlo[kBr], Rhi[kBr];

  const int64_t kt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int64_t group = a.H / a.Hkv;
  const int64_t j0 = kt * kBc;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = warp * 16;  // query rows (S, dP, P, dS, dQ) and key rows (dK, dV) of the warp
  const float sl2 = a.scale * kLog2e;

  load_tile_bf16<T, DMAX>(Ks, k, b, kvh, a.Hkv, j0, a.T, a.D, vec);
  load_tile_bf16<T, DMAX>(Vs, v, b, kvh, a.Hkv, j0, a.T, a.D, vec);

  const int64_t jlast = min(j0 + kBc, a.T) - 1;
  int64_t qlo = a.causal ? j0 : 0;
  if (dstart) qlo = max(qlo, int64_t(dstart[b * a.T + j0]));
  const int64_t qhi = dend ? dend[b * a.T + jlast] : a.T;

  FragAcc dka[NDT], dva[NDT];  // key rows r0.., columns 16 n..
#pragma unroll
  for (int n = 0; n < NDT; ++n) wmma::fill_fragment(dka[n], 0.f), wmma::fill_fragment(dva[n], 0.f);

  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = qlo; i0 < qhi; i0 += kBr) {
      __syncthreads();  // previous Q/dO/P/dS/staging reads done (and K/V loaded, first time)
      load_tile_bf16<T, DMAX>(Qs, q, b, h, a.H, i0, a.T, a.D, vec);
      load_tile_bf16<T, DMAX>(Gs, dout, b, h, a.H, i0, a.T, a.D, vec);
      for (int r = threadIdx.x; r < kBr; r += kTcThreads) {
        const int64_t i = i0 + r;
        const bool in = i < a.T;
        Ls[r] = in ? to_f32(lse[(b * a.H + h) * a.T + i]) * kLog2e : 0.f;
        Dd[r] = in ? dsum[(b * a.H + h) * a.T + i] : 0.f;
        int64_t lo = (in && dstart) ? dstart[b * a.T + i] : 0;
        int64_t hi = (in && dend) ? dend[b * a.T + i] : a.T;
        if (a.causal) hi = min(hi, i + 1);
        if (!in) hi = 0;
        Rlo[r] = int(lo), Rhi[r] = int(hi);
      }
      __syncthreads();
      rows_dot_tile<DMAX>(Qs + r0 * DP, Ks, Ss + r0 * SP);   // S  = Q K^T
      rows_dot_tile<DMAX>(Gs + r0 * DP, Vs, DPs + r0 * SP);  // dP = dO V^T
      __syncwarp();
      for (int idx = lane; idx < 16 * kBc; idx += 32) {
        const int r = r0 + idx / kBc, col = idx % kBc;
        const int64_t j = j0 + col;
        const bool valid = j >= Rlo[r] && j < Rhi[r] && j < a.T;
        const float p = valid ? exp2f(Ss[r * SP + col] * sl2 - Ls[r]) : 0.f;
        Ps[r * PP + col] = __float2bfloat16_rn(p);
        Dss[r * PP + col] = __float2bfloat16_rn(p * (DPs[r * SP + col] - Dd[r]) * a.scale);
      }
      __syncthreads();  // every warp needs all 64 query rows of P and dS; S/dP free again
      // dV += P^T dO and dK += dS^T Q for key rows r0.. (P^T: P read column-major).
#pragma unroll
      for (int kk = 0; kk < kBr; kk += 16) {
        FragACol pt, dst;
        wmma::load_matrix_sync(pt, Ps + kk * PP + r0, PP);
        wmma::load_matrix_sync(dst, Dss + kk * PP + r0, PP);
#pragma unroll
        for (int n = 0; n < NDT; ++n) {
          FragBRow gb, qb;
          wmma::load_matrix_sync(gb, Gs + kk * DP + n * 16, DP);
          wmma::mma_sync(dva[n], pt, gb, dva[n]);
          wmma::load_matrix_sync(qb, Qs + kk * DP + n * 16, DP);
          wmma::mma_sync(dka[n], dst, qb, dka[n]);
        }
      }
      // dQ[query rows r0..] = dS K, staged in Xs (own rows only) and added with atomics.
      FragARow dsa[kBc / 16];
#pragma unroll
      for (int kk = 0; kk < kBc / 16; ++kk)
        wmma::load_matrix_sync(dsa[kk], Dss + r0 * PP + kk * 16, PP);
#pragma unroll
      for (int n = 0; n < NDT; ++n) {
        FragAcc acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < kBc / 16; ++kk) {
          FragBRow kb;
          wmma::load_matrix_sync(kb, Ks + (kk * 16) * DP + n * 16, DP);
          wmma::mma_sync(acc, dsa[kk], kb, acc);
        }
        wmma::store_matrix_sync(Xs + r0 * OP + n * 16, acc, OP, wmma::mem_row_major);
      }
      __syncwarp();
      if (vec) {  // D == DMAX, dq_acc 16-byte aligned: 4 columns per atomic
        constexpr int D4 = DMAX / 4;
        for (int idx = lane; idx < 16 * D4; idx += 32) {
          const int rr = idx / D4, d = (idx % D4) * 4;
          const int64_t i = i0 + r0 + rr;
          if (i >= a.T) break;  // rr only grows with idx
          add4(dq_acc + ((b * a.T + i) * a.H + h) * a.D + d,
               *reinterpret_cast<const float4*>(Xs + (r0 + rr) * OP + d));
        }
      } else {
        for (int rr = 0; rr < 16; ++rr) {
          const int64_t i = i0 + r0 + rr;
          if (i >= a.T) break;
          float* dqr = dq_acc + ((b * a.T + i) * a.H + h) * a.D;
          for (int d = lane; d < a.D; d += 32) atomicAdd(dqr + d, Xs[(r0 + rr) * OP + d]);
        }
      }
    }
  }
  __syncthreads();  // all staging reads of the last query tile done
  // dK, dV (key rows r0..) through the warp's own rows of the staging tile.
#pragma unroll
  for (int which = 0; which < 2; ++which) {
#pragma unroll
    for (int n = 0; n < NDT; ++n)
      wmma::store_matrix_sync(Xs + r0 * OP + n * 16, which == 0 ? dka[n] : dva[n], OP,
                              wmma::mem_row_major);
    __syncwarp();
    T* dst = which == 0 ? dk : dv;
    for (int rr = 0; rr < 16; ++rr) {
      const int64_t j = j0 + r0 + rr;
      if (j >= a.T) break;
      T* row = dst + ((b * a.T + j) * a.Hkv + kvh) * a.D;
      for (int d = lane; d < a.D; d += 32) row[d] = from_f32<T>(Xs[(r0 + rr) * OP + d]);
    }
    __syncwarp();  // reads done before the dV store overwrites the rows
  }
}

template <typename F>
cudaError_t dispatch_dmax(int64_t D, F&& f) {
  if (D <= 64) return f.template operator()<64>();
  if (D <= 128) return f.template operator()<128>();
  return cudaErrorInvalidValue;
}

bool aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

size_t attention_tc_smem_bytes(int64_t D, bool backward) {
  if (D <= 64) return backward ? TcLayout<64>::bwd : TcLayout<64>::fwd;
  return backward ? TcLayout<128>::bwd : TcLayout<128>::fwd;
}

cudaError_t attention_forward_tc(const void* q, const void* k, const void* v, const int32_t* dstart,
                                 const int32_t* dend, void* out, void* lse, KT t,
                                 const AttnShape& a, cudaStream_t s) {
  if (a.B == 0 || a.T == 0 || a.H == 0) return cudaSuccess;
  return dispatch_ft(t, [&]<typename T>() {
    return dispatch_dmax(a.D, [&]<int DMAX>() {
      auto kern = attn_fwd_tc_kernel<T, DMAX>;
      const size_t sm = TcLayout<DMAX>::fwd;
      cudaError_t e =
          cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sm));
      if (e != cudaSuccess) return e;
      const bool vec = a.D == DMAX && aligned16({q, k, v});
      dim3 grid(unsigned((a.T + kBr - 1) / kBr), unsigned(a.H), unsigned(a.B));
      kern<<<grid, kTcThreads, sm, s>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                        static_cast<const T*>(v), dstart, dend,
                                        static_cast<T*>(out), static_cast<T*>(lse), a, vec);
      return cudaGetLastError();
    });
  });
}

cudaError_t attention_backward_tc(const void* dout, const void* q, const void* k, const void* v,
                                  const void* lse, const float* dsum, const int32_t* dstart,
                                  const int32_t* dend, void* dk, void* dv, float* dq_acc, KT t,
                                  const AttnShape& a, cudaStream_t s) {
  if (a.B == 0 || a.T == 0 || a.H == 0) return cudaSuccess;
  return dispatch_ft(t, [&]<typename T>() {
    return dispatch_dmax(a.D, [&]<int DMAX>() {
      auto kern = attn_bwd_tc_kernel<T, DMAX>;
      const size_t sm = TcLayout<DMAX>::bwd;
      cudaError_t e =
          cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sm));
      if (e != cudaSuccess) return e;
      const bool vec = a.D == DMAX && aligned16({dout, q, k, v, dq_acc});
      dim3 grid(unsigned((a.T + kBc - 1) / kBc), unsigned(a.Hkv), unsigned(a.B));
      kern<<<grid, kTcThreads, sm, s>>>(static_cast<const T*>(dout), static_cast<const T*>(q),
                                        static_cast<const T*>(k), static_cast<const T*>(v),
                                        static_cast<const T*>(lse), dsum, dstart, dend,
                                        static_cast<T*>(dk), static_cast<T*>(dv), dq_acc, a, vec);
      return cudaGetLastError();
    });
  });
}

}  // namespace llama3::cuda
