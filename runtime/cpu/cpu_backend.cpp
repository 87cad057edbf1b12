#include "runtime/cpu/cpu_backend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "runtime/core/allocator.h"
#include "runtime/cpu/kernels.h"
#include "runtime/cpu/vec.h"

namespace llama3 {

namespace {

// Runs f.template operator()<T>() for T = float or double per the dtype.
template <typename F>
auto dispatch_float(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::f32:
      return f.template operator()<float>();
    case DType::f64:
      return f.template operator()<double>();
    default:
      fail("{}: dtype {} not supported on cpu (supported: f32, f64)", op, dtype_name(t));
  }
}

// Runs f(lo, hi) over [0, bytes) split across the OpenMP threads (boundaries aligned to
// `align` bytes), or inline below 1 MiB. Fills and same-type copies are memory-bound, and
// leaving them to one thread keeps the other spinning idle (zeroing gradients, contiguous()).
template <typename F>
void parallel_chunks(int64_t bytes, F&& f, int64_t align = 64) {
  if (bytes < (int64_t(1) << 20)) return f(int64_t(0), bytes);
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (bytes / nt + 63) / 64 * 64;
    int64_t lo = std::min(bytes, t * per), hi = std::min(bytes, lo + per);
    lo = lo / align * align, hi = t == nt - 1 ? bytes : hi / align * align;
    if (hi > lo) f(lo, hi);
  }
}

void check_contig(const Tensor& t, const char* op, const char* name) {
  LLAMA3_CHECK(t.defined() && t.is_contiguous(),
               "{}: {} must be a defined contiguous tensor, got {}", op, name, t.str());
}

// Element load/store with conversion, for the generic strided copy.
double load(const void* p, DType t) {
  switch (t) {
    case DType::f32:
      return *static_cast<const float*>(p);
    case DType::f64:
      return *static_cast<const double*>(p);
    case DType::bf16:
      return bf16_bits_to_f32(*static_cast<const uint16_t*>(p));
    case DType::i32:
      return *static_cast<const int32_t*>(p);
    case DType::i64:
      return double(*static_cast<const int64_t*>(p));
    case DType::u8:
      return *static_cast<const uint8_t*>(p);
    case DType::f16:
      break;
  }
  fail("cpu copy: dtype {} unsupported", dtype_name(t));
}
void store(void* p, DType t, double v) {
  switch (t) {
    case DType::f32:
      *static_cast<float*>(p) = float(v);
      return;
    case DType::f64:
      *static_cast<double*>(p) = v;
      return;
    case DType::bf16:
      *static_cast<uint16_t*>(p) = f32_to_bf16_bits(float(v));
      return;
    case DType::i32:
      *static_cast<int32_t*>(p) = int32_t(v);
      return;
    case DType::i64:
      *static_cast<int64_t*>(p) = int64_t(v);
      return;
    case DType::u8:
      *static_cast<uint8_t*>(p) = uint8_t(v);
      return;
    case DType::f16:
      break;
  }
  fail("cpu copy: dtype {} unsupported", dtype_name(t));
}

// A strided copy whose innermost dimension is contiguous on both sides (a narrow() of the
// last dimension, a slice of rows: the q/k/v split of a fused projection) copies whole rows
// - memcpy, or a converting loop for f32 <-> bf16 - instead of one element at a time
// through the generic path's index arithmetic and dtype switches (those copies were 7% of a
// 125M batch-16 decode). False when it does not apply.
bool copy_rows(const Tensor& src, Tensor& dst) {
  const int nd = src.dim();
  if (nd < 1 || src.strides()[nd - 1] != 1 || dst.strides()[nd - 1] != 1) return false;
  const DType st = src.dtype(), dt = dst.dtype();
  const bool same = st == dt, to_bf16 = st == DType::f32 && dt == DType::bf16,
             to_f32 = st == DType::bf16 && dt == DType::f32;
  if (!same && !to_bf16 && !to_f32) return false;
  const int64_t w = src.shape()[nd - 1], rows = src.numel() / w;
  const size_t ss = dtype_size(st), ds = dtype_size(dt);
  const char* sp = static_cast<const char*>(src.data_ptr());
  char* dp = static_cast<char*>(dst.data_ptr());
#pragma omp parallel for schedule(static) if (rows * w > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t so = 0, dof = 0, rest = r;  // the row's offsets from its outer indices
    for (int d = nd - 2; d >= 0; --d) {
      const int64_t i = rest % src.shape()[d];
      rest /= src.shape()[d];
      so += i * src.strides()[d], dof += i * dst.strides()[d];
    }
    const char* s = sp + so * int64_t(ss);
    char* d = dp + dof * int64_t(ds);
    if (same) {
      std::memcpy(d, s, size_t(w) * ss);
    } else if (to_bf16) {
      const float* f = reinterpret_cast<const float*>(s);
      uint16_t* b = reinterpret_cast<uint16_t*>(d);
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) b[i] = f32_to_bf16_bits(f[i]);
    } else {
      const uint16_t* b = reinterpret_cast<const uint16_t*>(s);
      float* f = reinterpret_cast<float*>(d);
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) f[i] = bf16_bits_to_f32(b[i]);
    }
  }
  return true;
}

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu(); }
  std::string name() const override { return "cpu"; }
  Allocator& allocator() override { return cpu_allocator(); }

  void copy(const Tensor& src, Tensor& dst) override {
    const int64_t n = src.numel();
    if (n == 0) return;
    if (src.is_contiguous() && dst.is_contiguous()) {
      if (src.dtype() == dst.dtype()) {
        const char* sp = static_cast<const char*>(src.data_ptr());
        char* dp = static_cast<char*>(dst.data_ptr());
        parallel_chunks(int64_t(src.nbytes()),
                        [&](int64_t lo, int64_t hi) { std::memcpy(dp + lo, sp + lo, hi - lo); });
        return;
      }
      if (src.dtype() == DType::f32 && dst.dtype() == DType::bf16) {
        const float* s = static_cast<const float*>(src.data_ptr());
        uint16_t* d = static_cast<uint16_t*>(dst.data_ptr());
#pragma omp parallel for simd if (parallel : n > 65536)
        for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16_bits(s[i]);
        return;
      }
      if (src.dtype() == DType::bf16 && dst.dtype() == DType::f32) {
        const uint16_t* s = static_cast<const uint16_t*>(src.data_ptr());
        float* d = static_cast<float*>(dst.data_ptr());
#pragma omp parallel for simd if (parallel : n > 65536)
        for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits_to_f32(s[i]);
        return;
      }
    }
    if (copy_rows(src, dst)) return;
    // Generic strided copy with conversion (cold path: views, tests, checkpoints).
    const int nd = src.dim();
    const size_t ss = dtype_size(src.dtype()), ds = dtype_size(dst.dtype());
    const char* sp = static_cast<const char*>(src.data_ptr());
    char* dp = static_cast<char*>(dst.data_ptr());
    std::vector<int64_t> idx(nd, 0);
    for (int64_t i = 0; i < n; ++i) {
      int64_t so = 0, dof = 0;
      for (int d = 0; d < nd; ++d)
        so += idx[d] * src.strides()[d], dof += idx[d] * dst.strides()[d];
      store(dp + dof * ds, dst.dtype(), load(sp + so * ss, src.dtype()));
      for (int d = nd - 1; d >= 0; --d) {
        if (++idx[d] < src.shape()[d]) break;
        idx[d] = 0;
      }
    }
  }

  void copy_to_host(const Tensor& src, void* dst, size_t bytes) override {
    check_contig(src, "copy_to_host", "src");
    std::memcpy(dst, src.data_ptr(), bytes);
  }
  void copy_from_host(const void* src, size_t bytes, Tensor& dst) override {
    check_contig(dst, "copy_from_host", "dst");
    std::memcpy(dst.data_ptr(), src, bytes);
  }

  void fill(Tensor& t, double value) override {
    const int64_t n = t.numel();
    if (!t.is_contiguous()) {
      Tensor c = Tensor::full(t.shape(), value, t.dtype());
      copy(c, t);
      return;
    }
    char* p = static_cast<char*>(t.data_ptr());
    auto fill_as = [&]<typename T>(T v) {
      T* d = reinterpret_cast<T*>(p);
      parallel_chunks(
          n * int64_t(sizeof(T)),
          [&](int64_t lo, int64_t hi) {
            std::fill(d + lo / int64_t(sizeof(T)), d + hi / int64_t(sizeof(T)), v);
          },
          sizeof(T));
    };
    switch (t.dtype()) {
      case DType::f32:
        return fill_as(float(value));
      case DType::f64:
        return fill_as(value);
      case DType::bf16:
        return fill_as(f32_to_bf16_bits(float(value)));
      case DType::i32:
        return fill_as(int32_t(value));
      case DType::i64:
        return fill_as(int64_t(value));
      case DType::u8:
        return fill_as(uint8_t(value));
      case DType::f16:
        break;
    }
    fail("fill: dtype {} unsupported on cpu", dtype_name(t.dtype()));
  }

  void gemm(const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, float alpha,
            float beta) override {
    cpu::gemm(a, ta, b, tb, c, alpha, beta);
  }

  void add(const Tensor& a, const Tensor& b, Tensor& out) override {
    check_contig(a, "add", "a"), check_contig(b, "add", "b"), check_contig(out, "add", "out");
    LLAMA3_CHECK(a.numel() == b.numel() && a.numel() == out.numel(), "add: sizes {} {} {}", a.str(),
                 b.str(), out.str());
    dispatch_float(a.dtype(), "add", [&]<typename T>() {
      const T *x = a.data<T>(), *y = b.data<T>();
      T* o = out.data<T>();
      const int64_t n = a.numel();
#pragma omp parallel for simd if (parallel : n > 32768)
      for (int64_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
    });
  }

  void axpy(float alpha, const Tensor& x, Tensor& y) override {
    check_contig(x, "axpy", "x"), check_contig(y, "axpy", "y");
    LLAMA3_CHECK(x.numel() == y.numel(), "axpy: sizes {} {}", x.str(), y.str());
    dispatch_float(y.dtype(), "axpy", [&]<typename T>() {
      const T* xs = x.data<T>();
      T* ys = y.data<T>();
      const int64_t n = x.numel();
#pragma omp parallel for simd if (parallel : n > 32768)
      for (int64_t i = 0; i < n; ++i) ys[i] += T(alpha) * xs[i];
    });
  }

  void scale(Tensor& x, float alpha) override {
    check_contig(x, "scale", "x");
    dispatch_float(x.dtype(), "scale", [&]<typename T>() {
      T* xs = x.data<T>();
      const int64_t n = x.numel();
#pragma omp parallel for simd if (parallel : n > 32768)
      for (int64_t i = 0; i < n; ++i) xs[i] *= T(alpha);
    });
  }

  double sum_squares(const Tensor& x) override {
    check_contig(x, "sum_squares", "x");
    return dispatch_float(x.dtype(), "sum_squares", [&]<typename T>() {
      const T* xs = x.data<T>();
      const int64_t n = x.numel();
      double s = 0;
#pragma omp parallel for simd reduction(+ : s) if (parallel : n > 32768)
      for (int64_t i = 0; i < n; ++i) s += double(xs[i]) * double(xs[i]);
      return s;
    });
  }

  double sum(const Tensor& x) override {
    check_contig(x, "sum", "x");
    return dispatch_float(x.dtype(), "sum", [&]<typename T>() {
      const T* xs = x.data<T>();
      const int64_t n = x.numel();
      double s = 0;
#pragma omp parallel for simd reduction(+ : s) if (parallel : n > 32768)
      for (int64_t i = 0; i < n; ++i) s += double(xs[i]);
      return s;
    });
  }

  bool all_finite(const Tensor& x) override {
    check_contig(x, "all_finite", "x");
    return dispatch_float(x.dtype(), "all_finite", [&]<typename T>() {
      const T* xs = x.data<T>();
      const int64_t n = x.numel();
      int bad = 0;
#pragma omp parallel for reduction(| : bad) if (n > 32768)
      for (int64_t i = 0; i < n; ++i) bad |= !std::isfinite(xs[i]);
      return bad == 0;
    });
  }

  void embedding_forward(const Tensor& weight, const Tensor& ids, Tensor& out) override {
    check_contig(weight, "embedding", "weight"), check_contig(ids, "embedding", "ids");
    const int64_t n = ids.numel(), d = weight.size(1), v = weight.size(0);
    const int32_t* id = ids.data<int32_t>();
    for (int64_t i = 0; i < n; ++i)
      LLAMA3_CHECK(id[i] >= 0 && id[i] < v,
                   "embedding: token id {} at position {} outside vocab {}", id[i], i, v);
    dispatch_float(weight.dtype(), "embedding", [&]<typename T>() {
      const T* w = weight.data<T>();
      T* o = out.data<T>();
#pragma omp parallel for if (n * d > 65536)
      for (int64_t i = 0; i < n; ++i) std::memcpy(o + i * d, w + int64_t(id[i]) * d, d * sizeof(T));
    });
  }

  void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dweight) override {
    const int64_t n = ids.numel(), d = dweight.size(1);
    const int32_t* id = ids.data<int32_t>();
    dispatch_float(dweight.dtype(), "embedding_backward", [&]<typename T>() {
      const T* g = dout.data<T>();
      T* dw = dweight.data<T>();
      // Parallel over the embedding dimension: rows may repeat, columns never collide.
      const int nt = cpu_threads();
#pragma omp parallel num_threads(nt) if (n * d > 65536)
      {
        const int t = omp_get_thread_num(), k = omp_get_num_threads();
        const int64_t c0 = d * t / k, c1 = d * (t + 1) / k;
        for (int64_t i = 0; i < n; ++i) {
          T* row = dw + int64_t(id[i]) * d;
          const T* gr = g + i * d;
#pragma omp simd
          for (int64_t c = c0; c < c1; ++c) row[c] += gr[c];
        }
      }
    });
  }

  void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y,
                       Tensor& rstd) override {
    if (y.dtype() != x.dtype()) {  // a bf16 output for bf16 GEMM inputs: rounded once
      LLAMA3_CHECK(x.dtype() == DType::f32 && y.dtype() == DType::bf16,
                   "rmsnorm: y {} must have x's dtype {} or be bf16 for f32 x", y.str(),
                   dtype_name(x.dtype()));
      Tensor y32 = Tensor::empty(y.shape(), DType::f32, y.device());
      rmsnorm_forward(x, w, eps, y32, rstd);
      y.copy_(y32);
      return;
    }
    const int64_t d = x.size(-1), n = x.numel() / d;
    dispatch_float(x.dtype(), "rmsnorm", [&]<typename T>() {
      const T *xs = x.data<T>(), *ws = w.data<T>();
      T* ys = y.data<T>();
      T* rs = rstd.data<T>();
#pragma omp parallel for if (n * d > 32768)
      for (int64_t i = 0; i < n; ++i) {
        const T* xr = xs + i * d;
        T ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < d; ++c) ss += xr[c] * xr[c];
        T r = T(1) / std::sqrt(ss / T(d) + T(eps));
        rs[i] = r;
        T* yr = ys + i * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) yr[c] = xr[c] * r * ws[c];
      }
    });
  }

  void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                        Tensor& dx, Tensor& dw, bool accumulate_dx) override {
    const int64_t d = x.size(-1), n = x.numel() / d;
    dispatch_float(x.dtype(), "rmsnorm_backward", [&]<typename T>() {
      const T *xs = x.data<T>(), *ws = w.data<T>(), *g = dy.data<T>(), *rs = rstd.data<T>();
      T* dxs = dx.data<T>();
      T* dws = dw.data<T>();
      const int nt = cpu_threads();
      // dw is reduced over rows: per-thread partial sums, then added.
      std::vector<T> partial(size_t(nt) * d, T(0));
      std::vector<T> rowbuf(accumulate_dx ? size_t(nt) * d : 0);
#pragma omp parallel num_threads(nt) if (n * d > 32768)
      {
        T* acc = partial.data() + size_t(omp_get_thread_num()) * d;
#pragma omp for
        for (int64_t i = 0; i < n; ++i) {
          const T *xr = xs + i * d, *gr = g + i * d;
          const T r = rs[i];
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < d; ++c) dot += gr[c] * ws[c] * xr[c];
          const T k = dot * r * r / T(d);
          T* dr = dxs + i * d;
          if (accumulate_dx) {
            // The row's dx through a scratch row, then added: each term rounded to T first,
            // as a separate add would (no multiply-add contraction into the sum).
            T* tmp = rowbuf.data() + size_t(omp_get_thread_num()) * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) {
              tmp[c] = r * (gr[c] * ws[c] - xr[c] * k);
              acc[c] += gr[c] * xr[c] * r;
            }
            for (int64_t c = 0; c < d; ++c) dr[c] += tmp[c];
          } else {
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) {
              dr[c] = r * (gr[c] * ws[c] - xr[c] * k);
              acc[c] += gr[c] * xr[c] * r;
            }
          }
        }
      }
      for (int t = 0; t < nt; ++t)
        for (int64_t c = 0; c < d; ++c) dws[c] += partial[size_t(t) * d + c];
    });
  }

  void rope(const Tensor& x, const Tensor& inv_freq, const Tensor& pos, bool inverse,
            Tensor& out) override {
    const int64_t b = x.size(0), t = x.size(1), h = x.size(2), dh = x.size(3), half = dh / 2;
    const int32_t* ps = pos.data<int32_t>();
    LLAMA3_CHECK(inv_freq.dtype() == x.dtype(), "rope: inv_freq {} must have x's dtype ({})",
                 inv_freq.str(), x.str());
    dispatch_float(x.dtype(), "rope", [&]<typename T>() {
      const T* f = inv_freq.data<T>();
      // cos/sin table (T, half): angle computed in T (f32 or f64) like the HF reference. A step
      // applies RoPE to q and k of every layer, forward and backward, with the same positions, so
      // the last table is kept (per thread) and reused while positions and frequencies match.
      struct Table {
        std::vector<int32_t> pos;
        std::vector<T> freq, cs, sn;
      };
      static thread_local Table tab;
      if (tab.pos.size() != size_t(t) || tab.freq.size() != size_t(half) ||
          !std::equal(ps, ps + t, tab.pos.begin()) || !std::equal(f, f + half, tab.freq.begin())) {
        tab.pos.assign(ps, ps + t), tab.freq.assign(f, f + half);
        tab.cs.resize(size_t(t) * half), tab.sn.resize(size_t(t) * half);
        for (int64_t i = 0; i < t; ++i)
          for (int64_t j = 0; j < half; ++j) {
            T a = T(ps[i]) * f[j];
            tab.cs[i * half + j] = std::cos(a);
            tab.sn[i * half + j] = std::sin(a);
          }
      }
      const std::vector<T>& cs = tab.cs;
      const std::vector<T>& sn = tab.sn;
      const T sign = inverse ? T(-1) : T(1);
      const T* xs = x.data<T>();
      T* os = out.data<T>();
#pragma omp parallel for collapse(2) if (b * t * h * dh > 32768)
      for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t ti = 0; ti < t; ++ti) {
          const T *c = &cs[ti * half], *s = &sn[ti * half];
          for (int64_t hi = 0; hi < h; ++hi) {
            const T* xr = xs + ((bi * t + ti) * h + hi) * dh;
            T* orow = os + ((bi * t + ti) * h + hi) * dh;
#pragma omp simd
            for (int64_t j = 0; j < half; ++j) {
              T x1 = xr[j], x2 = xr[j + half];
              const T sj = sign * s[j];
              orow[j] = x1 * c[j] - x2 * sj;
              orow[j + half] = x2 * c[j] + x1 * sj;
            }
          }
        }
    });
  }

  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                         const AttentionParams& p, Tensor& out, Tensor& lse) override {
    cpu::attention_forward(q, k, v, p, out, lse);
  }
  void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& lse, const AttentionParams& p,
                          Tensor& dq, Tensor& dk, Tensor& dv) override {
    cpu::attention_backward(dout, q, k, v, out, lse, p, dq, dk, dv);
  }

  void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) override {
    if (gate.dtype() == DType::bf16) {  // bf16 activations: computed in f32, rounded once
      Tensor o32 = Tensor::empty(out.shape(), DType::f32, out.device());
      swiglu_forward(gate.to(DType::f32), up.to(DType::f32), o32);
      out.copy_(o32);
      return;
    }
    const int64_t n = gate.numel();
    dispatch_float(gate.dtype(), "swiglu", [&]<typename T>() {
      const T *g = gate.data<T>(), *u = up.data<T>();
      T* o = out.data<T>();
#pragma omp parallel for simd if (parallel : n > 32768)
      for (int64_t i = 0; i < n; ++i) {
        T s = T(1) / (T(1) + cpu::fast_exp(-g[i]));
        o[i] = g[i] * s * u[i];
      }
    });
  }

  void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                       Tensor& dup) override {
    if (gate.dtype() == DType::bf16) {  // as the forward: f32 math, bf16 results
      Tensor dg32 = Tensor::empty(dgate.shape(), DType::f32, dgate.device()),
             du32 = Tensor::empty(dup.shape(), DType::f32, dup.device());
      swiglu_backward(dout.to(DType::f32), gate.to(DType::f32), up.to(DType::f32), dg32, du32);
      dgate.copy_(dg32), dup.copy_(du32);
      return;
    }
    const int64_t n = gate.numel();
    dispatch_float(gate.dtype(), "swiglu_backward", [&]<typename T>() {
      const T *g = gate.data<T>(), *u = up.data<T>(), *d = dout.data<T>();
      T *dg = dgate.data<T>(), *du = dup.data<T>();
#pragma omp parallel for simd if (parallel : n > 32768)
      for (int64_t i = 0; i < n; ++i) {
        T s = T(1) / (T(1) + cpu::fast_exp(-g[i]));
        T silu = g[i] * s;
        du[i] = d[i] * silu;
        dg[i] = d[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
      }
    });
  }

  double linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                              int64_t chunk, float grad_scale, Tensor* dh, Tensor* dw,
                              Tensor* loss_out = nullptr, double loss_div = 1.0) override {
    if (loss_out && loss_div == 0.0) {  // the mean over the targets >= 0, counted here
      int64_t n = 0;
      const int32_t* t = targets.data<int32_t>();
      for (int64_t i = 0; i < targets.numel(); ++i) n += t[i] >= 0;
      LLAMA3_CHECK(n > 0, "linear_cross_entropy: no target >= 0 among {} rows", targets.numel());
      loss_div = double(n);
      grad_scale = float(1.0 / loss_div);
    }
    const double total = cpu::linear_cross_entropy(h, w, targets, chunk, grad_scale, dh, dw);
    if (!loss_out) return total;
    LLAMA3_CHECK(loss_out->numel() == 1 && loss_out->dtype() == DType::f32,
                 "linear_cross_entropy: loss_out {} must be one f32 element", loss_out->str());
    fill(*loss_out, total / loss_div);
    return 0.0;
  }
  void vocab_shard_max(const Tensor& logits, Tensor& mx) override {
    cpu::vocab_shard_max(logits, mx);
  }
  void vocab_shard_stats(const Tensor& logits, const Tensor& mx, const Tensor& targets, int64_t v0,
                         Tensor& sum_exp, Tensor& target_logit) override {
    cpu::vocab_shard_stats(logits, mx, targets, v0, sum_exp, target_logit);
  }
  void vocab_shard_dlogits(Tensor& logits, const Tensor& mx, const Tensor& sum_exp,
                           const Tensor& targets, int64_t v0, float scale) override {
    cpu::vocab_shard_dlogits(logits, mx, sum_exp, targets, v0, scale);
  }
  void vocab_row_loss(const Tensor& mx, const Tensor& sum_exp, const Tensor& target_logit,
                      const Tensor& targets, Tensor& loss, Tensor& valid) override {
    cpu::vocab_row_loss(mx, sum_exp, target_logit, targets, loss, valid);
  }

  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p,
                  Tensor* param_bf16 = nullptr) override {
    const int64_t n = param.numel();
    if (param_bf16)
      LLAMA3_CHECK(
          param_bf16->dtype() == DType::bf16 && param_bf16->numel() == n &&
              param_bf16->is_contiguous() && param.dtype() == DType::f32,
          "adamw: the bf16 copy {} of param {} must be contiguous bf16 of f32 param's size",
          param_bf16->str(), param.str());
    dispatch_float(param.dtype(), "adamw", [&]<typename T>() {
      T *ps = param.data<T>(), *ms = m.data<T>(), *vs = v.data<T>();
      const T* gs = grad.data<T>();
      // Same arithmetic order as torch.optim.AdamW (single-tensor path).
      const T bc1 =
          T(1) - std::pow(T(p.beta1), T(p.step));  // as torch 1.13 / 2.x single-tensor AdamW
      const T bc2 = T(1) - std::pow(T(p.beta2), T(p.step));
      T step_size = T(p.lr) / bc1;
      T bc2_sqrt = std::sqrt(bc2);
      T decay = T(1) - T(p.lr) * T(p.weight_decay);
      const T b1 = p.beta1, b2 = p.beta2, eps = p.eps;
      T gsc = p.grad_scale;
      if (p.dynamic.defined()) {  // the values a captured step reads when it runs
        LLAMA3_CHECK(p.dynamic.dtype() == DType::f32 && p.dynamic.numel() == AdamWDynamic::size &&
                         p.dynamic.is_contiguous(),
                     "adamw: dynamic {} must be {} contiguous f32", p.dynamic.str(),
                     int64_t(AdamWDynamic::size));
        const float* d = p.dynamic.data<float>();
        if (d[AdamWDynamic::skip] != 0.f) return;
        gsc = d[AdamWDynamic::grad_scale];
        step_size = d[AdamWDynamic::step_size], bc2_sqrt = d[AdamWDynamic::bc2_sqrt];
        decay = p.weight_decay != 0.f ? T(d[AdamWDynamic::decay]) : T(1);
      }
#pragma omp parallel for simd if (parallel : n > 32768)
      for (int64_t i = 0; i < n; ++i) {
        T g = gs[i] * gsc;
        ps[i] *= decay;
        ms[i] = ms[i] * b1 + (T(1) - b1) * g;
        vs[i] = vs[i] * b2 + (T(1) - b2) * g * g;
        T denom = std::sqrt(vs[i]) / bc2_sqrt + eps;
        ps[i] -= step_size * ms[i] / denom;
      }
      if constexpr (std::is_same_v<T, float>) {
        if (param_bf16) {
          uint16_t* c = static_cast<uint16_t*>(param_bf16->data_ptr());
#pragma omp parallel for simd if (parallel : n > 32768)
          for (int64_t i = 0; i < n; ++i) c[i] = f32_to_bf16_bits(ps[i]);
        }
      }
    });
  }
};

}  // namespace

int cpu_threads() {
  return omp_get_max_threads();
}

Backend& cpu_backend() {
  static CpuBackend* b = new CpuBackend();
  return *b;
}

}  // namespace llama3
