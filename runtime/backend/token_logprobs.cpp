// Backend::token_logprobs, the device-generic implementation: chunked GEMMs on the device,
// log-softmax and its gradient on the host (one chunk of logits at a time).
#include <cmath>
#include <vector>

#include "runtime/backend/backend.h"

namespace llama3 {

namespace {
Tensor host_to(const std::vector<double>& v, const Shape& s, DType dt, Device d) {
  if (dt == DType::f64) return Tensor::from_vector(v, s, d);
  std::vector<float> f(v.begin(), v.end());
  return Tensor::from_vector(f, s, d);
}
}  // namespace

void Backend::token_logprobs(const Tensor& h, const Tensor& w, const Tensor& targets, int64_t chunk,
                             Tensor& logp, const Tensor& row_grad, Tensor* dh, Tensor* dw) {
  LLAMA3_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1) && targets.numel() == h.size(0),
               "token_logprobs: h {} (N, D), w {} (V, D), targets {} (N)", h.str(), w.str(), targets.str());
  const int64_t N = h.size(0), V = w.size(0);
  const DType acc = h.dtype() == DType::f64 ? DType::f64 : DType::f32;
  LLAMA3_CHECK(h.dtype() == w.dtype() && h.dtype() == acc,
               "token_logprobs: h {} and w {} must both be f32 or f64", h.str(), w.str());
  const std::vector<int32_t> tg = targets.to_vector<int32_t>();
  for (int64_t i = 0; i < N; ++i)
    LLAMA3_CHECK(tg[i] < V, "token_logprobs: target {} at row {} outside vocab {}", tg[i], i, V);
  const bool grad = row_grad.defined();
  std::vector<double> rg;
  if (grad) rg = row_grad.to_vector<double>();
  if (chunk <= 0) chunk = N;
  std::vector<double> out(N, 0.0);
  Tensor logits = Tensor::empty({std::min(chunk, N), V}, acc, h.device());
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t nr = std::min(chunk, N - r0);
    Tensor hc = h.narrow(0, r0, nr);
    Tensor lc = logits.narrow(0, 0, nr);
    gemm(hc, Trans::N, w, Trans::T, lc, 1.f, 0.f);
    std::vector<double> L = lc.to_vector<double>();
#pragma omp parallel for
    for (int64_t i = 0; i < nr; ++i) {
      double* row = L.data() + i * V;
      const int32_t t = tg[r0 + i];
      if (t < 0) {
        std::fill_n(row, V, 0.0);
        continue;
      }
      double mx = row[0];
      for (int64_t j = 1; j < V; ++j) mx = std::max(mx, row[j]);
      double s = 0;
      for (int64_t j = 0; j < V; ++j) s += std::exp(row[j] - mx);
      const double lse = mx + std::log(s);
      out[r0 + i] = row[t] - lse;
      if (grad) {  // d logp / d logits = onehot - softmax, times the row's weight
        const double g = rg[r0 + i];
        for (int64_t j = 0; j < V; ++j) row[j] = -g * std::exp(row[j] - lse);
        row[t] += g;
      }
    }
    if (grad) {
      Tensor g = host_to(L, {nr, V}, acc, h.device());
      Tensor dhc = dh->narrow(0, r0, nr);
      gemm(g, Trans::N, w, Trans::N, dhc, 1.f, 0.f);
      if (dw) gemm(g, Trans::T, hc, Trans::N, *dw, 1.f, 1.f);
    }
  }
  logp = host_to(out, {N}, acc, h.device());
}

}  // namespace llama3
