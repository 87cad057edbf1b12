// GEMM on the CPU through oneDNN 2.6's matmul primitive (v2 API: matmul::desc). Primitives
// are cached by shape/layout, so a training step pays their creation once.
#include <dnnl.hpp>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "runtime/cpu/cpu_backend.h"
#include "runtime/cpu/vec.h"

namespace llama3 {

namespace {

using dnnl::memory;

struct Engine {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{eng};
};

Engine& engine() {
  static Engine* e = new Engine();
  return *e;
}

using Key =
    std::tuple<int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float>;

dnnl::matmul& primitive(memory::data_type dt, Trans ta, Trans tb, int64_t m, int64_t n, int64_t k,
                        int64_t lda, int64_t ldb, int64_t ldc, float alpha, float beta) {
  static std::mutex mu;
  static std::map<Key, dnnl::matmul>* cache = new std::map<Key, dnnl::matmul>();
  Key key{int(dt), int(ta), int(tb), m, n, k, lda, ldb, ldc, alpha, beta};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  memory::dims a_strides = ta == Trans::N ? memory::dims{lda, 1} : memory::dims{1, lda};
  memory::dims b_strides = tb == Trans::N ? memory::dims{ldb, 1} : memory::dims{1, ldb};
  memory::desc a_md({m, k}, dt, a_strides);
  memory::desc b_md({k, n}, dt, b_strides);
  memory::desc c_md({m, n}, memory::data_type::f32, memory::dims{ldc, 1});
  dnnl::primitive_attr attr;
  if (alpha != 1.f) attr.set_output_scales(0, {alpha});
  if (beta != 0.f) {
    dnnl::post_ops po;
    po.append_sum(beta);
    attr.set_post_ops(po);
  }
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, engine().eng);
  return cache->emplace(key, dnnl::matmul(pd)).first->second;
}

void run(memory::data_type dt, Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
         const void* a, int64_t lda, const void* b, int64_t ldb, float beta, float* c,
         int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto& prim = primitive(dt, ta, tb, m, n, k, lda, ldb, ldc, alpha, beta);
  auto& e = engine();
  memory::dims a_strides = ta == Trans::N ? memory::dims{lda, 1} : memory::dims{1, lda};
  memory::dims b_strides = tb == Trans::N ? memory::dims{ldb, 1} : memory::dims{1, ldb};
  memory am(memory::desc({m, k}, dt, a_strides), e.eng, const_cast<void*>(a));
  memory bm(memory::desc({k, n}, dt, b_strides), e.eng, const_cast<void*>(b));
  memory cm(memory::desc({m, n}, memory::data_type::f32, memory::dims{ldc, 1}), e.eng, c);
  prim.execute(e.stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
  e.stream.wait();
}

}  // namespace

#if defined(__AVX512F__)
namespace {

// C (m x n) = A (m x k) B^T for B stored (n, k) row-major (a weight), m <= kSkinnyRows: the
// decode-step shape (a few tokens times every weight). oneDNN's matmul has a per-call cost
// that dominates a handful of rows, and for bf16 it repacks all of B into pairs-of-k layout
// on every call; here each thread streams its own rows of B once, in place, as dot products
// along k (f32: FMA, 16 per instruction; bf16: vdpbf16ps, 32 products per instruction, f32
// accumulation), reduced across lanes at the end (cpu::reduce16 / reduce8).

// Element policies: how many k one register holds, a masked load, the multiply-accumulate.
struct F32Lanes {
  using T = float;
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kStep = 16;
  static V load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 dot(__m512 acc, V a, V b) { return _mm512_fmadd_ps(a, b, acc); }
};
#if defined(__AVX512BF16__)
struct Bf16Lanes {
  using T = bf16;
  using V = __m512bh;
  using Mask = __mmask32;
  static constexpr int64_t kStep = 32;
  static V load(Mask m, const bf16* p) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
  static __m512 dot(__m512 acc, V a, V b) { return _mm512_dpbf16_ps(acc, a, b); }
};
#endif

template <class L>
typename L::Mask lanes_left(int64_t left) {
  return left >= L::kStep ? typename L::Mask(~0u) : typename L::Mask((uint64_t(1) << left) - 1);
}

// How far ahead (in rows of B, a multiple of 8) the kernels also prefetch into L2: about
// 128 KiB. One block ahead into L1 alone leaves each block's first pass waiting on DRAM; in
// a microbenchmark of the 125M decode shapes (bf16, 16 rows, 2 threads) the far L2 prefetch
// raised ~220 to ~260 GFLOP/s, and 1 row from ~35 to ~43 GB/s. Prefetches past the end of B
// are harmless hints.
template <typename T>
int64_t far_rows(int64_t ldb) {
  return std::max<int64_t>(8, (int64_t(128 << 10) / (ldb * int64_t(sizeof(T)))) / 8 * 8);
}

// 4 rows of A x 4 rows of B. Rows past the end of A or B (a partial block) re-read the
// block's first row; their sums are not stored. The first row group prefetches the next
// block of B (the hardware prefetcher does not keep up with 4 strided streams; prefetches
// past the end of B are harmless hints); later groups find this block in L1. The 16 accumulators
// are named variables: GCC keeps an accumulator array on the stack, a store per product.
template <class L, typename T = typename L::T>
void skinny_4x4(int64_t k, const T* a, int64_t lda, int64_t ma, const T* b, int64_t ldb, int64_t nb,
                float* c, int64_t ldc, bool prefetch) {
  const T *a0 = a, *a1 = a + (ma > 1 ? 1 : 0) * lda, *a2 = a + (ma > 2 ? 2 : 0) * lda,
          *a3 = a + (ma > 3 ? 3 : 0) * lda;
  const T *b0 = b, *b1 = b + (nb > 1 ? 1 : 0) * ldb, *b2 = b + (nb > 2 ? 2 : 0) * ldb,
          *b3 = b + (nb > 3 ? 3 : 0) * ldb;
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00,
         c12 = c00, c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00,
         c32 = c00, c33 = c00;
  for (int64_t p = 0; p < k; p += L::kStep) {
    const auto m = lanes_left<L>(k - p);
    if (prefetch) {  // the next block's rows (the next 4 x k of B), one line per row and step
      const char* nx = reinterpret_cast<const char*>(b + 4 * ldb + p);
      const char* far = reinterpret_cast<const char*>(b + far_rows<T>(ldb) * ldb + p);
      for (int q = 0; q < 4; ++q) {
        _mm_prefetch(nx + q * ldb * int64_t(sizeof(T)), _MM_HINT_T0);
        _mm_prefetch(far + q * ldb * int64_t(sizeof(T)), _MM_HINT_T1);
      }
    }
    const auto x0 = L::load(m, b0 + p), x1 = L::load(m, b1 + p), x2 = L::load(m, b2 + p),
               x3 = L::load(m, b3 + p);
    auto y = L::load(m, a0 + p);
    c00 = L::dot(c00, y, x0), c01 = L::dot(c01, y, x1), c02 = L::dot(c02, y, x2),
    c03 = L::dot(c03, y, x3);
    y = L::load(m, a1 + p);
    c10 = L::dot(c10, y, x0), c11 = L::dot(c11, y, x1), c12 = L::dot(c12, y, x2),
    c13 = L::dot(c13, y, x3);
    y = L::load(m, a2 + p);
    c20 = L::dot(c20, y, x0), c21 = L::dot(c21, y, x1), c22 = L::dot(c22, y, x2),
    c23 = L::dot(c23, y, x3);
    y = L::load(m, a3 + p);
    c30 = L::dot(c30, y, x0), c31 = L::dot(c31, y, x1), c32 = L::dot(c32, y, x2),
    c33 = L::dot(c33, y, x3);
  }
  // One reduction tree for all 16 sums; lane r of the result holds row r's 4 outputs.
  const __m512 s =
      cpu::reduce16(c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33);
  const __mmask8 cols = __mmask8((1u << nb) - 1);
  alignas(64) float out[16];
  _mm512_store_ps(out, s);
  for (int64_t r = 0; r < ma; ++r) _mm_mask_storeu_ps(c + r * ldc, cols, _mm_load_ps(out + 4 * r));
}

// 1 row of A x 8 rows of B (a single decoding sequence: bandwidth-bound on B).
template <class L, typename T = typename L::T>
void skinny_1x8(int64_t k, const T* a, const T* b, int64_t ldb, int64_t nb, float* c) {
  const T* br[8];
  for (int q = 0; q < 8; ++q) br[q] = b + (q < nb ? q : 0) * ldb;
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  for (int64_t p = 0; p < k; p += L::kStep) {
    const auto m = lanes_left<L>(k - p);
    const char* nx = reinterpret_cast<const char*>(b + 8 * ldb + p);  // the next block's rows
    const char* far = reinterpret_cast<const char*>(b + far_rows<T>(ldb) * ldb + p);
    for (int q = 0; q < 8; ++q) {
      _mm_prefetch(nx + q * ldb * int64_t(sizeof(T)), _MM_HINT_T0);
      _mm_prefetch(far + q * ldb * int64_t(sizeof(T)), _MM_HINT_T1);
    }
    const auto y = L::load(m, a + p);
    c0 = L::dot(c0, y, L::load(m, br[0] + p)), c1 = L::dot(c1, y, L::load(m, br[1] + p));
    c2 = L::dot(c2, y, L::load(m, br[2] + p)), c3 = L::dot(c3, y, L::load(m, br[3] + p));
    c4 = L::dot(c4, y, L::load(m, br[4] + p)), c5 = L::dot(c5, y, L::load(m, br[5] + p));
    c6 = L::dot(c6, y, L::load(m, br[6] + p)), c7 = L::dot(c7, y, L::load(m, br[7] + p));
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, cpu::reduce8(c0, c1, c2, c3, c4, c5, c6, c7));
  for (int64_t q = 0; q < nb; ++q) c[q] = out[q];
}

// Up to 16 rows (decode batches) these kernels beat oneDNN (125M decode, 2 threads: bf16
// 1.6-1.8x at 1 row, 1.2x at 4 and 8; f32 1.2-1.3x at 1 and 8 rows, 1.15x at 16).
constexpr int64_t kSkinnyRows = 16;

bool skinny_shape(Trans ta, Trans tb, int64_t m, int64_t n, float alpha, float beta) {
  return m > 0 && m <= kSkinnyRows && n > 0 && ta == Trans::N && tb == Trans::T && alpha == 1.f &&
         beta == 0.f;
}

template <class L, typename T = typename L::T>
void skinny_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                 float* c, int64_t ldc) {
  const int64_t nr = m == 1 ? 8 : 4, blocks = (n + nr - 1) / nr;
#pragma omp parallel for schedule(static) if (n * k > 65536)
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t n0 = j * nr, nb = std::min(nr, n - n0);
    if (m == 1) {
      skinny_1x8<L>(k, a, b + n0 * ldb, ldb, nb, c + n0);
      continue;
    }
    for (int64_t i = 0; i < m; i += 4)
      skinny_4x4<L>(k, a + i * lda, lda, std::min<int64_t>(4, m - i), b + n0 * ldb, ldb, nb,
                    c + i * ldc + n0, ldc, i == 0);
  }
}

}  // namespace
#endif

void cpu_gemm_f32(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#if defined(__AVX512F__)
  if (skinny_shape(ta, tb, m, n, alpha, beta))
    return skinny_gemm<F32Lanes>(m, n, k, a, lda, b, ldb, c, ldc);
#endif
  run(memory::data_type::f32, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cpu_gemm_bf16(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* a,
                   int64_t lda, const bf16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#if defined(__AVX512BF16__)
  if (skinny_shape(ta, tb, m, n, alpha, beta))
    return skinny_gemm<Bf16Lanes>(m, n, k, a, lda, b, ldb, c, ldc);
#endif
  run(memory::data_type::bf16, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---- bf16 weights packed in panels (decode steps) ----
//
// Panel j holds B's rows 16j..16j+15 (16 output features); within it, k runs in pairs, each
// pair one 64-byte vector whose lane c is (B[16j + c][2p], B[16j + c][2p + 1]). A row pair of
// A broadcast to all lanes then feeds vdpbf16ps straight into 16 outputs: no horizontal sums
// (the dot-product kernels above spend a third of a k = 768 block reducing lanes), and each
// panel is one contiguous stream for the hardware prefetcher. n is padded to a multiple of
// kPackedCols, k to even, with zeros.

namespace {
constexpr int64_t kPanel = 16;       // outputs per panel (one f32 vector)
constexpr int64_t kPackedCols = 64;  // columns per unit of work: 4 panels
int64_t packed_pairs(int64_t k) {
  return (k + 1) / 2;
}
int64_t packed_cols(int64_t n) {
  return (n + kPackedCols - 1) / kPackedCols * kPackedCols;
}
}  // namespace

int64_t cpu_packed_bf16_elems(int64_t n, int64_t k) {
  return packed_cols(n) * packed_pairs(k) * 2;
}

void cpu_pack_bf16_panels(const bf16* b, int64_t n, int64_t k, int64_t ldb, bf16* out) {
  const int64_t kp = packed_pairs(k), panels = packed_cols(n) / kPanel;
#pragma omp parallel for schedule(static) if (n * k > 65536)
  for (int64_t j = 0; j < panels; ++j) {
    bf16* o = out + j * kp * 2 * kPanel;
    for (int64_t p = 0; p < kp; ++p)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t row = j * kPanel + c, col = 2 * p + e;
          o[(p * kPanel + c) * 2 + e] = row < n && col < k ? b[row * ldb + col] : bf16{0};
        }
  }
}

#if defined(__AVX512BF16__)
namespace {
// MR rows of A x NP panels. `pf` (nullable) is read with the panels' offsets and prefetched
// into L2 one line per panel and k pair (see cpu_gemm_bf16_packed). The last k pair of an odd
// k takes A's last element with a zero beside it (B's padding is zero too, but a NaN or Inf
// past A's row would still poison 0 x).
template <int MR, int NP>
void packed_block(int64_t k, const bf16* a, int64_t lda, const bf16* pb, int64_t pstride, float* c,
                  int64_t ldc, int64_t cols, const bf16* pf) {
  __m512 acc[MR][NP];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t full = k / 2;
  auto step = [&](int64_t p, auto pair_of_row) {
    __m512bh bv[NP];
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) {
      bv[j] = (__m512bh)_mm512_loadu_si512(pb + j * pstride + p * 2 * kPanel);
      if (pf)
        _mm_prefetch(reinterpret_cast<const char*>(pf + j * pstride + p * 2 * kPanel), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair_of_row(i));
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  };
  for (int64_t p = 0; p < full; ++p)
    step(p, [&](int i) {
      int32_t v;
      std::memcpy(&v, a + i * lda + 2 * p, 4);
      return v;
    });
  if (k % 2) step(full, [&](int i) { return int32_t(a[i * lda + k - 1].bits); });
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) {
      const int64_t left = cols - j * kPanel;
      if (left >= kPanel)
        _mm512_storeu_ps(c + i * ldc + j * kPanel, acc[i][j]);
      else if (left > 0)
        _mm512_mask_storeu_ps(c + i * ldc + j * kPanel, __mmask16((1u << left) - 1), acc[i][j]);
    }
}

// MR rows of one 64-column unit: up to 4 rows take all 4 panels at once, 5-8 rows two panels
// at a time (at most 16 accumulators either way).
template <int MR>
void packed_rows(int64_t k, const bf16* a, int64_t lda, const bf16* pb, int64_t pstride, float* c,
                 int64_t ldc, int64_t cols, const bf16* pf) {
  if constexpr (MR <= 4) {
    packed_block<MR, 4>(k, a, lda, pb, pstride, c, ldc, cols, pf);
  } else {
    packed_block<MR, 2>(k, a, lda, pb, pstride, c, ldc, cols, pf);
    if (cols > 2 * kPanel)
      packed_block<MR, 2>(k, a, lda, pb + 2 * pstride, pstride, c + 2 * kPanel, ldc,
                          cols - 2 * kPanel, pf ? pf + 2 * pstride : nullptr);
  }
}
}  // namespace
#endif

void cpu_gemm_bf16_packed(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda,
                          const bf16* packed, float* c, int64_t ldc) {
  const int64_t pstride = packed_pairs(k) * 2 * kPanel, units = packed_cols(n) / kPackedCols;
#pragma omp parallel for schedule(static) if (m * n * k > 262144)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t col0 = u * kPackedCols, cols = std::min(kPackedCols, n - col0);
    const bf16* pb = packed + u * (kPackedCols / kPanel) * pstride;
#if defined(__AVX512BF16__)
    // Row groups of 8 (then the rest): the unit's panels stay in L1/L2 across groups. With
    // more than 4 rows a group computes long enough per line of B for DRAM latency to show,
    // so B is prefetched into L2: the first group fetches its own panels 4 KiB (64 k pairs)
    // ahead, and a last group, which finds its panels in L2 already, fetches the next
    // unit's. (At 1-4 rows the prefetches did not help: the GEMM is bandwidth-bound there.)
    for (int64_t i = 0; i < m; i += 8) {
      const int64_t mr = std::min<int64_t>(8, m - i);
      const bf16* ai = a + i * lda;
      float* ci = c + i * ldc + col0;
      const bf16* pf = mr <= 4      ? nullptr
                       : i == 0     ? pb + 2048
                       : i + 8 >= m ? pb + (kPackedCols / kPanel) * pstride
                                    : nullptr;
      using Rows = void (*)(int64_t, const bf16*, int64_t, const bf16*, int64_t, float*, int64_t,
                            int64_t, const bf16*);
      static constexpr Rows kRows[8] = {packed_rows<1>, packed_rows<2>, packed_rows<3>,
                                        packed_rows<4>, packed_rows<5>, packed_rows<6>,
                                        packed_rows<7>, packed_rows<8>};
      kRows[mr - 1](k, ai, lda, pb, pstride, ci, ldc, cols, pf);
    }
#else
    // Portable builds: the same products in the same layout, one at a time.
    for (int64_t i = 0; i < m; ++i)
      for (int64_t q = 0; q < cols; ++q) {
        const bf16* panel = pb + (q / kPanel) * pstride;
        float s = 0;
        for (int64_t p = 0; p < k; ++p)
          s += bf16_bits_to_f32(a[i * lda + p].bits) *
               bf16_bits_to_f32(panel[((p / 2) * kPanel + q % kPanel) * 2 + p % 2].bits);
        c[i * ldc + col0 + q] = s;
      }
#endif
  }
}

}  // namespace llama3

// ---- tensor-level dispatch ----
#include "runtime/cpu/kernels.h"

namespace llama3::cpu {

namespace {

int64_t row_stride(const Tensor& t, const char* name) {
  const int n = t.dim();
  LLAMA3_CHECK(t.strides()[n - 1] == 1 || t.size(-1) == 1,
               "gemm: {} must have unit stride in its last dim, got {}", name, t.str());
  return t.size(-2) == 1 ? std::max<int64_t>(t.size(-1), 1) : t.strides()[n - 2];
}

template <typename T>
void gemm_reference(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                    int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
#pragma omp parallel for
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      T s = 0;
      for (int64_t p = 0; p < k; ++p) {
        T av = ta == Trans::N ? a[i * lda + p] : a[p * lda + i];
        T bv = tb == Trans::N ? b[p * ldb + j] : b[j * ldb + p];
        s += av * bv;
      }
      c[i * ldc + j] = alpha * s + (beta == T(0) ? T(0) : beta * c[i * ldc + j]);
    }
}

}  // namespace

void gemm(const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, float alpha,
          float beta) {
  LLAMA3_CHECK(a.dim() == c.dim() && b.dim() == c.dim() && (c.dim() == 2 || c.dim() == 3),
               "gemm: a {}, b {}, c {} must all be 2D or 3D", a.str(), b.str(), c.str());
  if (c.dim() == 3) {
    LLAMA3_CHECK(a.size(0) == c.size(0) && b.size(0) == c.size(0),
                 "gemm: batch of a {}, b {}, c {}", a.str(), b.str(), c.str());
    for (int64_t i = 0; i < c.size(0); ++i) {
      Tensor ci = c.narrow(0, i, 1).view({c.size(1), c.size(2)});
      gemm(a.narrow(0, i, 1).contiguous().view({a.size(1), a.size(2)}), ta,
           b.narrow(0, i, 1).contiguous().view({b.size(1), b.size(2)}), tb, ci, alpha, beta);
    }
    return;
  }
  const int64_t m = ta == Trans::N ? a.size(0) : a.size(1);
  const int64_t k = ta == Trans::N ? a.size(1) : a.size(0);
  const int64_t kb = tb == Trans::N ? b.size(0) : b.size(1);
  const int64_t n = tb == Trans::N ? b.size(1) : b.size(0);
  LLAMA3_CHECK(k == kb && c.size(0) == m && c.size(1) == n,
               "gemm: op(a) is ({}, {}), op(b) is ({}, {}), c is {}", m, k, kb, n, c.str());
  const int64_t lda = row_stride(a, "a"), ldb = row_stride(b, "b"), ldc = row_stride(c, "c");
  if (a.dtype() == DType::f32 && b.dtype() == DType::f32 && c.dtype() == DType::f32) {
    cpu_gemm_f32(ta, tb, m, n, k, alpha, a.data<float>(), lda, b.data<float>(), ldb, beta,
                 c.data<float>(), ldc);
  } else if (a.dtype() == DType::bf16 && b.dtype() == DType::bf16 && c.dtype() == DType::f32) {
    cpu_gemm_bf16(ta, tb, m, n, k, alpha, static_cast<const bf16*>(a.data_ptr()), lda,
                  static_cast<const bf16*>(b.data_ptr()), ldb, beta, c.data<float>(), ldc);
  } else if (a.dtype() == DType::bf16 && b.dtype() == DType::bf16 && c.dtype() == DType::bf16) {
    // bf16 output (f32 accumulation, rounded once): through an f32 copy of c, since the
    // kernels accumulate in f32 rows.
    Tensor c32 = beta == 0.f ? Tensor::empty(c.shape(), DType::f32, c.device()) : c.to(DType::f32);
    gemm(a, ta, b, tb, c32, alpha, beta);
    c.copy_(c32);
  } else if (a.dtype() == DType::f64 && b.dtype() == DType::f64 && c.dtype() == DType::f64) {
    gemm_reference<double>(ta, tb, m, n, k, alpha, a.data<double>(), lda, b.data<double>(), ldb,
                           beta, c.data<double>(), ldc);
  } else {
    fail(
        "gemm: dtypes a {}, b {}, c {} unsupported (supported: f32 x f32 -> f32, bf16 x bf16 -> "
        "f32 or bf16, f64 x f64 -> f64)",
        dtype_name(a.dtype()), dtype_name(b.dtype()), dtype_name(c.dtype()));
  }
}

}  // namespace llama3::cpu

#include <chrono>

namespace llama3 {

double cpu_gemm_peak_flops(bool bf16_inputs, int64_t max_n) {
  using clk = std::chrono::steady_clock;
  double best = 0;
  for (int64_t n = 1024; n <= max_n; n *= 2) {
    std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
    std::vector<bf16> ab(n * n, bf16{f32_to_bf16_bits(0.5f)}),
        bb(n * n, bf16{f32_to_bf16_bits(0.25f)});
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = clk::now();
      if (bf16_inputs)
        cpu_gemm_bf16(Trans::N, Trans::N, n, n, n, 1.f, ab.data(), n, bb.data(), n, 0.f, c.data(),
                      n);
      else
        cpu_gemm_f32(Trans::N, Trans::N, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
      const double s = std::chrono::duration<double>(clk::now() - t0).count();
      if (rep > 0) best = std::max(best, 2.0 * double(n) * double(n) * double(n) / s);
    }
  }
  return best;
}

}  // namespace llama3
