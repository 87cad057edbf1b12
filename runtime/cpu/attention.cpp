// Attention on the CPU, flash-attention style: for each (batch, head, query tile) the keys
// are visited tile by tile with an online softmax, so no (T, T) score matrix exists; the
// backward recomputes scores per key tile from the saved log-sum-exp (FlashAttention-2).
// Masks: causal and/or document (doc ids must form contiguous runs within a row, which
// lets whole tiles outside a document be skipped).
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "runtime/cpu/kernels.h"
#include "runtime/cpu/small_gemm.h"
#include "runtime/cpu/vec.h"

namespace llama3::cpu {

namespace {

constexpr int64_t kBr = 32;  // query rows per forward work item
constexpr int64_t kBc = 64;  // keys per tile

struct Dims {
  int64_t B, Tq, Tk, H, Hkv, D, group;
};

// Per key position: first index and one-past-last index of its document.
void doc_runs(const int32_t* doc, int64_t T, std::vector<int64_t>& start, std::vector<int64_t>& end) {
  start.resize(T), end.resize(T);
  for (int64_t i = 0; i < T; ++i) start[i] = (i > 0 && doc[i] == doc[i - 1]) ? start[i - 1] : i;
  for (int64_t i = T - 1; i >= 0; --i) end[i] = (i + 1 < T && doc[i] == doc[i + 1]) ? end[i + 1] : i + 1;
}

// Which keys a query row may see: one interval [lo, hi) of key positions, from the causal
// limit (its position) and its document's run. q_pos (optional) gives each query's
// position among the keys; without it query i sits at key position i.
struct Masking {
  const int32_t* q_pos = nullptr;
  const int32_t* doc = nullptr;  // (B, Tk)
  bool causal = true;
  std::vector<std::vector<int64_t>> dstart, dend;  // per batch row, per key position
  int64_t pos(int64_t i) const { return q_pos ? q_pos[i] : i; }
  void interval(int64_t b, int64_t i, int64_t Tk, int64_t& lo, int64_t& hi) const {
    const int64_t p = pos(i);
    lo = 0, hi = Tk;
    if (doc) lo = dstart[b][p], hi = dend[b][p];
    if (causal) hi = std::min(hi, p + 1);
  }
};

Masking make_masking(const AttentionParams& p, const Dims& d) {
  Masking m;
  m.causal = p.causal;
  if (p.q_pos.defined()) m.q_pos = p.q_pos.data<int32_t>();
  if (p.doc_ids.defined()) {
    m.doc = p.doc_ids.data<int32_t>();
    m.dstart.resize(d.B), m.dend.resize(d.B);
    for (int64_t b = 0; b < d.B; ++b) doc_runs(m.doc + b * d.Tk, d.Tk, m.dstart[b], m.dend[b]);
  }
  return m;
}

// Keys padded to whole tiles: packed K^T / V^T rows are this long, so a tile never reads
// past its row.
int64_t padded_keys(int64_t Tk) { return (Tk + kBc - 1) / kBc * kBc; }

// dst (D x ldt) = src (rows x D, leading dim ld)^T, columns rows..ldt zero. Done once per
// (batch, kv head): every query tile of the group's heads reuses it.
template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t rows, int64_t D, int64_t ldt, T* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)  // 16-row blocks keep the writes within cache lines
    for (int64_t c = 0; c < D; ++c)
      for (int64_t r = r0; r < std::min(rows, r0 + 16); ++r) dst[c * ldt + r] = src[r * ld + c];
  for (int64_t c = 0; c < D; ++c)
    for (int64_t r = rows; r < ldt; ++r) dst[c * ldt + r] = T(0);
}

// One key tile's online-softmax step for one query row: sr holds the tile's kBc scores, valid
// in [a, e). On return sr holds the unnormalised probabilities exp(s - max) (zero outside
// [a, e)), m and l the running max and sum, and the row's output accumulator is rescaled.
template <typename T>
void softmax_tile_row(T* sr, int64_t a, int64_t e, T& m, T& l, T* acc_row, int64_t D) {
  if (a >= e) {
    std::fill(sr, sr + kBc, T(0));
    return;
  }
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T mx = m;
#pragma omp simd reduction(max : mx)
  for (int64_t jj = a; jj < e; ++jj) mx = std::max(mx, sr[jj]);
  const T alpha = m == neg_inf ? T(0) : fast_exp(m - mx);
  T sum = 0;
  for (int64_t jj = 0; jj < a; ++jj) sr[jj] = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t jj = a; jj < e; ++jj) {
    sr[jj] = fast_exp(sr[jj] - mx);
    sum += sr[jj];
  }
  for (int64_t jj = e; jj < kBc; ++jj) sr[jj] = T(0);
  l = l * alpha + sum;
  m = mx;
  if (alpha != T(1)) {
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) acc_row[c] *= alpha;
  }
}

// Backward, one query row of a tile: pr holds unscaled scores q.k, dr holds dO.v (kBc each,
// valid in [a, e)). On return pr = P (recomputed from the row's log-sum-exp li) and dr = dS =
// P (dP - D_i) scale, both zero outside [a, e).
template <typename T>
void grad_tile_row(T* pr, T* dr, int64_t a, int64_t e, T li, T di, T scale) {
  e = std::max<int64_t>(e, 0), a = std::min(a, e);  // an empty [a, e) may come in reversed
  std::fill(pr, pr + a, T(0)), std::fill(dr, dr + a, T(0));
#pragma omp simd
  for (int64_t jj = a; jj < e; ++jj) {
    const T pj = fast_exp(pr[jj] * scale - li);
    pr[jj] = pj;
    dr[jj] = pj * (dr[jj] - di) * scale;
  }
  std::fill(pr + e, pr + kBc, T(0)), std::fill(dr + e, dr + kBc, T(0));
}

// The key intervals of query rows i0 .. i0 + nr (into rlo / rhi) and their union [lo, hi).
void tile_intervals(const Masking& mk, int64_t b, int64_t i0, int64_t nr, int64_t Tk, int64_t* rlo, int64_t* rhi,
                    int64_t& lo, int64_t& hi) {
  lo = Tk, hi = 0;
  for (int64_t ii = 0; ii < nr; ++ii) {
    mk.interval(b, i0 + ii, Tk, rlo[ii], rhi[ii]);
    lo = std::min(lo, rlo[ii]), hi = std::max(hi, rhi[ii]);
  }
}

// A finished forward query tile: output rows acc / l (ldo apart) and their log-sum-exps.
template <typename T>
void finish_rows(const T* acc, const T* m, const T* l, int64_t nr, int64_t D, T* out, int64_t ldo, T* lse) {
  for (int64_t ii = 0; ii < nr; ++ii) {
    const T inv = l[ii] > T(0) ? T(1) / l[ii] : T(0);
    for (int64_t c = 0; c < D; ++c) out[ii * ldo + c] = acc[ii * D + c] * inv;
    lse[ii] = l[ii] > T(0) ? m[ii] + std::log(l[ii]) : -std::numeric_limits<T>::infinity();
  }
}

// D_i = dO_i . O_i for rows 0 .. n (ld apart), the softmax backward's row term.
template <typename T>
void row_dots(const T* dout, const T* out, int64_t n, int64_t D, int64_t ld, T* dsum) {
  for (int64_t i = 0; i < n; ++i) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < D; ++c) s += dout[i * ld + c] * out[i * ld + c];
    dsum[i] = s;
  }
}

// dK / dV rows j0 .. j0 + nc (ld apart) += one key tile's accumulated dka / dva.
template <typename T>
void add_key_grads(const T* dka, const T* dva, int64_t nc, int64_t D, T* dk, T* dv, int64_t ld) {
  for (int64_t jj = 0; jj < nc; ++jj) {
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) dk[jj * ld + c] += dka[jj * D + c], dv[jj * ld + c] += dva[jj * D + c];
  }
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const Masking& mk, Dims d, T scale, T* out, T* lse) {
  const int64_t n_qt = (d.Tq + kBr - 1) / kBr;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t ldq = d.H * d.D, ldk = d.Hkv * d.D, ldt = padded_keys(d.Tk);
  const size_t kt_sz = size_t(d.D) * ldt;
  std::vector<T> kt(kt_sz * d.B * d.Hkv);
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t kvh = 0; kvh < d.Hkv; ++kvh)
      pack_transposed(k + b * d.Tk * ldk + kvh * d.D, ldk, d.Tk, d.D, ldt, &kt[size_t(b * d.Hkv + kvh) * kt_sz]);
#pragma omp parallel
  {
    std::vector<T> qs(size_t(kBr) * d.D), s(size_t(kBr) * kBc),
        acc(size_t(kBr) * d.D), m(kBr), l(kBr);
    std::vector<int64_t> rlo(kBr), rhi(kBr);
#pragma omp for collapse(3) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t h = 0; h < d.H; ++h)
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t kvh = h / d.group;
          const int64_t i0 = qt * kBr, i1 = std::min(d.Tq, i0 + kBr), nr = i1 - i0;
          int64_t lo, hi;
          tile_intervals(mk, b, i0, nr, d.Tk, rlo.data(), rhi.data(), lo, hi);
          // Scaled copy of the query tile.
          for (int64_t ii = 0; ii < nr; ++ii) {
            const T* qr = q + (b * d.Tq + i0 + ii) * ldq + h * d.D;
            for (int64_t c = 0; c < d.D; ++c) qs[ii * d.D + c] = qr[c] * scale;
          }
          std::fill(acc.begin(), acc.begin() + nr * d.D, T(0));
          std::fill(m.begin(), m.end(), neg_inf);
          std::fill(l.begin(), l.end(), T(0));
          for (int64_t j0 = lo - lo % kBc; j0 < hi; j0 += kBc) {
            const int64_t j1 = std::min(d.Tk, j0 + kBc), nc = j1 - j0;
            small_gemm(Accumulate::no, nr, kBc, d.D, qs.data(), d.D, &kt[size_t(b * d.Hkv + kvh) * kt_sz + j0], ldt,
                       s.data(), kBc);
            for (int64_t ii = 0; ii < nr; ++ii) {
              const int64_t a = std::max<int64_t>(0, rlo[ii] - j0), e = std::min<int64_t>(nc, rhi[ii] - j0);
              softmax_tile_row(&s[ii * kBc], a, e, m[ii], l[ii], &acc[ii * d.D], d.D);
            }
            small_gemm(Accumulate::yes, nr, d.D, nc, s.data(), kBc, v + (b * d.Tk + j0) * ldk + kvh * d.D,
                       ldk, acc.data(), d.D);
          }
          finish_rows(acc.data(), m.data(), l.data(), nr, d.D, out + (b * d.Tq + i0) * ldq + h * d.D, ldq,
                      lse + (b * d.H + h) * d.Tq + i0);
        }
  }
}

template <typename T>
void backward(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse,
              const Masking& mk, Dims d, T scale, T* dq, T* dk, T* dv) {
  const int64_t ldq = d.H * d.D, ldk = d.Hkv * d.D, ldt = padded_keys(d.Tk);
  const int64_t Br = kBc;  // query rows per backward tile
#pragma omp parallel
  {
    std::vector<T> kt(size_t(d.D) * ldt), vt(size_t(d.D) * ldt), dka(size_t(kBc) * d.D),
        dva(size_t(kBc) * d.D), p(size_t(Br) * kBc), dp(size_t(Br) * kBc),
        dsum(d.Tq);
    std::vector<int64_t> rlo(d.Tq), rhi(d.Tq);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t kvh = 0; kvh < d.Hkv; ++kvh) {
        for (int64_t i = 0; i < d.Tq; ++i) mk.interval(b, i, d.Tk, rlo[i], rhi[i]);
        pack_transposed(k + b * d.Tk * ldk + kvh * d.D, ldk, d.Tk, d.D, ldt, kt.data());
        pack_transposed(v + b * d.Tk * ldk + kvh * d.D, ldk, d.Tk, d.D, ldt, vt.data());
        for (int64_t j = 0; j < d.Tk; ++j) {
          std::fill_n(dk + (b * d.Tk + j) * ldk + kvh * d.D, d.D, T(0));
          std::fill_n(dv + (b * d.Tk + j) * ldk + kvh * d.D, d.D, T(0));
        }
        for (int64_t h = kvh * d.group; h < (kvh + 1) * d.group; ++h) {
          row_dots(dout + b * d.Tq * ldq + h * d.D, out + b * d.Tq * ldq + h * d.D, d.Tq, d.D, ldq, dsum.data());
          for (int64_t i = 0; i < d.Tq; ++i) std::fill_n(dq + (b * d.Tq + i) * ldq + h * d.D, d.D, T(0));
          const T* lse_h = lse + (b * d.H + h) * d.Tq;
          for (int64_t j0 = 0; j0 < d.Tk; j0 += kBc) {
            const int64_t j1 = std::min(d.Tk, j0 + kBc), nc = j1 - j0;
            const T* kj = k + (b * d.Tk + j0) * ldk + kvh * d.D;
            bool touched = false;
            for (int64_t i0 = 0; i0 < d.Tq; i0 += Br) {
              const int64_t nr = std::min(Br, d.Tq - i0);
              bool any = false;
              for (int64_t ii = 0; ii < nr && !any; ++ii) any = rlo[i0 + ii] < j1 && rhi[i0 + ii] > j0;
              if (!any) continue;
              if (!touched) {
                std::fill(dka.begin(), dka.end(), T(0));
                std::fill(dva.begin(), dva.end(), T(0));
                touched = true;
              }
              const T* qi = q + (b * d.Tq + i0) * ldq + h * d.D;
              const T* gi = dout + (b * d.Tq + i0) * ldq + h * d.D;
              small_gemm(Accumulate::no, nr, kBc, d.D, qi, ldq, kt.data() + j0, ldt, p.data(), kBc);
              small_gemm(Accumulate::no, nr, kBc, d.D, gi, ldq, vt.data() + j0, ldt, dp.data(), kBc);
              for (int64_t ii = 0; ii < nr; ++ii) {
                const int64_t i = i0 + ii;
                const int64_t a = std::max<int64_t>(0, rlo[i] - j0), e = std::min<int64_t>(nc, rhi[i] - j0);
                grad_tile_row(&p[ii * kBc], &dp[ii * kBc], a, e, lse_h[i], dsum[i], scale);
              }
              // dV += P^T dO ; dK += dS^T Q ; dQ += dS K (P^T and dS^T read through strides)
              small_gemm_strided(Accumulate::yes, nc, d.D, nr, p.data(), int64_t(1), kBc, gi, ldq, dva.data(), d.D);
              small_gemm_strided(Accumulate::yes, nc, d.D, nr, dp.data(), int64_t(1), kBc, qi, ldq, dka.data(), d.D);
              small_gemm(Accumulate::yes, nr, d.D, nc, dp.data(), kBc, kj, ldk,
                         dq + (b * d.Tq + i0) * ldq + h * d.D, ldq);
            }
            if (!touched) continue;
            add_key_grads(dka.data(), dva.data(), nc, d.D, dk + (b * d.Tk + j0) * ldk + kvh * d.D,
                          dv + (b * d.Tk + j0) * ldk + kvh * d.D, ldk);
          }
        }
      }
  }
}

#if defined(__AVX512BF16__)
// ---- bf16-compute path (AttentionParams::compute == bf16, f32 tensors) ----
// The same tiles, masks and online softmax, but the five tile products run on bf16 operands
// with f32 accumulation (vdpbf16ps), as autocast SDPA does: Q/K/V/dO and P/dS are rounded to
// bf16, scores, softmax statistics and all accumulators stay f32. K and V are packed once per
// (batch, kv head) instead of once per tile, since the packed operands are reused by every
// query tile of the group's heads.

constexpr int64_t kBr16 = 64;  // query rows per forward work item

int64_t even(int64_t n) { return n + (n & 1); }

void forward_bf16(const float* q, const float* k, const float* v, const Masking& mk, Dims d,
                  float scale, float* out, float* lse) {
  const int64_t ldq = d.H * d.D, ldk = d.Hkv * d.D, Dp = even(d.D), Tkp = even(d.Tk);
  const int64_t ldb_kt = vnni_ld(d.Tk), ldb_v = vnni_ld(d.D);  // pairs per packed row
  const size_t kt_sz = size_t(Dp) * ldb_kt, v_sz = size_t(Tkp) * ldb_v;
  std::vector<uint16_t> kt(kt_sz * d.B * d.Hkv), vp(v_sz * d.B * d.Hkv);
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t kvh = 0; kvh < d.Hkv; ++kvh) {
      const size_t i = size_t(b * d.Hkv + kvh);
      pack_vnni_cols(k + b * d.Tk * ldk + kvh * d.D, ldk, d.D, d.Tk, Dp, &kt[i * kt_sz]);
      pack_vnni_rows(v + b * d.Tk * ldk + kvh * d.D, ldk, d.Tk, d.D, Tkp, &vp[i * v_sz]);
    }
  const int64_t n_qt = (d.Tq + kBr16 - 1) / kBr16;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel
  {
    std::vector<uint16_t> qs(size_t(kBr16) * Dp, 0), ps(size_t(kBr16) * kBc);
    std::vector<float> s(size_t(kBr16) * kBc), acc(size_t(kBr16) * d.D), m(kBr16), l(kBr16);
    std::vector<int64_t> rlo(kBr16), rhi(kBr16);
#pragma omp for collapse(3) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t h = 0; h < d.H; ++h)
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t kvh = h / d.group;
          const uint16_t* ktb = &kt[size_t(b * d.Hkv + kvh) * kt_sz];
          const uint16_t* vb = &vp[size_t(b * d.Hkv + kvh) * v_sz];
          const int64_t i0 = qt * kBr16, nr = std::min(d.Tq, i0 + kBr16) - i0;
          int64_t lo, hi;
          tile_intervals(mk, b, i0, nr, d.Tk, rlo.data(), rhi.data(), lo, hi);
          for (int64_t ii = 0; ii < nr; ++ii)
            to_bf16_row(q + (b * d.Tq + i0 + ii) * ldq + h * d.D, d.D, scale, &qs[ii * Dp]);
          std::fill(acc.begin(), acc.begin() + nr * d.D, 0.f);
          std::fill(m.begin(), m.end(), neg_inf);
          std::fill(l.begin(), l.end(), 0.f);
          for (int64_t j0 = lo - lo % kBc; j0 < hi; j0 += kBc) {
            const int64_t nc = std::min(d.Tk, j0 + kBc) - j0;
            small_gemm_bf16(Accumulate::no, nr, nc, Dp, qs.data(), Dp / 2, 1, ktb + 2 * j0, ldb_kt, s.data(), kBc);
            for (int64_t ii = 0; ii < nr; ++ii) {
              const int64_t a = std::max<int64_t>(0, rlo[ii] - j0), e = std::min<int64_t>(nc, rhi[ii] - j0);
              softmax_tile_row(&s[ii * kBc], a, e, m[ii], l[ii], &acc[ii * d.D], d.D);
              to_bf16_row(&s[ii * kBc], kBc, 1.f, &ps[ii * kBc]);
            }
            small_gemm_bf16(Accumulate::yes, nr, d.D, even(nc), ps.data(), kBc / 2, 1, vb + j0 * ldb_v, ldb_v,
                            acc.data(), d.D);
          }
          finish_rows(acc.data(), m.data(), l.data(), nr, d.D, out + (b * d.Tq + i0) * ldq + h * d.D, ldq,
                      lse + (b * d.H + h) * d.Tq + i0);
        }
  }
}

void backward_bf16(const float* dout, const float* q, const float* k, const float* v, const float* out,
                   const float* lse, const Masking& mk, Dims d, float scale, float* dq, float* dk, float* dv) {
  const int64_t ldq = d.H * d.D, ldk = d.Hkv * d.D, Dp = even(d.D), Tkp = even(d.Tk), Tqp = even(d.Tq);
  const int64_t ldb_t = vnni_ld(d.Tk), ldb_d = vnni_ld(d.D);
  const int64_t Br = kBc;  // query rows per backward tile
#pragma omp parallel
  {
    // Per (batch, kv head): K^T and V^T (D x Tk) for S = Q K^T and dP = dO V^T; K (Tk x D)
    // for dQ = dS K. Per query head: Q and dO as bf16 rows (A operands) and packed by rows
    // (B operands of dK = dS^T Q and dV = P^T dO).
    std::vector<uint16_t> ktp(size_t(Dp) * ldb_t), vtp(size_t(Dp) * ldb_t), kp(size_t(Tkp) * ldb_d),
        q16(size_t(d.Tq) * Dp, 0), do16(size_t(d.Tq) * Dp, 0), qp(size_t(Tqp) * ldb_d),
        dop(size_t(Tqp) * ldb_d), pt(size_t(kBc) * Br), dst(size_t(kBc) * Br), ds16(size_t(Br) * kBc);
    std::vector<float> dka(size_t(kBc) * d.D), dva(size_t(kBc) * d.D), p(size_t(Br) * kBc),
        dp(size_t(Br) * kBc), dsum(d.Tq);
    std::vector<int64_t> rlo(d.Tq), rhi(d.Tq);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t kvh = 0; kvh < d.Hkv; ++kvh) {
        for (int64_t i = 0; i < d.Tq; ++i) mk.interval(b, i, d.Tk, rlo[i], rhi[i]);
        const float* kb = k + b * d.Tk * ldk + kvh * d.D;
        const float* vb = v + b * d.Tk * ldk + kvh * d.D;
        pack_vnni_cols(kb, ldk, d.D, d.Tk, Dp, ktp.data());
        pack_vnni_cols(vb, ldk, d.D, d.Tk, Dp, vtp.data());
        pack_vnni_rows(kb, ldk, d.Tk, d.D, Tkp, kp.data());
        for (int64_t j = 0; j < d.Tk; ++j) {
          std::fill_n(dk + (b * d.Tk + j) * ldk + kvh * d.D, d.D, 0.f);
          std::fill_n(dv + (b * d.Tk + j) * ldk + kvh * d.D, d.D, 0.f);
        }
        for (int64_t h = kvh * d.group; h < (kvh + 1) * d.group; ++h) {
          const float* qh = q + b * d.Tq * ldq + h * d.D;
          const float* gh = dout + b * d.Tq * ldq + h * d.D;
          row_dots(gh, out + b * d.Tq * ldq + h * d.D, d.Tq, d.D, ldq, dsum.data());
          for (int64_t i = 0; i < d.Tq; ++i) {
            std::fill_n(dq + (b * d.Tq + i) * ldq + h * d.D, d.D, 0.f);
            to_bf16_row(qh + i * ldq, d.D, 1.f, &q16[i * Dp]);
            to_bf16_row(gh + i * ldq, d.D, 1.f, &do16[i * Dp]);
          }
          pack_vnni_rows(qh, ldq, d.Tq, d.D, Tqp, qp.data());
          pack_vnni_rows(gh, ldq, d.Tq, d.D, Tqp, dop.data());
          const float* lse_h = lse + (b * d.H + h) * d.Tq;
          for (int64_t j0 = 0; j0 < d.Tk; j0 += kBc) {
            const int64_t nc = std::min(d.Tk, j0 + kBc) - j0;
            bool touched = false;
            for (int64_t i0 = 0; i0 < d.Tq; i0 += Br) {
              const int64_t nr = std::min(Br, d.Tq - i0);
              bool any = false;
              for (int64_t ii = 0; ii < nr && !any; ++ii) any = rlo[i0 + ii] < j0 + nc && rhi[i0 + ii] > j0;
              if (!any) continue;
              if (!touched) {
                std::fill(dka.begin(), dka.end(), 0.f);
                std::fill(dva.begin(), dva.end(), 0.f);
                touched = true;
              }
              small_gemm_bf16(Accumulate::no, nr, nc, Dp, &q16[i0 * Dp], Dp / 2, 1, ktp.data() + 2 * j0, ldb_t, p.data(), kBc);
              small_gemm_bf16(Accumulate::no, nr, nc, Dp, &do16[i0 * Dp], Dp / 2, 1, vtp.data() + 2 * j0, ldb_t, dp.data(), kBc);
              for (int64_t ii = 0; ii < nr; ++ii) {
                const int64_t i = i0 + ii;
                const int64_t a = std::max<int64_t>(0, rlo[i] - j0), e = std::min<int64_t>(nc, rhi[i] - j0);
                grad_tile_row(&p[ii * kBc], &dp[ii * kBc], a, e, lse_h[i], dsum[i], scale);
                to_bf16_row(&dp[ii * kBc], kBc, 1.f, &ds16[ii * kBc]);
              }
              // dV += P^T dO ; dK += dS^T Q ; dQ += dS K
              // P^T and dS^T as A operands: the rows of P / dS packed in pairs are exactly
              // the bf16 pairs of their transposes' rows.
              const int64_t nrp = even(nr);
              pack_vnni_rows(p.data(), kBc, nr, nc, nrp, pt.data());
              small_gemm_bf16(Accumulate::yes, nc, d.D, nrp, pt.data(), 1, kBc, dop.data() + i0 * ldb_d, ldb_d,
                              dva.data(), d.D);
              pack_vnni_rows(dp.data(), kBc, nr, nc, nrp, dst.data());
              small_gemm_bf16(Accumulate::yes, nc, d.D, nrp, dst.data(), 1, kBc, qp.data() + i0 * ldb_d, ldb_d,
                              dka.data(), d.D);
              small_gemm_bf16(Accumulate::yes, nr, d.D, even(nc), ds16.data(), kBc / 2, 1, kp.data() + j0 * ldb_d,
                              ldb_d, dq + (b * d.Tq + i0) * ldq + h * d.D, ldq);
            }
            if (!touched) continue;
            add_key_grads(dka.data(), dva.data(), nc, d.D, dk + (b * d.Tk + j0) * ldk + kvh * d.D,
                          dv + (b * d.Tk + j0) * ldk + kvh * d.D, ldk);
          }
        }
      }
  }
}
#endif

Dims dims_of(const Tensor& q, const Tensor& k, const AttentionParams& p) {
  LLAMA3_CHECK(q.dim() == 4 && k.dim() == 4, "attention: q {} and k {} must be (B, T, H, Dh)",
               q.str(), k.str());
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0};
  LLAMA3_CHECK(k.size(0) == d.B && k.size(3) == d.D && d.H % d.Hkv == 0,
               "attention: q {} and k {} disagree (heads {} must be a multiple of kv heads {})",
               q.str(), k.str(), d.H, d.Hkv);
  LLAMA3_CHECK(p.q_pos.defined() || d.Tq == d.Tk,
               "attention: {} queries and {} keys need q_pos (the queries' key positions)", d.Tq, d.Tk);
  d.group = d.H / d.Hkv;
  return d;
}

template <typename F>
void dispatch(DType t, F&& f) {
  if (t == DType::f32) return f.template operator()<float>();
  if (t == DType::f64) return f.template operator()<double>();
  fail("attention: dtype {} unsupported on cpu (supported: f32, f64)", dtype_name(t));
}

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionParams& p,
                       Tensor& out, Tensor& lse) {
  Dims d = dims_of(q, k, p);
  Masking mk = make_masking(p, d);
#if defined(__AVX512BF16__)
  if (p.compute == AttnCompute::bf16 && q.dtype() == DType::f32) {
    const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(float(d.D));
    return forward_bf16(q.data<float>(), k.data<float>(), v.data<float>(), mk, d, scale, out.data<float>(),
                        lse.data<float>());
  }
#endif
  dispatch(q.dtype(), [&]<typename T>() {
    T scale = p.scale != 0.f ? T(p.scale) : T(1) / std::sqrt(T(d.D));
    forward<T>(q.data<T>(), k.data<T>(), v.data<T>(), mk, d, scale, out.data<T>(), lse.data<T>());
  });
}

void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const AttentionParams& p, Tensor& dq,
                        Tensor& dk, Tensor& dv) {
  Dims d = dims_of(q, k, p);
  Masking mk = make_masking(p, d);
#if defined(__AVX512BF16__)
  if (p.compute == AttnCompute::bf16 && q.dtype() == DType::f32) {
    const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(float(d.D));
    return backward_bf16(dout.data<float>(), q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(),
                         lse.data<float>(), mk, d, scale, dq.data<float>(), dk.data<float>(), dv.data<float>());
  }
#endif
  dispatch(q.dtype(), [&]<typename T>() {
    T scale = p.scale != 0.f ? T(p.scale) : T(1) / std::sqrt(T(d.D));
    backward<T>(dout.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), lse.data<T>(), mk, d,
                scale, dq.data<T>(), dk.data<T>(), dv.data<T>());
  });
}

}  // namespace llama3::cpu
