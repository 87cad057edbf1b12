#include "text/generate/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "runtime/autograd/autograd.h"

namespace llama3::text {

KvCache::KvCache(const LlamaConfig& c, int64_t batch, int64_t max_len)
    : n_layers_(c.n_layers), batch_(batch), max_len_(max_len), kv_dim_(c.n_kv_heads * c.head_dim()),
      k_(static_cast<size_t>(c.n_layers)), v_(static_cast<size_t>(c.n_layers)), len_(size_t(batch), 0) {
  for (auto& x : k_) x.assign(size_t(batch * max_len * kv_dim_), 0.f);
  for (auto& x : v_) x.assign(size_t(batch * max_len * kv_dim_), 0.f);
}
float* KvCache::k(int64_t l, int64_t b, int64_t pos) { return k_[size_t(l)].data() + (b * max_len_ + pos) * kv_dim_; }
float* KvCache::v(int64_t l, int64_t b, int64_t pos) { return v_[size_t(l)].data() + (b * max_len_ + pos) * kv_dim_; }

Tensor forward_cached(const LlamaModel& m, KvCache& cache, const std::vector<int64_t>& rows,
                      const std::vector<int32_t>& tokens, int64_t T) {
  autograd::NoGradGuard ng;
  const LlamaConfig& c = m.config();
  const int64_t R = int64_t(rows.size()), D = c.dim, H = c.n_heads, Hkv = c.n_kv_heads, Dh = c.head_dim();
  const int64_t group = H / Hkv;
  LLAMA3_CHECK(int64_t(tokens.size()) == R * T, "forward_cached: {} tokens for {} rows x {}", tokens.size(), R, T);
  for (int64_t r = 0; r < R; ++r)
    LLAMA3_CHECK(cache.length(rows[r]) + T <= cache.max_len(), "generate: row {} would reach {} positions, cache holds {}",
                 rows[r], cache.length(rows[r]) + T, cache.max_len());
  const Device dev = m.embed_tokens().weight.device();
  const ops::Precision prec = m.options().precision;
  const float scale = 1.f / std::sqrt(float(Dh));
  // Positions of each row's new tokens.
  std::vector<Tensor> pos(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    std::vector<int32_t> p(T);
    std::iota(p.begin(), p.end(), int32_t(cache.length(rows[r])));
    pos[size_t(r)] = Tensor::from_vector(p, {T}, dev);
  }
  Tensor x = m.embed_tokens()(Tensor::from_vector(tokens, {R, T}, dev));  // (R, T, D)
  const auto blocks = m.blocks();
  for (size_t li = 0; li < blocks.size(); ++li) {
    const Block& b = *blocks[li];
    Tensor xn = b.input_layernorm(x);
    Tensor q = ops::reshape(b.self_attn.q_proj(xn, prec), {R, T, H, Dh});
    Tensor k = ops::reshape(b.self_attn.k_proj(xn, prec), {R, T, Hkv, Dh});
    Tensor v = ops::reshape(b.self_attn.v_proj(xn, prec), {R, T, Hkv, Dh});
    std::vector<std::vector<float>> qh(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
      Tensor qr = ops::rope(q.narrow(0, r, 1), m.inv_freq(), pos[size_t(r)]);
      Tensor kr = ops::rope(k.narrow(0, r, 1), m.inv_freq(), pos[size_t(r)]);
      qh[size_t(r)] = qr.to_vector<float>();
      std::vector<float> kv = kr.to_vector<float>(), vv = v.narrow(0, r, 1).contiguous().to_vector<float>();
      const int64_t L0 = cache.length(rows[r]);
      for (int64_t t = 0; t < T; ++t) {
        std::copy_n(kv.data() + t * Hkv * Dh, Hkv * Dh, cache.k(int64_t(li), rows[r], L0 + t));
        std::copy_n(vv.data() + t * Hkv * Dh, Hkv * Dh, cache.v(int64_t(li), rows[r], L0 + t));
      }
    }
    // Attention of the new queries to the cache (causal: position L0 + t sees keys <= it).
    std::vector<float> o(static_cast<size_t>(R * T * H * Dh));
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t th = 0; th < T * H; ++th) {
        const int64_t t = th / H, h = th % H, kvh = h / group;
        const int64_t L0 = cache.length(rows[r]), n = L0 + t + 1;
        const float* qv = qh[size_t(r)].data() + (t * H + h) * Dh;
        std::vector<float> s(static_cast<size_t>(n));
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const float* kj = cache.k(int64_t(li), rows[r], j) + kvh * Dh;
          float d = 0;
          for (int64_t e = 0; e < Dh; ++e) d += qv[e] * kj[e];
          s[size_t(j)] = d * scale;
          mx = std::max(mx, s[size_t(j)]);
        }
        float sum = 0;
        for (auto& z : s) sum += (z = std::exp(z - mx));
        float* ov = o.data() + ((r * T + t) * H + h) * Dh;
        for (int64_t j = 0; j < n; ++j) {
          const float* vj = cache.v(int64_t(li), rows[r], j) + kvh * Dh;
          const float p = s[size_t(j)] / sum;
          for (int64_t e = 0; e < Dh; ++e) ov[e] += p * vj[e];
        }
      }
    Tensor ot = Tensor::from_vector(o, {R, T, H * Dh}, dev);
    Tensor hres = ops::add(x, b.self_attn.o_proj(ot, prec));
    x = ops::add(hres, b.mlp(b.post_attention_layernorm(hres), prec));
  }
  for (int64_t r = 0; r < R; ++r) cache.set_length(rows[r], cache.length(rows[r]) + T);
  // Only the last position of each row needs logits.
  std::vector<int64_t> last(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) last[size_t(r)] = r * T + T - 1;
  Tensor hl = ops::gather_rows(ops::reshape(x, {R * T, D}), last);
  return ops::linear(m.norm()(hl), m.lm_head().weight, prec);  // (R, V)
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& opt, Rng& rng) {
  if (opt.greedy || opt.temperature <= 0.f)
    return int32_t(std::max_element(logits, logits + V) - logits);
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  int64_t keep = V;
  if (opt.top_k > 0 && opt.top_k < V) keep = opt.top_k;
  std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  idx.resize(static_cast<size_t>(keep));
  std::vector<double> p(idx.size());
  const double mx = logits[idx[0]];
  double sum = 0;
  for (size_t i = 0; i < idx.size(); ++i) sum += (p[i] = std::exp((logits[idx[i]] - mx) / opt.temperature));
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

std::vector<Generation> generate(const LlamaModel& m, const std::vector<std::vector<int32_t>>& prompts,
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
  LLAMA3_CHECK(longest < ctx, "generate: prompt of {} tokens leaves no room in the context of {}", longest, ctx);
  const int64_t max_len = std::min(ctx, longest + opt.max_new_tokens);
  KvCache cache(m.config(), B, max_len);
  const int64_t V = m.config().vocab_size;
  Rng rng(opt.seed);
  auto t0 = clk::now();
  std::vector<int32_t> next(static_cast<size_t>(B));
  // Prefill row by row (prompt lengths differ), then decode all active rows together.
  for (int64_t b = 0; b < B; ++b) {
    Tensor lg = forward_cached(m, cache, {b}, prompts[size_t(b)], int64_t(prompts[size_t(b)].size()));
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
    Tensor lg = forward_cached(m, cache, active, toks, 1);
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
