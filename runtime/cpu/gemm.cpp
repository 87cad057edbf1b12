// GEMM on the CPU through oneDNN 2.6's matmul primitive (v2 API: matmul::desc). Primitives
// are cached by shape/layout, so a training step pays their creation once.
#include <dnnl.hpp>

#include <map>
#include <mutex>
#include <tuple>

#include "runtime/cpu/cpu_backend.h"

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

using Key = std::tuple<int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                       float>;

dnnl::matmul& primitive(memory::data_type dt, Trans ta, Trans tb, int64_t m, int64_t n,
                        int64_t k, int64_t lda, int64_t ldb, int64_t ldc, float alpha, float beta) {
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

void cpu_gemm_f32(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
                  const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc) {
  run(memory::data_type::f32, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cpu_gemm_bf16(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
                   const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float beta, float* c,
                   int64_t ldc) {
  run(memory::data_type::bf16, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
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
    LLAMA3_CHECK(a.size(0) == c.size(0) && b.size(0) == c.size(0), "gemm: batch of a {}, b {}, c {}",
                 a.str(), b.str(), c.str());
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
  } else if (a.dtype() == DType::f64 && b.dtype() == DType::f64 && c.dtype() == DType::f64) {
    gemm_reference<double>(ta, tb, m, n, k, alpha, a.data<double>(), lda, b.data<double>(), ldb,
                           beta, c.data<double>(), ldc);
  } else {
    fail("gemm: dtypes a {}, b {}, c {} unsupported (supported: f32 x f32 -> f32, bf16 x bf16 -> "
         "f32, f64 x f64 -> f64)",
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
    std::vector<bf16> ab(n * n, bf16{f32_to_bf16_bits(0.5f)}), bb(n * n, bf16{f32_to_bf16_bits(0.25f)});
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = clk::now();
      if (bf16_inputs)
        cpu_gemm_bf16(Trans::N, Trans::N, n, n, n, 1.f, ab.data(), n, bb.data(), n, 0.f, c.data(), n);
      else
        cpu_gemm_f32(Trans::N, Trans::N, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
      const double s = std::chrono::duration<double>(clk::now() - t0).count();
      if (rep > 0) best = std::max(best, 2.0 * double(n) * double(n) * double(n) / s);
    }
  }
  return best;
}

}  // namespace llama3
