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

template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t rows, int64_t D, T* dst) {
  // dst (D x kBc) = src (rows x D)^T, zero-padded to kBc columns.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) dst[c * kBc + r] = src[r * ld + c];
  for (int64_t r = rows; r < kBc; ++r)
    for (int64_t c = 0; c < D; ++c) dst[c * kBc + r] = T(0);
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const Masking& mk, Dims d, T scale, T* out, T* lse) {
  const int64_t n_qt = (d.Tq + kBr - 1) / kBr;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t ldq = d.H * d.D, ldk = d.Hkv * d.D;
#pragma omp parallel
  {
    std::vector<T> kt(size_t(d.D) * kBc), qs(size_t(kBr) * d.D), s(size_t(kBr) * kBc),
        acc(size_t(kBr) * d.D), m(kBr), l(kBr);
    std::vector<int64_t> rlo(kBr), rhi(kBr);
#pragma omp for collapse(3) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t h = 0; h < d.H; ++h)
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t kvh = h / d.group;
          const int64_t i0 = qt * kBr, i1 = std::min(d.Tq, i0 + kBr), nr = i1 - i0;
          int64_t lo = d.Tk, hi = 0;
          for (int64_t ii = 0; ii < nr; ++ii) {
            mk.interval(b, i0 + ii, d.Tk, rlo[ii], rhi[ii]);
            lo = std::min(lo, rlo[ii]), hi = std::max(hi, rhi[ii]);
          }
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
            pack_transposed(k + (b * d.Tk + j0) * ldk + kvh * d.D, ldk, nc, d.D, kt.data());
            small_gemm(Accumulate::no, nr, kBc, d.D, qs.data(), d.D, kt.data(), kBc, s.data(), kBc);
            for (int64_t ii = 0; ii < nr; ++ii) {
              T* sr = &s[ii * kBc];
              const int64_t a = std::max<int64_t>(0, rlo[ii] - j0), e = std::min<int64_t>(nc, rhi[ii] - j0);
              if (a >= e) {
                std::fill(sr, sr + kBc, T(0));
                continue;
              }
              T mx = m[ii];
              for (int64_t jj = a; jj < e; ++jj) mx = std::max(mx, sr[jj]);
              const T alpha = m[ii] == neg_inf ? T(0) : fast_exp(m[ii] - mx);
              T sum = 0;
              for (int64_t jj = 0; jj < a; ++jj) sr[jj] = T(0);
#pragma omp simd reduction(+ : sum)
              for (int64_t jj = a; jj < e; ++jj) {
                sr[jj] = fast_exp(sr[jj] - mx);
                sum += sr[jj];
              }
              for (int64_t jj = e; jj < kBc; ++jj) sr[jj] = T(0);
              l[ii] = l[ii] * alpha + sum;
              m[ii] = mx;
              if (alpha != T(1)) {
                T* ar = &acc[ii * d.D];
#pragma omp simd
                for (int64_t c = 0; c < d.D; ++c) ar[c] *= alpha;
              }
            }
            small_gemm(Accumulate::yes, nr, d.D, nc, s.data(), kBc, v + (b * d.Tk + j0) * ldk + kvh * d.D,
                       ldk, acc.data(), d.D);
          }
          for (int64_t ii = 0; ii < nr; ++ii) {
            const int64_t i = i0 + ii;
            T* orow = out + (b * d.Tq + i) * ldq + h * d.D;
            const T inv = l[ii] > T(0) ? T(1) / l[ii] : T(0);
            for (int64_t c = 0; c < d.D; ++c) orow[c] = acc[ii * d.D + c] * inv;
            lse[(b * d.H + h) * d.Tq + i] = l[ii] > T(0) ? m[ii] + std::log(l[ii]) : neg_inf;
          }
        }
  }
}

template <typename T>
void transpose_tile(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

template <typename T>
void backward(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse,
              const Masking& mk, Dims d, T scale, T* dq, T* dk, T* dv) {
  const int64_t ldq = d.H * d.D, ldk = d.Hkv * d.D;
  const int64_t Br = kBc;  // query rows per backward tile
#pragma omp parallel
  {
    std::vector<T> kt(size_t(d.D) * kBc), vt(size_t(d.D) * kBc), dka(size_t(kBc) * d.D),
        dva(size_t(kBc) * d.D), p(size_t(Br) * kBc), dp(size_t(Br) * kBc), tt(size_t(kBc) * Br),
        dsum(d.Tq);
    std::vector<int64_t> rlo(d.Tq), rhi(d.Tq);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t kvh = 0; kvh < d.Hkv; ++kvh) {
        for (int64_t i = 0; i < d.Tq; ++i) mk.interval(b, i, d.Tk, rlo[i], rhi[i]);
        for (int64_t j = 0; j < d.Tk; ++j) {
          std::fill_n(dk + (b * d.Tk + j) * ldk + kvh * d.D, d.D, T(0));
          std::fill_n(dv + (b * d.Tk + j) * ldk + kvh * d.D, d.D, T(0));
        }
        for (int64_t h = kvh * d.group; h < (kvh + 1) * d.group; ++h) {
          for (int64_t i = 0; i < d.Tq; ++i) {
            const T* gr = dout + (b * d.Tq + i) * ldq + h * d.D;
            const T* orow = out + (b * d.Tq + i) * ldq + h * d.D;
            T s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < d.D; ++c) s += gr[c] * orow[c];
            dsum[i] = s;
            std::fill_n(dq + (b * d.Tq + i) * ldq + h * d.D, d.D, T(0));
          }
          const T* lse_h = lse + (b * d.H + h) * d.Tq;
          for (int64_t j0 = 0; j0 < d.Tk; j0 += kBc) {
            const int64_t j1 = std::min(d.Tk, j0 + kBc), nc = j1 - j0;
            const T* kj = k + (b * d.Tk + j0) * ldk + kvh * d.D;
            const T* vj = v + (b * d.Tk + j0) * ldk + kvh * d.D;
            bool packed = false;
            for (int64_t i0 = 0; i0 < d.Tq; i0 += Br) {
              const int64_t nr = std::min(Br, d.Tq - i0);
              bool any = false;
              for (int64_t ii = 0; ii < nr && !any; ++ii) any = rlo[i0 + ii] < j1 && rhi[i0 + ii] > j0;
              if (!any) continue;
              if (!packed) {
                pack_transposed(kj, ldk, nc, d.D, kt.data());
                pack_transposed(vj, ldk, nc, d.D, vt.data());
                std::fill(dka.begin(), dka.end(), T(0));
                std::fill(dva.begin(), dva.end(), T(0));
                packed = true;
              }
              const T* qi = q + (b * d.Tq + i0) * ldq + h * d.D;
              const T* gi = dout + (b * d.Tq + i0) * ldq + h * d.D;
              small_gemm(Accumulate::no, nr, kBc, d.D, qi, ldq, kt.data(), kBc, p.data(), kBc);
              small_gemm(Accumulate::no, nr, kBc, d.D, gi, ldq, vt.data(), kBc, dp.data(), kBc);
              for (int64_t ii = 0; ii < nr; ++ii) {
                const int64_t i = i0 + ii;
                const int64_t a = std::max<int64_t>(0, rlo[i] - j0), e = std::min<int64_t>(nc, rhi[i] - j0);
                T* pr = &p[ii * kBc];
                T* dr = &dp[ii * kBc];
                const T li = lse_h[i], di = dsum[i];
                for (int64_t jj = 0; jj < kBc; ++jj) {
                  const bool valid = jj >= a && jj < e;
                  const T pj = valid ? fast_exp(pr[jj] * scale - li) : T(0);
                  pr[jj] = pj;
                  dr[jj] = pj * (dr[jj] - di) * scale;
                }
              }
              // dV += P^T dO ; dK += dS^T Q ; dQ += dS K
              transpose_tile(p.data(), nr, nc, kBc, tt.data(), Br);
              small_gemm(Accumulate::yes, nc, d.D, nr, tt.data(), Br, gi, ldq, dva.data(), d.D);
              transpose_tile(dp.data(), nr, nc, kBc, tt.data(), Br);
              small_gemm(Accumulate::yes, nc, d.D, nr, tt.data(), Br, qi, ldq, dka.data(), d.D);
              small_gemm(Accumulate::yes, nr, d.D, nc, dp.data(), kBc, kj, ldk,
                         dq + (b * d.Tq + i0) * ldq + h * d.D, ldq);
            }
            if (!packed) continue;
            for (int64_t jj = 0; jj < nc; ++jj) {
              T* dkr = dk + (b * d.Tk + j0 + jj) * ldk + kvh * d.D;
              T* dvr = dv + (b * d.Tk + j0 + jj) * ldk + kvh * d.D;
#pragma omp simd
              for (int64_t c = 0; c < d.D; ++c) dkr[c] += dka[jj * d.D + c], dvr[c] += dva[jj * d.D + c];
            }
          }
        }
      }
  }
}

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
  dispatch(q.dtype(), [&]<typename T>() {
    T scale = p.scale != 0.f ? T(p.scale) : T(1) / std::sqrt(T(d.D));
    backward<T>(dout.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), lse.data<T>(), mk, d,
                scale, dq.data<T>(), dk.data<T>(), dv.data<T>());
  });
}

}  // namespace llama3::cpu
