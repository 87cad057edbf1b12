// Cross-entropy fused with the output projection, chunked over rows: for each chunk the
// logits (chunk, V) are computed, turned into the loss and - when gradients are wanted - into
// dlogits in place, which immediately yields dh for the chunk and is accumulated into dw.
// Full-vocabulary logits therefore exist for one chunk at a time, never for the batch.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
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
      if (dw) gemm(g, Trans::T, hc, Trans::N, *dw, 1.f, r0 == 0 ? 0.f : 1.f);
    }
  }
  (void)D;
  return total;
}

namespace {
// The shapes every vocab_* kernel expects (backend.h): logits (C, V) f32, vectors (C).
int64_t vocab_rows(const char* op, const Tensor& logits, const Tensor& targets,
                   std::initializer_list<const Tensor*> vecs) {
  LLAMA3_CHECK(logits.dim() == 2 && logits.dtype() == DType::f32 && logits.is_contiguous(),
               "{}: logits {} must be contiguous (C, V) f32", op, logits.str());
  const int64_t C = logits.size(0);
  LLAMA3_CHECK(!targets.defined() || (targets.dtype() == DType::i32 && targets.numel() == C &&
                                      targets.is_contiguous()),
               "{}: targets {} must be {} contiguous int32", op, targets.str(), C);
  for (const Tensor* v : vecs)
    LLAMA3_CHECK(v->dtype() == DType::f32 && v->numel() == C && v->is_contiguous(),
                 "{}: {} must be {} contiguous f32", op, v->str(), C);
  return C;
}
}  // namespace

void vocab_shard_max(const Tensor& logits, Tensor& mx) {
  const int64_t C = vocab_rows("vocab_shard_max", logits, Tensor(), {&mx}), V = logits.size(1);
  const float* L = logits.data<float>();
  float* m = mx.data<float>();
#pragma omp parallel for if (C * V > 32768)
  for (int64_t i = 0; i < C; ++i) {
    const float* row = L + i * V;
    float r = row[0];
#pragma omp simd reduction(max : r)
    for (int64_t j = 1; j < V; ++j) r = std::max(r, row[j]);
    m[i] = r;
  }
}

void vocab_shard_stats(const Tensor& logits, const Tensor& mx, const Tensor& targets, int64_t v0,
                       Tensor& sum_exp, Tensor& target_logit) {
  const int64_t C =
      vocab_rows("vocab_shard_stats", logits, targets, {&mx, &sum_exp, &target_logit});
  const int64_t V = logits.size(1);
  const float *L = logits.data<float>(), *m = mx.data<float>();
  const int32_t* tg = targets.data<int32_t>();
  float *se = sum_exp.data<float>(), *tl = target_logit.data<float>();
#pragma omp parallel for if (C * V > 32768)
  for (int64_t i = 0; i < C; ++i) {
    const float* row = L + i * V;
    const float mi = m[i];
    float s = 0;  // as row_loss above: f32 with fast_exp (SIMD lanes sum separately)
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < V; ++j) s += fast_exp(row[j] - mi);
    se[i] = s;
    const int64_t t = int64_t(tg[i]) - v0;
    tl[i] = tg[i] >= 0 && t >= 0 && t < V ? row[t] : 0.f;
  }
}

void vocab_shard_dlogits(Tensor& logits, const Tensor& mx, const Tensor& sum_exp,
                         const Tensor& targets, int64_t v0, float scale) {
  const int64_t C = vocab_rows("vocab_shard_dlogits", logits, targets, {&mx, &sum_exp});
  const int64_t V = logits.size(1);
  float* L = logits.data<float>();
  const float *m = mx.data<float>(), *se = sum_exp.data<float>();
  const int32_t* tg = targets.data<int32_t>();
#pragma omp parallel for if (C * V > 32768)
  for (int64_t i = 0; i < C; ++i) {
    float* row = L + i * V;
    if (tg[i] < 0) {
      std::fill_n(row, V, 0.f);
      continue;
    }
    const float mi = m[i], inv = scale / se[i];
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) row[j] = fast_exp(row[j] - mi) * inv;
    const int64_t t = int64_t(tg[i]) - v0;
    if (t >= 0 && t < V) row[t] -= scale;
  }
}

void vocab_row_loss(const Tensor& mx, const Tensor& sum_exp, const Tensor& target_logit,
                    const Tensor& targets, Tensor& loss, Tensor& valid) {
  const int64_t C = mx.numel();
  for (const Tensor* v :
       std::initializer_list<const Tensor*>{&mx, &sum_exp, &target_logit, &loss, &valid})
    LLAMA3_CHECK(v->dtype() == DType::f32 && v->numel() == C && v->is_contiguous(),
                 "vocab_row_loss: {} must be {} contiguous f32", v->str(), C);
  LLAMA3_CHECK(targets.dtype() == DType::i32 && targets.numel() == C && targets.is_contiguous(),
               "vocab_row_loss: targets {} must be {} contiguous int32", targets.str(), C);
  const float *m = mx.data<float>(), *se = sum_exp.data<float>(), *tl = target_logit.data<float>();
  const int32_t* tg = targets.data<int32_t>();
  float *l = loss.data<float>(), *v = valid.data<float>();
  for (int64_t i = 0; i < C; ++i) {
    const bool ok = tg[i] >= 0;
    l[i] = ok ? std::log(se[i]) + m[i] - tl[i] : 0.f;
    v[i] = ok ? 1.f : 0.f;
  }
}

}  // namespace llama3::cpu
