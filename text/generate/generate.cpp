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
  for (const Block* b : m.blocks()) {
    const Attention& a = b->self_attn;
    const Mlp& f = b->mlp;
    layers.push_back({fused({&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight}),
                      a.o_proj.weight.to(DType::bf16),
                      fused({&f.gate_proj.weight, &f.up_proj.weight}),
                      f.down_proj.weight.to(DType::bf16)});
  }
  lm_head = m.lm_head().weight.to(DType::bf16);
}

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
      Tensor qkv = ops::linear(xn, dw->layers[li].qkv, prec);  // (R, T, (H + 2 Hkv) Dh)
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
    // Attention of the new queries to the cache (causal: position L0 + t sees keys <= it).
#pragma omp parallel
    {
      std::vector<float> s;  // one score buffer per thread, not per (row, head)
#pragma omp for collapse(2) schedule(dynamic)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t th = 0; th < T * H; ++th) {
          const int64_t t = th / H, h = th % H, kvh = h / group;
          const int64_t L0 = cache.length(rows[r]), n = L0 + t + 1;
          const float* qv = qh.data() + ((r * T + t) * H + h) * Dh;
          s.resize(static_cast<size_t>(n));
          float mx = -INFINITY;
          for (int64_t j = 0; j < n; ++j) {
            const float* kj = cache.k(int64_t(li), rows[r], j) + kvh * Dh;
            float d = 0;
#pragma omp simd reduction(+ : d)
            for (int64_t e = 0; e < Dh; ++e) d += qv[e] * kj[e];
            s[size_t(j)] = d * scale;
            mx = std::max(mx, s[size_t(j)]);
          }
          float sum = 0;
          for (auto& z : s) sum += (z = std::exp(z - mx));
          float* ov = o.data() + ((r * T + t) * H + h) * Dh;
          const float inv = 1.f / sum;
          // 16 output features at a time summed over all keys in a register; summing into
          // ov itself would store and reload it once per key.
          for (int64_t e0 = 0; e0 < Dh; e0 += 16) {
            const int64_t w = std::min<int64_t>(16, Dh - e0);
#if defined(__AVX512F__)
            if (w == 16) {
              __m512 acc = _mm512_setzero_ps();
              for (int64_t j = 0; j < n; ++j)
                acc = _mm512_fmadd_ps(
                    _mm512_set1_ps(s[size_t(j)] * inv),
                    _mm512_loadu_ps(cache.v(int64_t(li), rows[r], j) + kvh * Dh + e0), acc);
              _mm512_storeu_ps(ov + e0, acc);
              continue;
            }
#endif
            float acc[16] = {};
            for (int64_t j = 0; j < n; ++j) {
              const float* vj = cache.v(int64_t(li), rows[r], j) + kvh * Dh + e0;
              const float p = s[size_t(j)] * inv;
              for (int64_t e = 0; e < w; ++e) acc[e] += p * vj[e];
            }
            std::copy_n(acc, w, ov + e0);
          }
        }
    }
    Tensor ot = Tensor::from_vector(o, {R, T, H * Dh}, dev);
    if (dw) {
      const DecodeWeights::Layer& w = dw->layers[li];
      Tensor hres = ops::add(x, ops::linear(ot, w.o, prec));
      Tensor gu = ops::linear(b.post_attention_layernorm(hres), w.gate_up, prec);
      const int64_t F = w.gate_up.size(0) / 2;
      Tensor act = ops::swiglu(gu.narrow(2, 0, F).contiguous(), gu.narrow(2, F, F).contiguous());
      x = ops::add(hres, ops::linear(act, w.down, prec));
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
  return ops::linear(m.norm()(hl), dw ? dw->lm_head : m.lm_head().weight, prec);  // (R, V)
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& opt, Rng& rng) {
  if (opt.greedy || opt.temperature <= 0.f)
    return int32_t(std::max_element(logits, logits + V) - logits);
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  int64_t keep = V;
  if (opt.top_k > 0 && opt.top_k < V) keep = opt.top_k;
  std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  idx.resize(static_cast<size_t>(keep));
  std::vector<double> p(idx.size());
  const double mx = logits[idx[0]];
  double sum = 0;
  for (size_t i = 0; i < idx.size(); ++i)
    sum += (p[i] = std::exp((logits[idx[i]] - mx) / opt.temperature));
  size_t n = idx.size();
  if (opt.top_p < 1.f) {  // smallest prefix whose mass reaches top_p
    double acc = 0;
    for (size_t i = 0; i < idx.size(); ++i) {
      acc += p[i] / sum;
      if (acc >= opt.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  double tot = 0;
  for (size_t i = 0; i < n; ++i) tot += p[i];
  double u = rng.uniform() * tot;
  for (size_t i = 0; i < n; ++i) {
    u -= p[i];
    if (u <= 0) return idx[i];
  }
  return idx[n - 1];
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
