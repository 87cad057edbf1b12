// Flash attention on tensor cores with register-resident tiles (FlashAttention-2 layout):
// mma.sync m16n8k16 (bf16 products, f32 accumulation) and ldmatrix, for the mixed-precision
// path (AttentionParams::compute == bf16, or bf16 inputs). Same masks, GQA and tile visiting
// order as the exact SIMT kernels of attention.cu. The scores S, the probabilities P and
// the dS tiles stay in the accumulator registers of the warp that made them; only the
// operands go through shared memory. (An earlier wmma version that round-tripped every
// score tile through shared memory ran 3.6x slower on an H100: bench/RESULTS.md.)
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 g + t4. A (16x16, row):
// a0 = (row g, cols 2 t4, +1), a1 = (row g + 8, same cols), a2/a3 = the same rows at cols
// 2 t4 + 8, +9. B (16x8, col): b0 = (rows 2 t4, +1; col g), b1 = rows 2 t4 + 8, +9.
// C (16x8, f32): c0/c1 = (row g, cols 2 t4, +1), c2/c3 = row g + 8. Two C tiles side by side
// (cols 0-7 and 8-15) pack into one A fragment, which is how P and dS feed the next product
// without leaving registers. Operands come from shared memory by ldmatrix, four 8x8
// matrices per instruction: A fragments and the B operands of row-major tiles read along k
// (K for Q K^T, Q and dO for K Q^T and V dO^T) untransposed, B operands that must run down
// the columns of a row-major tile (V for P V, dO and Q for P^T dO and dS^T Q, K for dS K)
// with .trans. Tiles that every row of the block sees whole skip the per-element mask.
//
// Inputs are bf16 (the backend converts f32 activations once per call, which halves the
// L2 traffic of the K/V and Q/dO tiles every block re-reads); outputs (O, dK, dV) are
// TO = f32 or bf16, lse is f32 always (a bf16 lse would put an error of up to 2^-8 |lse| into
// every recomputed probability), dQ goes to the f32 accumulator. When the head dim equals the
// template's DMAX and the rows are 16-byte aligned, tiles are copied with cp.async into two
// buffers: the next K/V (forward) or Q/dO tile (backward) streams in while the current one is used.
//
// Forward: one block of 4 warps per (batch, head, 64-query tile); warp w owns query rows
// 16 w .. 16 w + 15: its Q fragments stay in registers, S = Q K^T (16 x 64) and O (16 x D)
// are accumulators, the online softmax runs on them (row max and sums over the 4 lanes of a
// quad), P is rounded to bf16 straight into A fragments for O += P V.
//
// Backward: one block of 4 warps per (batch, query head, 64-key tile) under GQA, writing f32
// dK/dV partials that attn_gqa_reduce_kernel sums over the group (4x the blocks of one per kv
// head: under a causal mask the heaviest block then does 1/4 of the work and the grid no
// longer ends in a tail of long blocks); or, without partials, one block per (batch, kv
// head, key tile) looping over its group's query heads. Each block loops over the query
// tiles that see its keys. Warp w owns key rows 16 w ..:
// S^T = K Q^T and dP^T = V dO^T (16 x 64 accumulators), P^T = exp(S^T scale - lse) and
// dS^T = P^T (dP^T - dsum) scale in place, dV += P^T dO and dK += dS^T Q into accumulators
// held for the block's life. dS^T goes to shared memory key-major (the packed A fragments of
// the dK product, as they are), and after a block barrier warp w computes dQ = dS K for query
// rows 16 w .. (dS loaded by ldmatrix.trans) and adds it to dq_acc with f32 atomics.
// At head dim <= 64 (the default since an H200 run, bench/RESULTS.md) the layout is
// BwdLayout<64, 2, 32>: each warp owns 32 key rows (128 per block) and iterates over
// 32-query tiles: the same MMAs per iteration with 72 ldmatrix instead of 92 (ptxas/SASS of
// nvcc 13.0), half the dQ atomics per key, at up to 255 registers (2 blocks, 8 warps per SM,
// against 3 blocks and 12 warps). LLAMA3_ATTN_BWD_MT=1 runs the one-m-tile layout
// (AttnShape::bwd_one_mtile, for A/B timing; the layout at larger head dims);
// LLAMA3_ATTN_BWD_STSM=1 stores dS by stmatrix (sm_90).
#include <algorithm>
#include <cfloat>
#include <initializer_list>
#include <type_traits>

#include "runtime/cuda/common.cuh"

// LLAMA3_HOT(condition, value): the condition, unless the file is compiled with
// LLAMA3_HOT_PATH defined (only by bench/kernel_stats.py --hot-path, never in a build): then
// the value the training step's common case has (mask-free tile pairs, no documents, the lse
// prefetch, dQ rows of whole head dims), so that the SASS shows the loops as that case executes
// them, without the branches it never takes.
#ifdef LLAMA3_HOT_PATH
#define LLAMA3_HOT(condition, value) (value)
#else
#define LLAMA3_HOT(condition, value) (condition)
#endif

LLAMA3_CUDA_NS_BEGIN

namespace {

using bf16 = __nv_bfloat16;

constexpr int kM = 64;            // query rows (forward) or key rows (backward) per block tile
constexpr int kN = 64;            // keys (forward) or queries (backward) per inner tile
constexpr int kMmaThreads = 128;  // 4 warps, 16 tile rows each
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kM == 16 * (kMmaThreads / 32) && kN == kM, "each warp owns 16 rows of 64");

template <int DMAX>
struct MmaLayout {
  static constexpr int DP = DMAX + 8;  // bf16 row stride of the operand tiles: 16 B aligned
                                       // rows, and 8 consecutive rows hit distinct banks
  static constexpr size_t tile_b = size_t(kM) * DP * 2;
  // Forward: Q, then two buffers of (K, V). (The synchronous path uses the first buffers
  // only.) The backward's layout is BwdLayout, below.
  static constexpr size_t fwd = 5 * tile_b;   // MT = 1 (64 query rows)
  static constexpr size_t fwd2 = 6 * tile_b;  // MT = 2 (128 query rows)
  static_assert(DMAX % 16 == 0 && (DP * 2) % 16 == 0, "ldmatrix rows");
  static_assert(tile_b % 16 == 0, "regions keep 16-byte alignment");
};

__device__ __forceinline__ uint32_t ld32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
__device__ __forceinline__ void st32(bf16* p, uint32_t v) {
  *reinterpret_cast<uint32_t*>(p) = v;
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}
// c += a b (m16n8k16, bf16 inputs, f32 accumulators).
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
#ifdef LLAMA3_CUDA_EMU
  ::llama3::emu::mma_m16n8k16_bf16(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
// Four transposed 8x8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const bf16* p) {
#ifdef LLAMA3_CUDA_EMU
  ::llama3::emu::ldmatrix_x4(r, p, /*trans=*/true);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
// stmatrix (sm_90; unused where kHaveStmatrix is false): four 8x8 bf16 matrices held as A/C
// fragments, stored as they are; lane l gives the address of row l % 8 of matrix l / 8.
#if defined(LLAMA3_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
constexpr bool kHaveStmatrix = true;
#else
constexpr bool kHaveStmatrix = false;
#endif
[[maybe_unused]] __device__ __forceinline__ void stsm_x4(bf16* p, const uint32_t (&r)[4]) {
#ifdef LLAMA3_CUDA_EMU
  ::llama3::emu::stmatrix_x4(r, p, /*trans=*/false);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(addr),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#else
  (void)p, (void)r;
#endif
}
// B fragments for columns [16 dn, 16 dn + 16) x rows [16 kk, 16 kk + 16) of a row-major tile
// `s` (stride DP) whose rows run along k: r[0], r[1] = b0, b1 of columns 16 dn..+7,
// r[2], r[3] = those of columns 16 dn + 8..+15.
template <int DP>
__device__ __forceinline__ void ldsm_b_cols(uint32_t (&r)[4], const bf16* s, int kk, int dn,
                                            int lane) {
  const int mi = lane >> 3, rr = lane & 7;
  ldsm_x4_t(r, s + (kk * 16 + rr + 8 * (mi & 1)) * DP + dn * 16 + 8 * (mi >> 1));
}
// Four 8x8 bf16 matrices (not transposed); lane l gives the address of row l % 8 of matrix
// l / 8, and receives (row l / 4, columns 2 (l % 4), +1) of each.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
#ifdef LLAMA3_CUDA_EMU
  ::llama3::emu::ldmatrix_x4(r, p, /*trans=*/false);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
// The A fragment of rows [row0, row0 + 16) x cols [16 kk, 16 kk + 16) in one ldmatrix:
// matrices (rows +0, cols +0) = a0, (+8, +0) = a1, (+0, +8) = a2, (+8, +8) = a3.
template <int DP>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const bf16* s, int row0, int kk,
                                       int lane) {
  const int mi = lane >> 3, rr = lane & 7;
  ldsm_x4(a, s + (row0 + rr + 8 * (mi & 1)) * DP + kk * 16 + 8 * (mi >> 1));
}
// The A fragment of rows [row0, row0 + 16) x k [16 kk, 16 kk + 16) of a matrix stored
// transposed (s[k][row], stride SP), by ldmatrix.trans of the stored blocks (k +0, rows +0)
// = a0, (+0, +8) = a1, (+8, +0) = a2, (+8, +8) = a3.
template <int SP>
__device__ __forceinline__ void ldsm_a_t(uint32_t (&a)[4], const bf16* s, int row0, int kk,
                                         int lane) {
  const int mi = lane >> 3, rr = lane & 7;
  ldsm_x4_t(a, s + (kk * 16 + rr + 8 * (mi >> 1)) * SP + row0 + 8 * (mi & 1));
}
// B fragments of two n-tiles (rows [n0, n0 + 8) and [n0 + 8, n0 + 16) of a tile whose rows
// run along n, cols [16 kk, 16 kk + 16) along k): r[0], r[1] = b0, b1 of the first,
// r[2], r[3] of the second.
template <int DP>
__device__ __forceinline__ void ldsm_b_rows(uint32_t (&r)[4], const bf16* s, int n0, int kk,
                                            int lane) {
  const int mi = lane >> 3, rr = lane & 7;
  ldsm_x4(r, s + (n0 + rr + 8 * (mi >> 1)) * DP + kk * 16 + 8 * (mi & 1));
}
// A fragment of rows [row0, row0 + 16) x cols [16 kk, 16 kk + 16) of a row-major tile.
template <int DP>
__device__ __forceinline__ void ld_a(uint32_t (&a)[4], const bf16* s, int row0, int kk, int g,
                                     int t4) {
  const bf16* p = s + (row0 + g) * DP + kk * 16 + 2 * t4;
  a[0] = ld32(p), a[1] = ld32(p + 8 * DP), a[2] = ld32(p + 8), a[3] = ld32(p + 8 * DP + 8);
}
// c[n] (n < 8: 16 rows x 64 columns) += A(16 x DMAX) . tile(64 rows x DMAX)^T, where
// a[kk] holds the A fragments and tile rows run along the 64 output columns; the B
// fragments of two n-tiles come from one ldmatrix.
template <int DMAX, int DP>
__device__ __forceinline__ void rows_dot_tile(float (&c)[8][4], const uint32_t (&a)[DMAX / 16][4],
                                              const bf16* tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < DMAX / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_b_rows<DP>(b, tile, np * 16, kk, lane);
      mma(c[2 * np], a[kk], b[0], b[1]);
      mma(c[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}
// A fragments (k = the 64 columns of c, in 16-wide steps) from two adjacent C tiles.
template <int N>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[N][4], int kk) {
  a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}
// 2^x as one ex2.approx.ftz.f32 (MUFU.EX2). exp2f without -ftz wraps the same instruction in
// a compare and two predicated multiplies per call (SASS of nvcc 13.0) to keep results below
// 2^-126 as denormals; here those are probabilities under 1.2e-38, which change no sum, so
// they flush to zero. Normal results are the same bits as exp2f's.
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef LLAMA3_CUDA_EMU
  const float r = std::exp2(x);
  return r < FLT_MIN ? 0.f : r;
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// p[0..1] += (x, y) atomically (one vector atomic on Hopper; p 8-byte aligned).
__device__ __forceinline__ void add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p + 0, x), atomicAdd(p + 1, y);
#endif
}
// 4 bytes global -> shared (cp.async.ca: the only form below 16 bytes); zero fill when !valid.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
#ifdef LLAMA3_CUDA_EMU
  ::llama3::emu::cp_async(smem, gmem, 4, valid);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 4 : 0));
#endif
}
// 16 bytes global -> shared without staging in registers; zero fill when !valid.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef LLAMA3_CUDA_EMU
  ::llama3::emu::cp_async(smem, gmem, 16, valid);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef LLAMA3_CUDA_EMU
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef LLAMA3_CUDA_EMU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Rows [r0, r0 + ROWS) of a (B, T, nh, D) bf16 tensor at (b, head) into s[ROWS][DP], zero
// outside [0, T) x [0, D). ASYNC (D == DMAX, 16-byte aligned rows): cp.async, to be committed
// and waited for by the caller; else element by element.
template <int DMAX, bool ASYNC, int ROWS = kM>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* x, int64_t b, int64_t head,
                                          int64_t nh, int64_t r0, int64_t Tn, int64_t D) {
  constexpr int DP = MmaLayout<DMAX>::DP;
  if constexpr (ASYNC) {
    // Thread t copies chunk t % C8 of rows t / C8 + k * RP, k < ROWS / RP: a fixed, unrolled
    // count with one row index and source address per thread, the rest at constant steps
    // (a loop over flat chunk indices recomputed both, in 64 bits, per chunk: SASS).
    constexpr int C8 = DMAX / 8;          // 16-byte chunks per row
    constexpr int RP = kMmaThreads / C8;  // rows one pass of the block covers
    static_assert(kMmaThreads % C8 == 0 && ROWS % RP == 0, "whole rows per pass");
    const int r = threadIdx.x / C8, c = (threadIdx.x % C8) * 8;
    const int64_t row = r0 + r;
    const bf16* src = x + ((b * Tn + row) * nh + head) * DMAX + c;  // (read only where ok)
    const int64_t step = int64_t(RP) * nh * DMAX;
#pragma unroll
    for (int k = 0; k < ROWS / RP; ++k) {
      const bool ok = row + k * RP < Tn;
      cp_async16(s + (r + k * RP) * DP + c, ok ? src + k * step : x, ok);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * DMAX; idx += kMmaThreads) {
      const int r = idx / DMAX, c = idx % DMAX;
      const int64_t row = r0 + r;
      s[r * DP + c] =
          row < Tn && c < D ? x[((b * Tn + row) * nh + head) * D + c] : __float2bfloat16_rn(0.f);
    }
  }
}

// Row i of (b, head) in a (B, T, nh, D) tensor, columns 2 t4 + 8 n + {0, 1}, from the two
// accumulator values of a C tile row.
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int64_t d, int64_t D, float x, float y) {
  if (d < D) row[d] = from_f32<T>(x);
  if (d + 1 < D) row[d + 1] = from_f32<T>(y);
}

// MT m16 tiles of query rows per warp (block rows BM = 64 MT): with MT = 2 every K and V
// fragment loaded from shared memory feeds two MMAs (the forward is bound by ldmatrix
// bandwidth at MT = 1), at twice the accumulators per thread and half the blocks per SM.
// Registers are capped for 4 blocks per SM at DMAX 64 with MT = 1 (2 at 128; 2 with MT = 2):
// faster on an H100 than the compiler's own choice, despite a few spilled bytes. Tiles that
// every row of the block sees whole skip the per-element mask.
template <typename TO, int DMAX, bool ASYNC, int MT>
__global__ void __launch_bounds__(kMmaThreads, MT == 2      ? 2
                                               : DMAX == 64 ? 4
                                                            : 2)
    attn_fwd_mma_kernel(const bf16* q, const bf16* k, const bf16* v, const int32_t* dstart,
                        const int32_t* dend, TO* out, float* lse, AttnShape a) {
  using L = MmaLayout<DMAX>;
  constexpr int DP = L::DP, NK = DMAX / 16, ND = DMAX / 8, BM = kM * MT;
  LLAMA3_DYNAMIC_SMEM(float4, smem4);
  bf16* Qs = reinterpret_cast<bf16*>(smem4);  // [BM][DP]
  bf16* KVs = Qs + BM * DP;                   // [buffer][K, V][kN][DP]: two buffers when ASYNC
  __shared__ int Rlo[BM], Rhi[BM];            // per query row: visible keys [Rlo, Rhi)
  __shared__ int LoMax, HiMin;                // every row sees the keys [LoMax, HiMin)

  // Grid (heads, query tiles, batch), blockIdx.x fastest: the heaviest (latest, for causal)
  // query tile of every head is dispatched before any lighter one.
  const int64_t qt = gridDim.y - 1 - blockIdx.y, h = blockIdx.x, b = blockIdx.z;
  const int64_t kvh = h / (a.H / a.Hkv);
  const int64_t i0 = qt * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
  const int r0 = warp * 16 * MT;  // the warp's rows: m-tile mt is r0 + 16 mt .. + 15
  // Scores in log2 units: S |scale| log2(e), with Q's signs flipped below for a negative
  // scale (exact), so that the row maxima can be taken on the raw products and the
  // exponent is one FFMA, exp2(s sl2 - m).
  const float sl2 = fabsf(a.scale) * kLog2e;

  for (int r = threadIdx.x; r < BM; r += kMmaThreads) {
    int64_t lo, hi;
    visible_keys(a, dstart, dend, b, i0 + r, lo, hi);  // padding rows see nothing
    Rlo[r] = int(lo), Rhi[r] = int(hi);
  }
  if (threadIdx.x == 0) LoMax = 0, HiMin = int(a.Tk);
  __syncthreads();
  for (int r = threadIdx.x; r < BM; r += kMmaThreads)
    atomicMax(&LoMax, Rlo[r]), atomicMin(&HiMin, Rhi[r]);
  const int64_t last = min(i0 + BM, a.T) - 1;
  int64_t lo = dstart ? dstart[b * a.Tk + i0] : 0;
  int64_t hi = dend ? dend[b * a.Tk + last] : a.Tk;
  if (a.causal) hi = min(hi, last + 1);
  if (a.q_pos) visible_keys_of_rows(a, dstart, dend, b, i0, BM, lo, hi);

  auto load_kv = [&](int buf, int64_t j0) {
    bf16* kb = KVs + buf * 2 * kN * DP;
    load_tile<DMAX, ASYNC>(kb, k, b, kvh, a.Hkv, j0, a.Tk, a.D);
    load_tile<DMAX, ASYNC>(kb + kN * DP, v, b, kvh, a.Hkv, j0, a.Tk, a.D);
  };
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    load_tile<DMAX, ASYNC>(Qs + mt * kM * DP, q, b, h, a.H, i0 + mt * kM, a.T, a.D);
  if constexpr (ASYNC) {
    if (lo < hi) load_kv(0, lo);
    cp_async_commit();
    cp_async_wait<0>();
  }
  __syncthreads();

  uint32_t qa[MT][NK][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      ld_a<DP>(qa[mt][kk], Qs, r0 + 16 * mt, kk, g, t4);
      if (a.scale < 0.f)
#pragma unroll
        for (int e = 0; e < 4; ++e) qa[mt][kk][e] ^= 0x80008000u;  // -Q, both bf16 halves
    }
  // This lane's two rows per m-tile: g (A) and g + 8 (B).
  int loA[MT], hiA[MT], loB[MT], hiB[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int ra = r0 + 16 * mt + g;
    loA[mt] = Rlo[ra], hiA[mt] = Rhi[ra], loB[mt] = Rlo[ra + 8], hiB[mt] = Rhi[ra + 8];
  }
  float o[MT][ND][4];
  float mA[MT], mB[MT], lA[MT], lB[MT];  // lA/lB: this lane's columns only
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < ND; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    mA[mt] = mB[mt] = -INFINITY, lA[mt] = lB[mt] = 0.f;
  }

  int it = 0;
  for (int64_t j0 = lo; j0 < hi; j0 += kN, ++it) {
    const int buf = ASYNC ? (it & 1) : 0;
    if constexpr (ASYNC) {
      // Tile it landed (waited for at the end of the previous iteration or above); stream
      // tile it + 1 into the other buffer while this one is used.
      if (j0 + kN < hi) load_kv(buf ^ 1, j0 + kN);
      cp_async_commit();
    } else {
      __syncthreads();  // every warp is done with the previous K/V tiles
      load_kv(0, j0);
      __syncthreads();
    }
    const bf16* Ks = KVs + buf * 2 * kN * DP;
    const bf16* Vs = Ks + kN * DP;
    float s[MT][8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
        // S = Q K^T: each pair of K B-fragments serves every m-tile.
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t kb[4];
        ldsm_b_rows<DP>(kb, Ks, np * 16, kk, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(s[mt][2 * np], qa[mt][kk], kb[0], kb[1]);
          mma(s[mt][2 * np + 1], qa[mt][kk], kb[2], kb[3]);
        }
      }
    }
    const bool full = LLAMA3_HOT(LoMax <= j0 && j0 + kN <= HiMin, true);  // block-uniform
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      // Row maxima of the raw products (sl2 > 0: the same as those of the scaled scores,
      // bit for bit), then in log2 units with the running maxima.
      float mxA = -INFINITY, mxB = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = int(j0) + n * 8 + 2 * t4 + (e & 1);
          const bool ok =
              full || (e < 2 ? (j >= loA[mt] && j < hiA[mt]) : (j >= loB[mt] && j < hiB[mt]));
          const float x = ok ? s[mt][n][e] : -INFINITY;
          s[mt][n][e] = x;
          if (e < 2)
            mxA = fmaxf(mxA, x);
          else
            mxB = fmaxf(mxB, x);
        }
      }
      mxA = fmaxf(mA[mt], quad_max(mxA) * sl2), mxB = fmaxf(mB[mt], quad_max(mxB) * sl2);
      const float msA = mxA == -INFINITY ? 0.f : mxA, msB = mxB == -INFINITY ? 0.f : mxB;
      const float alA = exp2_ftz(mA[mt] - msA), alB = exp2_ftz(mB[mt] - msB);  // 0 while m = -inf
      float sumA = 0.f, sumB = 0.f;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        // (a masked -inf gives fma(-inf, sl2, -m) = -inf: probability 0)
        s[mt][n][0] = exp2_ftz(fmaf(s[mt][n][0], sl2, -msA));
        s[mt][n][1] = exp2_ftz(fmaf(s[mt][n][1], sl2, -msA));
        s[mt][n][2] = exp2_ftz(fmaf(s[mt][n][2], sl2, -msB));
        s[mt][n][3] = exp2_ftz(fmaf(s[mt][n][3], sl2, -msB));
        sumA += s[mt][n][0] + s[mt][n][1], sumB += s[mt][n][2] + s[mt][n][3];
      }
      lA[mt] = lA[mt] * alA + sumA, lB[mt] = lB[mt] * alB + sumB;
      mA[mt] = mxA, mB[mt] = mxB;
      // Rescale O unless no row maximum of the warp's m-tile moved (then every factor is 1
      // and the multiplies change no bit): in causal attention the maxima settle after the
      // first tiles, so most tiles skip 4 ND multiplies a thread for one vote.
      if (!__all_sync(0xffffffffu, alA == 1.f && alB == 1.f))
#pragma unroll
        for (int n = 0; n < ND; ++n)
          o[mt][n][0] *= alA, o[mt][n][1] *= alA, o[mt][n][2] *= alB, o[mt][n][3] *= alB;
    }
    // O += P V (k = the 64 keys of the tile): each pair of V B-fragments serves every m-tile.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) c_to_a(pa[mt], s[mt], kk);
#pragma unroll
      for (int dn = 0; dn < DMAX / 16; ++dn) {
        uint32_t vb[4];
        ldsm_b_cols<DP>(vb, Vs, kk, dn, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(o[mt][2 * dn], pa[mt], vb[0], vb[1]);
          mma(o[mt][2 * dn + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
    if constexpr (ASYNC) {
      cp_async_wait<0>();  // this thread's copies of tile it + 1 landed
      __syncthreads();     // everyone's did, and everyone is done with buffer `buf`
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const float sA = quad_sum(lA[mt]), sB = quad_sum(lB[mt]);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t i = i0 + r0 + 16 * mt + g + 8 * half;
      if (i >= a.T) continue;
      const float l = half ? sB : sA, m = half ? mB[mt] : mA[mt];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      TO* orow = out + ((b * a.T + i) * a.H + h) * a.D;
#pragma unroll
      for (int n = 0; n < ND; ++n)
        store_pair(orow, n * 8 + 2 * t4, a.D, o[mt][n][2 * half] * inv,
                   o[mt][n][2 * half + 1] * inv);
      if (t4 == 0) lse[(b * a.H + h) * a.T + i] = l > 0.f ? m * kLn2 + logf(l) : -INFINITY;
    }
  }
}

// Backward tiles: MT m16 tiles of key rows per warp (BM = 64 MT keys per block) and NQ query
// rows per inner iteration. (1, 64) is the kernel measured on the H100s; (2, 32) halves the
// ldmatrix reads per MMA (every Q/dO fragment feeds both m-tiles, every dQ row sums 128 keys
// before its atomic) at 8 warps per SM instead of 12: the default at head dim <= 64 (5%
// faster on an H200; LLAMA3_ATTN_BWD_MT=1 reverts it).
template <int DMAX, int MT, int NQ>
struct BwdLayout {
  static constexpr int DP = MmaLayout<DMAX>::DP;
  static constexpr int BM = kM * MT;
  // dS^T, key-major: BM key rows x NQ queries at a bf16 row stride of SQ (+8: the rows of an
  // ldmatrix or of a warp's 4-byte stores fall in distinct banks).
  static constexpr int SQ = NQ + 8;
  static constexpr size_t kv_b = size_t(BM) * DP * 2;
  static constexpr size_t qg_b = size_t(NQ) * DP * 2;
  static constexpr size_t ds_b = size_t(BM) * SQ * 2;
  // K, V, dS, two buffers of (lse, dsum), two buffers of (Q, dO).
  static constexpr size_t bytes = 2 * kv_b + ds_b + 4 * NQ * 4 + 4 * qg_b;
  static_assert(NQ % 16 == 0 && 2 * NQ <= kMmaThreads, "one statistic per thread");
  static_assert(kv_b % 16 == 0 && ds_b % 16 == 0 && qg_b % 16 == 0 && (SQ * 2) % 16 == 0,
                "regions and ldmatrix rows keep 16-byte alignment");
};

// Registers capped for 3 blocks per SM at (DMAX 64, MT 1) (168; ptxas of nvcc 13.0 spills
// nothing there, where a cap of 128 for 4 blocks spilled 544 bytes), 2 with MT 2 (255: 16-20
// bytes spilled).
// (key tile, query tile) pairs that are wholly visible take a mask-free path.
template <typename TO, int DMAX, bool ASYNC, int MT, int NQ, bool STSM>
__global__ void __launch_bounds__(kMmaThreads, MT == 2      ? 2
                                               : DMAX == 64 ? 3
                                                            : 1)
    attn_bwd_mma_kernel(const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                        const float* lse, const float* dsum, const int32_t* dstart,
                        const int32_t* dend, TO* dk, TO* dv, void* dk_part, void* dv_part,
                        float* dq_acc, AttnShape a) {
  using L = BwdLayout<DMAX, MT, NQ>;
  constexpr int DP = L::DP, SQ = L::SQ, BM = L::BM, NK = DMAX / 16, ND = DMAX / 8;
  constexpr int NN = NQ / 8;  // n8 tiles of queries in S^T and dP^T
  // dQ (NQ x DMAX) = dS (NQ x BM) K (BM x DMAX): QM m16 tiles of query rows, WPM warps per
  // m-tile, each taking NDW n8 tiles of the head dim.
  constexpr int QM = NQ / 16, WPM = (kMmaThreads / 32) / QM, NDW = ND / WPM;
  static_assert(QM * WPM == kMmaThreads / 32 && NDW % 2 == 0, "dQ work splits over the warps");
  LLAMA3_DYNAMIC_SMEM(float4, smem4);
  bf16* Ks = reinterpret_cast<bf16*>(smem4);
  bf16* Vs = Ks + BM * DP;
  bf16* Ss = Vs + BM * DP;                              // dS^T, key-major: Ss[key][query]
  float* LsB = reinterpret_cast<float*>(Ss + BM * SQ);  // [buffer][NQ] lse (natural log)
  float* DdB = LsB + 2 * NQ;                            // [buffer][NQ] dsum per query row
  bf16* QGs = reinterpret_cast<bf16*>(DdB + 2 * NQ);    // [buffer][Q, dO][NQ][DP]
  __shared__ int Rlo[NQ], Rhi[NQ];
  // lse and dsum stream in with the Q/dO tiles by cp.async (plain loads at the top of each
  // iteration on the synchronous path).
  // (a.no_stats_prefetch: the plain loads for f32 too, to measure what the prefetch gains.)
  const bool stats_async = ASYNC && LLAMA3_HOT(!a.no_stats_prefetch, true);
  // Without documents the mask is arithmetic (no per-row bounds in shared memory, no extra
  // barrier per iteration).
  const bool docs = LLAMA3_HOT(dstart != nullptr || dend != nullptr || a.q_pos != nullptr, false);

  // Grid (heads, key tiles, batch): blockIdx.x runs fastest, so every head's key tile 0 (the
  // heaviest under a causal mask) is dispatched before any tile 1, and so on. Split (dk_part
  // set): one block per query head, writing dK/dV partials (B, T, H, D; f32, or bf16 with
  // a.gqa_part_bf16 and bf16 outputs) that
  // attn_gqa_reduce_kernel sums over the group; else one block per kv head looping over
  // its group's query heads.
  const bool split = dk_part != nullptr;
  const int64_t group = a.H / a.Hkv;
  const int64_t kt = blockIdx.y, b = blockIdx.z;
  const int64_t kvh = split ? blockIdx.x / group : blockIdx.x;
  const int64_t hq0 = split ? blockIdx.x : kvh * group;  // first query head of this block
  const int64_t nheads = split ? 1 : group;
  const int64_t j0 = kt * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
  const int r0 = warp * 16 * MT;  // the warp's key rows: m-tile mt is r0 + 16 mt .. + 15
  const int qm = warp % QM;       // dQ: query rows 16 qm .., head-dim n8 tiles from nd0
  const int nd0 = (warp / QM) * NDW;
  const float sl2 = a.scale * kLog2e;
  const bool vec2 = a.D % 2 == 0 && reinterpret_cast<uintptr_t>(dq_acc) % 8 == 0;
  // dQ rows of exactly DMAX columns (the model's head dims 64 and 128): the atomics take one
  // row pointer and constant offsets, with no per-column bound. (The general form recomputed
  // the row's 64-bit address and compared both columns for every pair: about 17 instructions
  // an atomic, 16 atomics a thread an iteration, in the SASS.)
  const bool whole_rows = LLAMA3_HOT(vec2 && a.D == DMAX, true);

  const int64_t jlast = min(j0 + BM, a.Tk) - 1;
  int64_t qlo = a.causal ? j0 : 0;
  if (dstart) qlo = max(qlo, int64_t(dstart[b * a.Tk + j0]));
  int64_t qhi = dend ? dend[b * a.Tk + jlast] : a.T;
  if (a.q_pos) qlo = 0, qhi = a.T;  // (positions need not be monotonic: visit every tile)
  // The (query head, query tile) pairs this block visits, flattened so that the next pair's
  // Q/dO tiles can stream in while the current ones are used. Pair it is (head hq0 + it /
  // ntiles, tile it % ntiles), walked by a cursor: a 64-bit division in the loop was a call
  // of some 70 instructions, twice per iteration, on the path to the tile loads.
  const int64_t ntiles = qhi > qlo ? (qhi - qlo + NQ - 1) / NQ : 0;
  const int64_t total = nheads * ntiles;
  auto load_qg = [&](int buf, int64_t h, int64_t tile) {
    const int64_t i0 = qlo + tile * NQ;
    bf16* qb = QGs + buf * 2 * NQ * DP;
    load_tile<DMAX, ASYNC, NQ>(qb, q, b, h, a.H, i0, a.T, a.D);
    load_tile<DMAX, ASYNC, NQ>(qb + NQ * DP, dout, b, h, a.H, i0, a.T, a.D);
    if (stats_async && threadIdx.x < 2 * NQ) {
      // Thread t < NQ: lse of query row i0 + t; NQ <= t < 2 NQ: its dsum (zero past T).
      const int r = threadIdx.x % NQ;
      const int64_t i = i0 + r;
      const bool ok = i < a.T;
      const int64_t at = (b * a.H + h) * a.T + (ok ? i : 0);
      if (threadIdx.x < NQ)
        cp_async4(LsB + buf * NQ + r, lse + at, ok);
      else
        cp_async4(DdB + buf * NQ + r, dsum + at, ok);
    }
  };

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    load_tile<DMAX, ASYNC, kM>(Ks + mt * kM * DP, k, b, kvh, a.Hkv, j0 + mt * kM, a.Tk, a.D);
    load_tile<DMAX, ASYNC, kM>(Vs + mt * kM * DP, v, b, kvh, a.Hkv, j0 + mt * kM, a.Tk, a.D);
  }
  if constexpr (ASYNC) {
    if (total > 0) load_qg(0, hq0, 0);
    cp_async_commit();
  }

  float dka[MT][ND][4], dva[MT][ND][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dka[mt][n][e] = 0.f, dva[mt][n][e] = 0.f;

  int64_t h_next = hq0, tile_next = 0;  // the cursor: pair it at the top of iteration it
  for (int64_t it = 0; it < total; ++it) {
    const int64_t h = h_next, i0 = qlo + tile_next * NQ;
    if (++tile_next == ntiles) tile_next = 0, ++h_next;  // pair it + 1
    const int buf = ASYNC ? int(it & 1) : 0;
    if constexpr (ASYNC) {
      cp_async_wait<0>();  // this thread's copies of pair it (and K/V, the first time)
      __syncthreads();     // everyone's; and everyone is done with pair it - 1
      if (it + 1 < total) load_qg(buf ^ 1, h_next, tile_next);
      cp_async_commit();
    } else {
      __syncthreads();  // previous Q/dO/dS/row reads done (and K/V loaded, the first time)
      load_qg(0, h, (i0 - qlo) / NQ);
    }
    float* Ls = LsB + buf * NQ;
    float* Dd = DdB + buf * NQ;
    bool full;  // block-uniform: every (query, key) pair of the tile pair is visible
    if (!docs) {
      // Rows see keys [0, T) (causal: [0, i + 1)); rows past T see nothing.
      full = LLAMA3_HOT(i0 + NQ <= a.T && (a.causal ? i0 + 1 >= j0 + BM : j0 + BM <= a.T), true);
      if (!stats_async) {
        for (int r = threadIdx.x; r < NQ; r += kMmaThreads) {
          const int64_t i = i0 + r;
          const bool in = i < a.T;
          Ls[r] = in ? lse[(b * a.H + h) * a.T + i] : 0.f;
          Dd[r] = in ? dsum[(b * a.H + h) * a.T + i] : 0.f;
        }
        __syncthreads();
      }
    } else {
      bool row_full = true;  // this thread's rows see every key of the tile
      for (int r = threadIdx.x; r < NQ; r += kMmaThreads) {
        const int64_t i = i0 + r;
        const bool in = i < a.T;
        if (!stats_async) {
          Ls[r] = in ? lse[(b * a.H + h) * a.T + i] : 0.f;
          Dd[r] = in ? dsum[(b * a.H + h) * a.T + i] : 0.f;
        }
        int64_t lo, hi;
        visible_keys(a, dstart, dend, b, i, lo, hi);
        Rlo[r] = int(lo), Rhi[r] = int(hi);
        row_full = row_full && lo <= j0 && j0 + BM <= hi;
      }
      full = __syncthreads_and(row_full) != 0;
    }
    const bf16* Qs = QGs + buf * 2 * NQ * DP;
    const bf16* Gs = Qs + NQ * DP;  // dO
    // S^T = K Q^T and dP^T = V dO^T for the warp's MT x 16 key rows x NQ queries; each Q and
    // dO B-fragment pair serves every m-tile.
    float st[MT][NN][4], dpt[MT][NN][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < NN; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[mt][n][e] = 0.f, dpt[mt][n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      uint32_t ka[MT][4], va[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ldsm_a<DP>(ka[mt], Ks, r0 + 16 * mt, kk, lane);
        ldsm_a<DP>(va[mt], Vs, r0 + 16 * mt, kk, lane);
      }
#pragma unroll
      for (int np = 0; np < NQ / 16; ++np) {
        uint32_t qb[4], gb[4];
        ldsm_b_rows<DP>(qb, Qs, np * 16, kk, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(st[mt][2 * np], ka[mt], qb[0], qb[1]);
          mma(st[mt][2 * np + 1], ka[mt], qb[2], qb[3]);
        }
        ldsm_b_rows<DP>(gb, Gs, np * 16, kk, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(dpt[mt][2 * np], va[mt], gb[0], gb[1]);
          mma(dpt[mt][2 * np + 1], va[mt], gb[2], gb[3]);
        }
      }
    }
    // P^T and dS^T in place (dS^T goes to shared memory below, for dQ).
    // Each query column qc serves this lane's two key rows per m-tile: its values are read
    // once.
#pragma unroll
    for (int n = 0; n < NN; ++n) {
      // (query columns qc, qc + 1: one 8-byte load per statistic)
      const float2 lq2 = *reinterpret_cast<const float2*>(Ls + n * 8 + 2 * t4);
      const float2 dsq2 = *reinterpret_cast<const float2*>(Dd + n * 8 + 2 * t4);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int qc = n * 8 + 2 * t4 + c;
        const float lq = (c ? lq2.y : lq2.x) * kLog2e, dsq = c ? dsq2.y : dsq2.x;
        const float dsq_s = dsq * a.scale;
        int lo = 0, hi = 0;
        if (!full) {
          if (docs) {
            lo = Rlo[qc], hi = Rhi[qc];
          } else {
            const int i = int(i0) + qc;
            hi = i < a.T ? (a.causal ? i + 1 : int(a.T)) : 0;
          }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int jA = int(j0) + r0 + 16 * mt + g, jB = jA + 8;  // this lane's key rows
          const bool okA = full || (jA >= lo && jA < hi), okB = full || (jB >= lo && jB < hi);
          const float pA = okA ? exp2_ftz(st[mt][n][c] * sl2 - lq) : 0.f;
          const float pB = okB ? exp2_ftz(st[mt][n][c + 2] * sl2 - lq) : 0.f;
          st[mt][n][c] = pA, st[mt][n][c + 2] = pB;
          // dS = P (dP - D) scale, as P (dP scale - D scale): one FFMA and one FMUL. (Not in
          // the two-m-tile candidate, at its 255-register cap: ptxas then spills 56 bytes
          // against 20.)
          if constexpr (MT == 1) {
            dpt[mt][n][c] = pA * fmaf(dpt[mt][n][c], a.scale, -dsq_s);
            dpt[mt][n][c + 2] = pB * fmaf(dpt[mt][n][c + 2], a.scale, -dsq_s);
          } else {
            dpt[mt][n][c] = pA * (dpt[mt][n][c] - dsq) * a.scale;
            dpt[mt][n][c + 2] = pB * (dpt[mt][n][c + 2] - dsq) * a.scale;
          }
        }
      }
    }
    // dS goes to shared memory key-major from its packed A fragments below (the dK MMA's
    // operand), so no value is converted or stored twice: four 4-byte stores per fragment, or
    // (STSM, sm_90; untimed) one stmatrix of its four 8x8 matrices.
    constexpr bool kStsm = STSM && kHaveStmatrix;
    // dV += P^T dO, dK += dS^T Q (k = the NQ queries of the tile); each dO and Q B-fragment
    // pair serves every m-tile.
#pragma unroll
    for (int kq = 0; kq < NQ / 16; ++kq) {
      uint32_t pa[MT][4], da[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        c_to_a(pa[mt], st[mt], kq), c_to_a(da[mt], dpt[mt], kq);
        // da = dS^T (keys r0 + 16 mt + {0..7, 8..15} x queries 16 kq + {0..7, 8..15}) as
        // matrices (+0, +0) = da[0], (+8, +0) = da[1], (+0, +8) = da[2], (+8, +8) = da[3].
        bf16* sk = Ss + (r0 + 16 * mt) * SQ + 16 * kq;
        if constexpr (kStsm) {
          const int mi = lane >> 3;
          stsm_x4(sk + ((lane & 7) + 8 * (mi & 1)) * SQ + 8 * (mi >> 1), da[mt]);
        } else {
          bf16* p = sk + g * SQ + 2 * t4;
          st32(p, da[mt][0]), st32(p + 8 * SQ, da[mt][1]);
          st32(p + 8, da[mt][2]), st32(p + 8 * SQ + 8, da[mt][3]);
        }
      }
#pragma unroll
      for (int dn = 0; dn < DMAX / 16; ++dn) {
        uint32_t gb[4], qb[4];
        ldsm_b_cols<DP>(gb, Gs, kq, dn, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(dva[mt][2 * dn], pa[mt], gb[0], gb[1]);
          mma(dva[mt][2 * dn + 1], pa[mt], gb[2], gb[3]);
        }
        ldsm_b_cols<DP>(qb, Qs, kq, dn, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(dka[mt][2 * dn], da[mt], qb[0], qb[1]);
          mma(dka[mt][2 * dn + 1], da[mt], qb[2], qb[3]);
        }
      }
    }
    __syncthreads();  // every warp's dS columns are in Ss
    // dQ (query rows 16 qm .., head-dim columns 8 nd0 ..) = dS (16 x BM keys) K (BM keys x
    // the warp's columns), added to dq_acc.
    float dq[NDW][4];
#pragma unroll
    for (int n = 0; n < NDW; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t sa[4];
      ldsm_a_t<SQ>(sa, Ss, 16 * qm, kk, lane);
#pragma unroll
      for (int dn = 0; dn < NDW / 2; ++dn) {
        uint32_t kb[4];
        ldsm_b_cols<DP>(kb, Ks, kk, nd0 / 2 + dn, lane);
        mma(dq[2 * dn], sa, kb[0], kb[1]);
        mma(dq[2 * dn + 1], sa, kb[2], kb[3]);
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t i = i0 + 16 * qm + g + 8 * half;
      if (i >= a.T) continue;
      float* dqr = dq_acc + ((b * a.T + i) * a.H + h) * a.D;
      if (whole_rows) {
        float* p = dqr + nd0 * 8 + 2 * t4;
#pragma unroll
        for (int n = 0; n < NDW; ++n) add2(p + n * 8, dq[n][2 * half], dq[n][2 * half + 1]);
        continue;
      }
#pragma unroll
      for (int n = 0; n < NDW; ++n) {
        const int64_t d = (nd0 + n) * 8 + 2 * t4;
        const float x = dq[n][2 * half], y = dq[n][2 * half + 1];
        if (vec2 && d + 1 < a.D) {
          add2(dqr + d, x, y);
        } else {
          if (d < a.D) atomicAdd(dqr + d, x);
          if (d + 1 < a.D) atomicAdd(dqr + d + 1, y);
        }
      }
    }
    if constexpr (!ASYNC) __syncthreads();  // (ASYNC: the barrier opens the next iteration)
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t j = j0 + r0 + 16 * mt + g + 8 * half;
      if (j >= a.Tk) continue;
      // Key row j of dK/dV: the partials of query head hq0, or the outputs of head kvh.
      auto store_rows = [&](auto* krow, auto* vrow) {
#pragma unroll
        for (int n = 0; n < ND; ++n) {
          store_pair(krow, n * 8 + 2 * t4, a.D, dka[mt][n][2 * half], dka[mt][n][2 * half + 1]);
          store_pair(vrow, n * 8 + 2 * t4, a.D, dva[mt][n][2 * half], dva[mt][n][2 * half + 1]);
        }
      };
      if (split) {
        const int64_t at = ((b * a.Tk + j) * a.H + hq0) * a.D;
        if (std::is_same_v<TO, bf16> && a.gqa_part_bf16)
          store_rows(static_cast<bf16*>(dk_part) + at, static_cast<bf16*>(dv_part) + at);
        else
          store_rows(static_cast<float*>(dk_part) + at, static_cast<float*>(dv_part) + at);
      } else
        store_rows(dk + ((b * a.Tk + j) * a.Hkv + kvh) * a.D,
                   dv + ((b * a.Tk + j) * a.Hkv + kvh) * a.D);
    }
  }
}

// dk[b, j, kvh, :] = sum over the group's query heads h of part[b, j, h, :] (and dv), in f32.
// Output row r = (b * Tk + j) * Hkv + kvh reads partial rows r * group + g (H = Hkv * group).
// I: the index type, 32-bit when every index fits (one division per element by a runtime D:
// inline in 32 bits, a call of a ~70-instruction routine in 64). PT: the partials' type.
template <typename TO, typename I, typename PT>
__global__ void attn_gqa_reduce_kernel(const PT* dk_part, const PT* dv_part, TO* dk, TO* dv,
                                       AttnShape a) {
  const I group = I(a.H / a.Hkv), D = I(a.D);
  const I n = I(a.B * a.Tk * a.Hkv * a.D);
  for (I idx = I(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += I(gridDim.x) * blockDim.x) {
    const I row = idx / D, d = idx - row * D;
    const I base = row * group * D + d;
    float sk = 0.f, sv = 0.f;
    for (I g = 0; g < group; ++g)
      sk += to_f32(dk_part[base + g * D]), sv += to_f32(dv_part[base + g * D]);
    dk[idx] = from_f32<TO>(sk), dv[idx] = from_f32<TO>(sv);
  }
}

// The same four columns a thread (D % 4 == 0, partials aligned to four elements, outputs
// too): 16-byte (f32) or 8-byte (bf16) loads of the partials and 8- or 16-byte stores, one
// index computation per four columns.
template <typename TO, typename I, typename PT>
__global__ void attn_gqa_reduce4_kernel(const PT* dk_part, const PT* dv_part, TO* dk, TO* dv,
                                        AttnShape a) {
  const I group = I(a.H / a.Hkv), D = I(a.D);
  const I n4 = I(a.B * a.Tk * a.Hkv * a.D) / 4;
  for (I q = I(blockIdx.x) * blockDim.x + threadIdx.x; q < n4; q += I(gridDim.x) * blockDim.x) {
    const I idx = 4 * q, row = idx / D, d = idx - row * D;
    const I base = row * group * D + d;
    float sk[4] = {0.f, 0.f, 0.f, 0.f}, sv[4] = {0.f, 0.f, 0.f, 0.f};
    for (I g = 0; g < group; ++g) {
      float k4[4], v4[4];
      load4(dk_part + base + g * D, k4), load4(dv_part + base + g * D, v4);
#pragma unroll
      for (int c = 0; c < 4; ++c) sk[c] += k4[c], sv[c] += v4[c];
    }
    store4(dk + idx, sk), store4(dv + idx, sv);
  }
}

template <typename F>
cudaError_t dispatch_dmax(int64_t D, F&& f) {
  if (D <= 64) return f.template operator()<64>();
  if (D <= 128) return f.template operator()<128>();
  return cudaErrorInvalidValue;
}

// cp.async needs D == DMAX (whole 16-byte chunks per row) and 16-byte aligned bases.
bool async_ok(int64_t D, int dmax, std::initializer_list<const void*> ps) {
  if (D != dmax) return false;
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

size_t attention_mma_smem_bytes(int64_t D, bool backward) {
  if (D <= 64)  // (the largest of the backward's tile layouts at head dim 64)
    return backward ? std::max(BwdLayout<64, 1, kN>::bytes, BwdLayout<64, 2, 32>::bytes)
                    : MmaLayout<64>::fwd2;
  return backward ? BwdLayout<128, 1, kN>::bytes : MmaLayout<128>::fwd;
}

cudaError_t attention_forward_mma(const void* q, const void* k, const void* v,
                                  const int32_t* dstart, const int32_t* dend, void* out, void* lse,
                                  KT t, const AttnShape& shape, cudaStream_t s) {
  AttnShape a = shape;
  if (a.Tk == 0) a.Tk = a.T;
  if (a.B == 0 || a.T == 0 || a.H == 0) return cudaSuccess;
  return dispatch_ft(t, [&]<typename TO>() {
    return dispatch_dmax(a.D, [&]<int DMAX>() {
      const bool async = async_ok(a.D, DMAX, {q, k, v});
      // Two m-tiles per warp at head dim 64 (registers allow it there only), unless
      // a.fwd_one_mtile (A/B timing).
      const bool two = DMAX == 64 && !a.fwd_one_mtile;
      auto launch = [&]<bool ASYNC, int MT>() {
        auto kern = attn_fwd_mma_kernel<TO, DMAX, ASYNC, MT>;
        const size_t sm = MT == 2 ? MmaLayout<DMAX>::fwd2 : MmaLayout<DMAX>::fwd;
        cudaError_t e =
            cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sm));
        if (e != cudaSuccess) return e;
        const int64_t bm = kM * MT;
        dim3 grid(unsigned(a.H), unsigned((a.T + bm - 1) / bm), unsigned(a.B));
        launch_kernel(kern, grid, kMmaThreads, sm, s, static_cast<const bf16*>(q),
                      static_cast<const bf16*>(k), static_cast<const bf16*>(v), dstart, dend,
                      static_cast<TO*>(out), static_cast<float*>(lse), a);
        return cudaGetLastError();
      };
      if constexpr (DMAX == 64) {
        if (two)
          return async ? launch.template operator()<true, 2>()
                       : launch.template operator()<false, 2>();
      }
      return async ? launch.template operator()<true, 1>() : launch.template operator()<false, 1>();
    });
  });
}

cudaError_t attention_backward_mma(const void* dout, const void* q, const void* k, const void* v,
                                   const void* lse, const float* dsum, const int32_t* dstart,
                                   const int32_t* dend, void* dk, void* dv, float* dq_acc,
                                   void* dkv_part, KT t, const AttnShape& shape, cudaStream_t s) {
  AttnShape a = shape;
  if (a.Tk == 0) a.Tk = a.T;
  if (a.B == 0 || a.T == 0 || a.H == 0) return cudaSuccess;
  // Partials only pay when a group has several query heads.
  void* dk_part = a.H > a.Hkv ? dkv_part : nullptr;
  return dispatch_ft(t, [&]<typename TO>() {
    if constexpr (!std::is_same_v<TO, bf16>) a.gqa_part_bf16 = false;  // (f32 outputs: f32 ones)
    const size_t part_size = a.gqa_part_bf16 ? sizeof(bf16) : sizeof(float);
    void* dv_part = dk_part
                        ? static_cast<char*>(dk_part) + size_t(a.B * a.Tk * a.H * a.D) * part_size
                        : nullptr;
    return dispatch_dmax(a.D, [&]<int DMAX>() {
      const bool async = async_ok(a.D, DMAX, {dout, q, k, v});
      auto launch = [&]<bool ASYNC, int MT, int NQ, bool STSM>() {
        auto kern = attn_bwd_mma_kernel<TO, DMAX, ASYNC, MT, NQ, STSM>;
        const size_t sm = BwdLayout<DMAX, MT, NQ>::bytes;
        cudaError_t e =
            cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sm));
        if (e != cudaSuccess) return e;
        const int64_t bm = kM * MT;
        dim3 grid(unsigned(dk_part ? a.H : a.Hkv), unsigned((a.Tk + bm - 1) / bm), unsigned(a.B));
        launch_kernel(kern, grid, kMmaThreads, sm, s, static_cast<const bf16*>(dout),
                      static_cast<const bf16*>(q), static_cast<const bf16*>(k),
                      static_cast<const bf16*>(v), static_cast<const float*>(lse), dsum, dstart,
                      dend, static_cast<TO*>(dk), static_cast<TO*>(dv), dk_part, dv_part, dq_acc,
                      a);
        return cudaGetLastError();
      };
      cudaError_t e = cudaSuccess;
      // dS^T by 4-byte stores; by stmatrix only in the (2, 32) tiles when a.bwd_stmatrix.
      // Two key m-tiles exist at head dim <= 64 only, where registers allow them.
      bool two = false;
      if constexpr (DMAX == 64) {
        two = !a.bwd_one_mtile;
        if (two && a.bwd_stmatrix)
          e = async ? launch.template operator()<true, 2, 32, true>()
                    : launch.template operator()<false, 2, 32, true>();
        else if (two)
          e = async ? launch.template operator()<true, 2, 32, false>()
                    : launch.template operator()<false, 2, 32, false>();
      }
      if (!two)
        e = async ? launch.template operator()<true, 1, kN, false>()
                  : launch.template operator()<false, 1, kN, false>();
      if (e != cudaSuccess || !dk_part) return e;
      const int64_t n = a.B * a.Tk * a.Hkv * a.D;
      // (32-bit indices when the largest, into the partials, fits: n * group + the grid)
      const bool i32 = n * (a.H / a.Hkv) < (int64_t(1) << 31) - int64_t(132 * 16 * 256 * 4);
      const auto al = [](const void* p, size_t b) {
        return reinterpret_cast<uintptr_t>(p) % b == 0;
      };
      auto reduce = [&]<typename PT>() {
        const auto* kp = static_cast<const PT*>(dk_part);
        const auto* vp = static_cast<const PT*>(dv_part);
        auto* ko = static_cast<TO*>(dk);
        auto* vo = static_cast<TO*>(dv);
        if (a.D % 4 == 0 && al(kp, 4 * sizeof(PT)) && al(vp, 4 * sizeof(PT)) &&
            al(dk, 4 * sizeof(TO)) && al(dv, 4 * sizeof(TO))) {
          if (i32)
            launch_kernel(attn_gqa_reduce4_kernel<TO, uint32_t, PT>, grid_for(n / 4, 256), 256, 0,
                          s, kp, vp, ko, vo, a);
          else
            launch_kernel(attn_gqa_reduce4_kernel<TO, int64_t, PT>, grid_for(n / 4, 256), 256, 0, s,
                          kp, vp, ko, vo, a);
        } else if (i32) {
          launch_kernel(attn_gqa_reduce_kernel<TO, uint32_t, PT>, grid_for(n, 256), 256, 0, s, kp,
                        vp, ko, vo, a);
        } else {
          launch_kernel(attn_gqa_reduce_kernel<TO, int64_t, PT>, grid_for(n, 256), 256, 0, s, kp,
                        vp, ko, vo, a);
        }
      };
      // (bf16 partials only with bf16 outputs: no f32-output kernel reads bf16 ones)
      if constexpr (std::is_same_v<TO, bf16>) {
        if (a.gqa_part_bf16) {
          reduce.template operator()<bf16>();
          return cudaGetLastError();
        }
      }
      reduce.template operator()<float>();
      return cudaGetLastError();
    });
  });
}

LLAMA3_CUDA_NS_END  // llama3::cuda
