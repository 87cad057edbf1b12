// Cross-entropy fused with the output projection, chunked over rows: for each chunk the
// logits (chunk, V) are computed, turned into the loss and - when gradients are wanted - into
// dlogits in place, which immediately yields dh for the chunk and is accumulated into dw.
// Full-vocabulary logits therefore exist for one chunk at a time, never for the batch.
#include <omp.h>

#include <cmath>
#include <vector>

#include "runtime/cpu/kernels.h"
#include "runtime/cpu/vec.h"

namespace llama3::cpu {

namespace {

// Loss of one row of logits; if `grad`, overwrites the row with d(loss*scale)/dlogits.
template <typename T>
double row_loss(T* row, int64_t V, int32_t target, bool grad, T scale) {
  T mx = row[0];
  // (The simd clause matters: a plain max loop is a serial dependency chain over V.)
#pragma omp simd reduction(max : mx)
  for (int64_t j = 1; j < V; ++j) mx = std::max(mx, row[j]);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < V; ++j) sum += fast_exp(row[j] - mx);
  const T lse = mx + std::log(sum);
  const double loss = double(lse - row[target]);
  if (grad) {
    const T inv = scale / sum;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) row[j] = fast_exp(row[j] - mx) * inv;
    row[target] -= scale;
  }
  return loss;
}

}  // namespace

double linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets, int64_t chunk,
                            float grad_scale, Tensor* dh, Tensor* dw) {
  LLAMA3_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1),
               "linear_cross_entropy: h {} and w {} must be (N, D) and (V, D)", h.str(), w.str());
  const int64_t N = h.size(0), V = w.size(0), D = h.size(1);
  const int32_t* tg = targets.data<int32_t>();
  for (int64_t i = 0; i < N; ++i)
    LLAMA3_CHECK(tg[i] < V, "cross_entropy: target {} at row {} outside vocab {}", tg[i], i, V);
  const bool grad = dh != nullptr;
  const DType acc_t = h.dtype() == DType::f64 ? DType::f64 : DType::f32;
  const bool low = h.dtype() == DType::bf16;
  if (chunk <= 0) chunk = N;
  Tensor logits = Tensor::empty({std::min(chunk, N), V}, acc_t);
  Tensor dlow;  // bf16 copy of dlogits for bf16 GEMMs
  double total = 0;
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t nr = std::min(chunk, N - r0);
    Tensor hc = h.narrow(0, r0, nr);
    Tensor lc = logits.narrow(0, 0, nr);
    gemm(hc, Trans::N, w, Trans::T, lc, 1.f, 0.f);
    double part = 0;
    if (acc_t == DType::f32) {
      float* L = lc.data<float>();
#pragma omp parallel for reduction(+ : part)
      for (int64_t i = 0; i < nr; ++i) {
        if (tg[r0 + i] < 0) {
          if (grad) std::fill_n(L + i * V, V, 0.f);
          continue;
        }
        part += row_loss<float>(L + i * V, V, tg[r0 + i], grad, grad_scale);
      }
    } else {
      double* L = lc.data<double>();
#pragma omp parallel for reduction(+ : part)
      for (int64_t i = 0; i < nr; ++i) {
        if (tg[r0 + i] < 0) {
          if (grad) std::fill_n(L + i * V, V, 0.0);
          continue;
        }
        part += row_loss<double>(L + i * V, V, tg[r0 + i], grad, grad_scale);
      }
    }
    total += part;
    if (grad) {
      Tensor dhc = dh->narrow(0, r0, nr);
      Tensor g = lc;
      if (low) {
        if (!dlow.defined()) dlow = Tensor::empty(logits.shape(), DType::bf16);
        g = dlow.narrow(0, 0, nr);
        g.copy_(lc);
      }
      gemm(g, Trans::N, w, Trans::N, dhc, 1.f, 0.f);
      if (dw) gemm(g, Trans::T, hc, Trans::N, *dw, 1.f, 1.f);
    }
  }
  (void)D;
  return total;
}

}  // namespace llama3::cpu
