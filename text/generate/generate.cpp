#include "text/generate/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <optional>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "runtime/autograd/autograd.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cpu/vec.h"

namespace llama3::text {

KvCache::KvCache(const LlamaConfig& c, int64_t batch, int64_t max_len)
    : n_layers_(c.n_layers),
      batch_(batch),
      max_len_(max_len),
      kv_dim_(c.n_kv_heads * c.head_dim()),
      k_(static_cast<size_t>(c.n_layers)),
      v_(static_cast<size_t>(c.n_layers)),
      len_(size_t(batch), 0) {
  for (auto& x : k_) x.assign(size_t(batch * max_len * kv_dim_), 0.f);
  for (auto& x : v_) x.assign(size_t(batch * max_len * kv_dim_), 0.f);
}
float* KvCache::k(int64_t l, int64_t b, int64_t pos) {
  return k_[size_t(l)].data() + (b * max_len_ + pos) * kv_dim_;
}
float* KvCache::v(int64_t l, int64_t b, int64_t pos) {
  return v_[size_t(l)].data() + (b * max_len_ + pos) * kv_dim_;
}

DecodeWeights::DecodeWeights(const LlamaModel& m) {
  autograd::NoGradGuard ng;
  auto fused = [](std::initializer_list<const Tensor*> parts) {
    int64_t rows = 0;
    for (const Tensor* w : parts) rows += w->size(0);
    const Tensor& first = **parts.begin();
    Tensor out = Tensor::empty({rows, first.size(1)}, DType::bf16, first.device());
    int64_t at = 0;
    for (const Tensor* w : parts) {
      out.narrow(0, at, w->size(0)).copy_(*w);
      at += w->size(0);
    }
    return out;
  };
  auto prepare = [](Tensor w16) {  // (n, k) bf16 -> the decode form
    DecodeWeight d{w16, w16.size(0), w16.size(1), false};
    if (!w16.device().is_cpu()) return d;
    Tensor p = Tensor::empty({cpu_packed_bf16_elems(d.n, d.k)}, DType::bf16);
    cpu_pack_bf16_panels(w16.contiguous().data<bf16>(), d.n, d.k, d.k, p.data<bf16>());
    return DecodeWeight{p, d.n, d.k, true};
  };
  for (const Block* b : m.blocks()) {
    const Attention& a = b->self_attn;
    const Mlp& f = b->mlp;
    layers.push_back({prepare(fused({&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight})),
                      prepare(a.o_proj.weight.to(DType::bf16)),
                      prepare(fused({&f.gate_proj.weight, &f.up_proj.weight})),
                      prepare(f.down_proj.weight.to(DType::bf16))});
  }
  lm_head = prepare(m.lm_head().weight.to(DType::bf16));
}

Tensor decode_linear(const Tensor& x, const DecodeWeight& w, ops::Precision prec) {
  if (!w.packed) return ops::linear(x, w.w, prec);
  LLAMA3_CHECK(x.device().is_cpu() && x.size(-1) == w.k,
               "decode_linear: input {} for a packed ({}, {}) weight", x.str(), w.n, w.k);
  const Tensor a = x.to(DType::bf16).contiguous();
  Shape shape = x.shape();
  shape.back() = w.n;
  Tensor out = Tensor::empty(shape, DType::f32);
  cpu_gemm_bf16_packed(a.numel() / w.k, w.n, w.k, a.data<bf16>(), w.k, w.w.data<bf16>(),
                       out.data<float>(), w.n);
  return out;
}

namespace {
// s[j] = scale * q . k_j for n cached keys k_j = k0 + j * stride (Dh floats each). 16 keys at
// a time: each key's products summed into one vector, the 16 vectors reduced together
// (cpu::reduce16) instead of one horizontal sum per key.
void key_scores(const float* q, const float* k0, int64_t stride, int64_t n, int64_t Dh, float scale,
                float* s, const float* vpf) {
  int64_t j0 = 0;
#if defined(__AVX512F__)
  for (; j0 + 16 <= n; j0 += 16) {
    __m512 d[16];
    for (int jj = 0; jj < 16; ++jj) {
      const float* kj = k0 + (j0 + jj) * stride;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t e = 0; e < Dh; e += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(kj + 16 * stride + e), _MM_HINT_T0);
        if (vpf)
          _mm_prefetch(reinterpret_cast<const char*>(vpf + (j0 + jj) * stride + e), _MM_HINT_T0);
        const __mmask16 m = Dh - e >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (Dh - e)) - 1);
        acc =
            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + e), _mm512_maskz_loadu_ps(m, kj + e), acc);
      }
      d[jj] = acc;
    }
    _mm512_storeu_ps(s + j0, _mm512_mul_ps(cpu::reduce16(d), _mm512_set1_ps(scale)));
  }
#endif
  for (; j0 < n; ++j0) {
    const float* kj = k0 + j0 * stride;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t e = 0; e < Dh; ++e) acc += q[e] * kj[e];
    s[j0] = acc * scale;
  }
}

// The attention of `group` query heads (q: group x Dh, consecutive) sharing one kv head to n
// cached positions (k0 / v0 + j * stride): out (group x Dh). A whole group per call, so its
// heads after the first read the cached keys and values from this core's L1.
void attend_group(const float* q, const float* k0, const float* v0, int64_t stride, int64_t n,
                  int64_t Dh, int64_t group, float scale, std::vector<float>& s, float* out) {
  s.resize(static_cast<size_t>(n));
  float* sp = s.data();
  for (int64_t g = 0; g < group; ++g) {
    key_scores(q + g * Dh, k0, stride, n, Dh, scale, sp, g == 0 ? v0 : nullptr);
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sp[j]);
    // The vectorised exp of the training kernels (std::exp is scalar: it took most of this
    // loop's time).
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) sum += (sp[j] = cpu::fast_exp(sp[j] - mx));
    const float inv = 1.f / sum;
    float* ov = out + g * Dh;
    // Output features summed over all keys in registers (summing into ov would store and
    // reload it once per key), 64 at a time: one pass over the values.
    int64_t e0 = 0;
#if defined(__AVX512F__)
    for (; e0 + 64 <= Dh; e0 += 64) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < n; ++j) {
        const __m512 p = _mm512_set1_ps(sp[j] * inv);
        const float* vj = v0 + j * stride + e0;
        a0 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj), a0);
        a1 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + 16), a1);
        a2 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + 32), a2);
        a3 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + 48), a3);
      }
      _mm512_storeu_ps(ov + e0, a0), _mm512_storeu_ps(ov + e0 + 16, a1);
      _mm512_storeu_ps(ov + e0 + 32, a2), _mm512_storeu_ps(ov + e0 + 48, a3);
    }
#endif
    for (; e0 < Dh; e0 += 16) {
      const int64_t w = std::min<int64_t>(16, Dh - e0);
      float acc[16] = {};
      for (int64_t j = 0; j < n; ++j) {
        const float* vj = v0 + j * stride + e0;
        const float p = sp[j] * inv;
        for (int64_t e = 0; e < w; ++e) acc[e] += p * vj[e];
      }
      std::copy_n(acc, w, ov + e0);
    }
  }
}
}  // namespace

Tensor forward_cached(const LlamaModel& m, KvCache& cache, const std::vector<int64_t>& rows,
                      const std::vector<int32_t>& tokens, int64_t T, const DecodeWeights* dw) {
  autograd::NoGradGuard ng;
  const LlamaConfig& c = m.config();
  const int64_t R = int64_t(rows.size()), D = c.dim, H = c.n_heads, Hkv = c.n_kv_heads,
                Dh = c.head_dim();
  const int64_t group = H / Hkv;
  LLAMA3_CHECK(int64_t(tokens.size()) == R * T, "forward_cached: {} tokens for {} rows x {}",
               tokens.size(), R, T);
  for (int64_t r = 0; r < R; ++r)
    LLAMA3_CHECK(cache.length(rows[r]) + T <= cache.max_len(),
                 "generate: row {} would reach {} positions, cache holds {}", rows[r],
                 cache.length(rows[r]) + T, cache.max_len());
  const Device dev = m.embed_tokens().weight.device();
  const ops::Precision prec = m.options().precision;
  const float scale = 1.f / std::sqrt(float(Dh));
  // Positions of the new tokens. A decode step (T == 1) ropes every row in one call with the
  // rows as the op's time axis, each at its own position; otherwise row by row.
  const bool rows_as_time = T == 1 && R > 1;
  std::vector<Tensor> pos;
  if (rows_as_time) {
    std::vector<int32_t> p(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) p[size_t(r)] = int32_t(cache.length(rows[r]));
    pos.push_back(Tensor::from_vector(p, {R}, dev));
  } else {
    for (int64_t r = 0; r < R; ++r) {
      std::vector<int32_t> p(static_cast<size_t>(T));
      std::iota(p.begin(), p.end(), int32_t(cache.length(rows[r])));
      pos.push_back(Tensor::from_vector(p, {T}, dev));
    }
  }
  auto rope_rows = [&](const Tensor& t, int64_t heads) {  // (R, T, heads, Dh) -> host copy
    if (rows_as_time)
      return ops::rope(ops::reshape(t, {1, R, heads, Dh}), m.inv_freq(), pos[0]).to_vector<float>();
    std::vector<float> all;
    all.reserve(size_t(R * T * heads * Dh));
    for (int64_t r = 0; r < R; ++r) {
      std::vector<float> one =
          ops::rope(t.narrow(0, r, 1), m.inv_freq(), pos[size_t(r)]).to_vector<float>();
      all.insert(all.end(), one.begin(), one.end());
    }
    return all;
  };
  Tensor x = m.embed_tokens()(Tensor::from_vector(tokens, {R, T}, dev));  // (R, T, D)
  const auto blocks = m.blocks();
  std::vector<float> o(static_cast<size_t>(R * T * H * Dh));
  for (size_t li = 0; li < blocks.size(); ++li) {
    const Block& b = *blocks[li];
    Tensor xn = b.input_layernorm(x);
    Tensor q, k, v;
    if (dw) {
      Tensor qkv = decode_linear(xn, dw->layers[li].qkv, prec);  // (R, T, (H + 2 Hkv) Dh)
      q = ops::reshape(qkv.narrow(2, 0, H * Dh).contiguous(), {R, T, H, Dh});
      k = ops::reshape(qkv.narrow(2, H * Dh, Hkv * Dh).contiguous(), {R, T, Hkv, Dh});
      v = ops::reshape(qkv.narrow(2, (H + Hkv) * Dh, Hkv * Dh).contiguous(), {R, T, Hkv, Dh});
    } else {
      q = ops::reshape(b.self_attn.q_proj(xn, prec), {R, T, H, Dh});
      k = ops::reshape(b.self_attn.k_proj(xn, prec), {R, T, Hkv, Dh});
      v = ops::reshape(b.self_attn.v_proj(xn, prec), {R, T, Hkv, Dh});
    }
    const std::vector<float> qh = rope_rows(q, H), kh = rope_rows(k, Hkv),
                             vh = v.contiguous().to_vector<float>();
    for (int64_t r = 0; r < R; ++r) {
      const int64_t L0 = cache.length(rows[r]);
      for (int64_t t = 0; t < T; ++t) {
        const size_t at = size_t((r * T + t) * Hkv * Dh);
        std::copy_n(kh.data() + at, Hkv * Dh, cache.k(int64_t(li), rows[r], L0 + t));
        std::copy_n(vh.data() + at, Hkv * Dh, cache.v(int64_t(li), rows[r], L0 + t));
      }
    }
    // Attention of the new queries to the cache (causal: position L0 + t sees keys <= it),
    // one (row, position, kv head) per task.
#pragma omp parallel
    {
      std::vector<float> s;  // one score buffer per thread, not per task
#pragma omp for collapse(2) schedule(dynamic)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t tk = 0; tk < T * Hkv; ++tk) {
          const int64_t t = tk / Hkv, kvh = tk % Hkv, n = cache.length(rows[r]) + t + 1;
          const int64_t at = ((r * T + t) * H + kvh * group) * Dh;
          attend_group(qh.data() + at, cache.k(int64_t(li), rows[r], 0) + kvh * Dh,
                       cache.v(int64_t(li), rows[r], 0) + kvh * Dh, Hkv * Dh, n, Dh, group, scale,
                       s, o.data() + at);
        }
    }
    Tensor ot = Tensor::from_vector(o, {R, T, H * Dh}, dev);
    if (dw) {
      const DecodeWeights::Layer& w = dw->layers[li];
      Tensor hres = ops::add(x, decode_linear(ot, w.o, prec));
      Tensor gu = decode_linear(b.post_attention_layernorm(hres), w.gate_up, prec);
      const int64_t F = w.gate_up.n / 2;
      Tensor act = ops::swiglu(gu.narrow(2, 0, F).contiguous(), gu.narrow(2, F, F).contiguous());
      x = ops::add(hres, decode_linear(act, w.down, prec));
    } else {
      Tensor hres = ops::add(x, b.self_attn.o_proj(ot, prec));
      x = ops::add(hres, b.mlp(b.post_attention_layernorm(hres), prec));
    }
  }
  for (int64_t r = 0; r < R; ++r) cache.set_length(rows[r], cache.length(rows[r]) + T);
  // Only the last position of each row needs logits.
  std::vector<int64_t> last(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) last[size_t(r)] = r * T + T - 1;
  Tensor hl = ops::gather_rows(ops::reshape(x, {R * T, D}), last);
  Tensor hn = m.norm()(hl);
  return dw ? decode_linear(hn, dw->lm_head, prec) : ops::linear(hn, m.lm_head().weight, prec);
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& opt, Rng& rng) {
  if (opt.greedy || opt.temperature <= 0.f)
    return int32_t(std::max_element(logits, logits + V) - logits);
  // Candidates in order of decreasing logit (ties: lower id first). Only as much of that
  // order is sorted as the nucleus and the walk below reach (a prefix of 64, doubled on
  // demand): a full sort of the vocabulary per sampled token was the largest serial cost of
  // batched sampling.
  auto before = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t keep = opt.top_k > 0 && opt.top_k < V ? opt.top_k : V;
  if (keep < V) std::nth_element(idx.begin(), idx.begin() + (keep - 1), idx.end(), before);
  int64_t sorted = 0;
  auto sort_to = [&](int64_t i) {  // idx[0..i] in order
    if (i < sorted) return;
    const int64_t upto =
        std::min(keep, std::max<int64_t>(2 * sorted, std::max<int64_t>(i + 1, 64)));
    std::partial_sort(idx.begin() + sorted, idx.begin() + upto, idx.begin() + keep, before);
    sorted = upto;
  };
  // Unnormalised probabilities exp((logit - max) / T), in f32 with the training kernels'
  // vectorised exp (about 2 ulp), summed in f64.
  const float mx = logits[*std::min_element(idx.begin(), idx.begin() + keep, before)];
  const float inv_t = 1.f / opt.temperature;
  std::vector<float> pv(static_cast<size_t>(keep == V ? V : 0));
  double sum = 0;
  if (keep == V) {
    float* q = pv.data();
#pragma omp simd reduction(+ : sum)
    for (int64_t v = 0; v < V; ++v) sum += (q[v] = cpu::fast_exp((logits[v] - mx) * inv_t));
  } else {
    for (int64_t i = 0; i < keep; ++i) sum += cpu::fast_exp((logits[idx[size_t(i)]] - mx) * inv_t);
  }
  auto prob = [&](int64_t i) {  // of the i-th candidate in order
    const int32_t v = idx[size_t(i)];
    return double(keep == V ? pv[size_t(v)] : cpu::fast_exp((logits[v] - mx) * inv_t));
  };
  int64_t n = keep;
  double tot = sum;
  if (opt.top_p < 1.f) {  // smallest prefix whose mass reaches top_p
    double acc = 0, mass = 0;
    for (int64_t i = 0; i < keep; ++i) {
      sort_to(i);
      const double pi = prob(i);
      acc += pi / sum, mass += pi;
      if (acc >= opt.top_p) {
        n = i + 1, tot = mass;
        break;
      }
    }
  }
  double u = rng.uniform() * tot;
  for (int64_t i = 0; i < n; ++i) {
    sort_to(i);
    u -= prob(i);
    if (u <= 0) return idx[size_t(i)];
  }
  sort_to(n - 1);
  return idx[size_t(n - 1)];
}

std::vector<Generation> generate(const LlamaModel& m,
                                 const std::vector<std::vector<int32_t>>& prompts,
                                 const SamplingOptions& opt, GenerateStats* stats) {
  using clk = std::chrono::steady_clock;
  const int64_t B = int64_t(prompts.size());
  std::vector<Generation> out(static_cast<size_t>(B));
  if (B == 0) return out;
  int64_t longest = 0;
  for (auto& p : prompts) {
    LLAMA3_CHECK(!p.empty(), "generate: empty prompt");
    longest = std::max(longest, int64_t(p.size()));
  }
  const int64_t ctx = m.config().max_seq_len;
  LLAMA3_CHECK(longest < ctx, "generate: prompt of {} tokens leaves no room in the context of {}",
               longest, ctx);
  const int64_t max_len = std::min(ctx, longest + opt.max_new_tokens);
  KvCache cache(m.config(), B, max_len);
  // bf16 precision decodes from weights converted once here (see DecodeWeights), unless a
  // parallelize step hooked the projections: the fused copies would bypass the hooks.
  bool hooked = false;
  for (const Block* b : m.blocks())
    for (const nn::Linear* l :
         {&b->self_attn.q_proj, &b->self_attn.k_proj, &b->self_attn.v_proj, &b->self_attn.o_proj,
          &b->mlp.gate_proj, &b->mlp.up_proj, &b->mlp.down_proj})
      hooked = hooked || l->input_hook || l->output_hook;
  std::optional<DecodeWeights> dw;
  if (m.options().precision == ops::Precision::bf16 && !hooked) dw.emplace(m);
  const DecodeWeights* dwp = dw ? &*dw : nullptr;
  const int64_t V = m.config().vocab_size;
  Rng rng(opt.seed);
  auto t0 = clk::now();
  std::vector<int32_t> next(static_cast<size_t>(B));
  // Prefill row by row (prompt lengths differ), then decode all active rows together.
  for (int64_t b = 0; b < B; ++b) {
    Tensor lg =
        forward_cached(m, cache, {b}, prompts[size_t(b)], int64_t(prompts[size_t(b)].size()), dwp);
    std::vector<float> l = lg.to_vector<float>();
    next[size_t(b)] = sample_token(l.data(), V, opt, rng);
  }
  auto t1 = clk::now();
  std::vector<int64_t> active;
  auto accept = [&](int64_t b) {  // records next[b]; true while the row continues
    Generation& g = out[size_t(b)];
    const int32_t t = next[size_t(b)];
    if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), t) != opt.stop_ids.end()) {
      g.stopped = true;
      return false;
    }
    g.tokens.push_back(t);
    return int64_t(g.tokens.size()) < opt.max_new_tokens && cache.length(b) < max_len;
  };
  for (int64_t b = 0; b < B; ++b)
    if (opt.max_new_tokens > 0 && accept(b)) active.push_back(b);
  while (!active.empty()) {
    std::vector<int32_t> toks;
    for (int64_t b : active) toks.push_back(next[size_t(b)]);
    Tensor lg = forward_cached(m, cache, active, toks, 1, dwp);
    std::vector<float> l = lg.to_vector<float>();
    std::vector<int64_t> still;
    for (size_t i = 0; i < active.size(); ++i) {
      next[size_t(active[i])] = sample_token(l.data() + i * V, V, opt, rng);
      if (accept(active[i])) still.push_back(active[i]);
    }
    active.swap(still);
  }
  if (stats) {
    stats->prefill_s += std::chrono::duration<double>(t1 - t0).count();
    stats->decode_s += std::chrono::duration<double>(clk::now() - t1).count();
    for (auto& g : out) stats->new_tokens += int64_t(g.tokens.size()) + (g.stopped ? 1 : 0);
  }
  return out;
}

}  // namespace llama3::text
