// SFT and DPO loss masks, the new ops' gradients (finite differences), KV-cache generation
// against full recomputation, and checkpoint averaging.
#include <cmath>
#include <map>
#include <random>

#include "fixture.h"
#include "runtime/autograd/autograd.h"
#include "runtime/io/checkpoint.h"
#include "runtime/io/safetensors.h"
#include "text/train/trainer.h"

using namespace posttest;

namespace {

Tensor randn(const Shape& s, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> n(0.0, scale);
  std::vector<double> v(shape_numel(s));
  for (auto& x : v) x = n(g);
  Tensor t = Tensor::from_vector(v, s);
  t.set_requires_grad(true);
  return t;
}

// Central differences of sum(f * r) against backward, in f64.
void gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f, std::vector<Tensor> in,
               double tol = 1e-6) {
  Tensor out = f(in);
  Tensor r = randn(out.shape(), 99).detach();
  ops::dot(out, r).backward();
  for (size_t k = 0; k < in.size(); ++k) {
    if (!in[k].requires_grad()) continue;
    std::vector<double> an = in[k].grad().to_vector<double>();
    double* p = in[k].data<double>();
    double err = 0, ref = 0;
    for (int64_t i = 0; i < in[k].numel(); ++i) {
      autograd::NoGradGuard ng;
      const double o = p[i];
      p[i] = o + 1e-6;
      const double lp = ops::dot(f(in), r).item();
      p[i] = o - 1e-6;
      const double lm = ops::dot(f(in), r).item();
      p[i] = o;
      const double num = (lp - lm) / 2e-6;
      err = std::max(err, std::abs(num - an[i]));
      ref = std::max(ref, std::abs(num));
    }
    EXPECT_LT(err, tol * std::max(1.0, ref)) << "input " << k;
  }
}

std::vector<Preference> two_pairs() {
  return {Preference{{{Role::kSystem, "Be brief.", false}, {Role::kUser, "What is 2 + 3?", false}},
                     "5",
                     "6",
                     ""},
          Preference{{{Role::kUser, "Write the word apple in uppercase.", false}},
                     "APPLE",
                     "apple world",
                     ""}};
}

}  // namespace

TEST(PostOps, SequenceLogprobGradientMatchesFiniteDifferences) {
  Tensor h = randn({6, 5}, 1), w = randn({7, 5}, 2);
  Tensor tg = Tensor::from_vector(std::vector<int32_t>{3, -1, 0, 6, -1, 2}, {6});
  gradcheck(
      [&](const std::vector<Tensor>& x) {
        return ops::sequence_logprob(x[0], x[1], tg, 2, /*chunk=*/4);
      },
      {h, w});
}

TEST(PostOps, SequenceLogprobEqualsSummedLogSoftmax) {
  Tensor h = randn({4, 3}, 3).detach(), w = randn({5, 3}, 4).detach();
  Tensor tg = Tensor::from_vector(std::vector<int32_t>{1, 4, -1, 0}, {4});
  auto lp = ops::sequence_logprob(h, w, tg, 2, 3).to_vector<double>();
  auto hv = h.to_vector<double>(), wv = w.to_vector<double>();
  auto row = [&](int r, int t) {
    std::vector<double> l(5);
    double mx = -1e300, s = 0;
    for (int v = 0; v < 5; ++v) {
      l[v] = 0;
      for (int d = 0; d < 3; ++d) l[v] += hv[r * 3 + d] * wv[v * 3 + d];
      mx = std::max(mx, l[v]);
    }
    for (double x : l) s += std::exp(x - mx);
    return l[t] - mx - std::log(s);
  };
  EXPECT_NEAR(lp[0], row(0, 1) + row(1, 4), 1e-12);
  EXPECT_NEAR(lp[1], row(3, 0), 1e-12);
}

TEST(PostOps, PairwiseLossAndGatherRowsGradientsMatchFiniteDifferences) {
  Tensor a = randn({4}, 5), b = randn({4}, 6);
  Tensor off = randn({4}, 7).detach();
  gradcheck(
      [&](const std::vector<Tensor>& x) {
        return ops::pairwise_logistic_loss(x[0], x[1], 0.7f, off);
      },
      {a, b});
  a.zero_grad(), b.zero_grad();
  gradcheck(
      [&](const std::vector<Tensor>& x) { return ops::pairwise_logistic_loss(x[0], x[1], 1.f); },
      {a, b});
  Tensor x = randn({5, 3}, 8);
  gradcheck([&](const std::vector<Tensor>& in) { return ops::gather_rows(in[0], {4, 0, 4}); }, {x});
  // -log sigmoid(0) = log 2
  Tensor z = Tensor::zeros({3}, DType::f64);
  EXPECT_NEAR(ops::pairwise_logistic_loss(z, z, 1.f).item(), std::log(2.0), 1e-15);
}

TEST_F(PostTest, SftLossIgnoresLabelsOfMaskedTokens) {
  LlamaModel m(tiny_config(tok->vocab_size()), 1);
  std::vector<Rendered> ds = {
      render(*tok, {{Role::kSystem, "Be brief.", false},
                    {Role::kUser, "hello", false},
                    {Role::kAssistant, "world", false}}),
      render(*tok, {{Role::kUser, "What is 2 + 3?", false}, {Role::kAssistant, "5", false}})};
  const int64_t T =
      int64_t(ds[0].ids.size() + ds[1].ids.size()) - 2 + 3;  // both fit, 3 padding positions
  ASSERT_LE(T, m.config().max_seq_len);
  auto batches = pack_dialogs(ds, T, 2, /*with_termination=*/true, tok->eos_id());
  ASSERT_EQ(batches.size(), 1u);
  PackedBatch b = batches[0];
  ASSERT_EQ(b.B, 1) << "both dialogs fit one row";
  int64_t counted = 0;
  for (uint8_t x : b.loss_mask) counted += x;
  // "world" + eot, "5" + eot
  EXPECT_EQ(counted, int64_t(tok->encode("world").size() + tok->encode("5").size() + 2));
  const double base = m.loss(b.tokens_t(), b.targets_t(), b.doc_ids_t()).item();
  PackedBatch c = b;
  for (size_t i = 0; i < c.labels.size(); ++i)
    if (!c.loss_mask[i]) c.labels[i] = (c.labels[i] + 17) % int32_t(tok->vocab_size());
  EXPECT_EQ(m.loss(c.tokens_t(), c.targets_t(), c.doc_ids_t()).item(), base);
  PackedBatch d = b;
  for (size_t i = 0; i < d.labels.size(); ++i)
    if (d.loss_mask[i]) {
      d.labels[i] = (d.labels[i] + 17) % int32_t(tok->vocab_size());
      break;
    }
  EXPECT_NE(m.loss(d.tokens_t(), d.targets_t(), d.doc_ids_t()).item(), base)
      << "the mask must not hide everything";
}

TEST_F(PostTest, DpoLossIgnoresLabelsOfFormattingTokens) {
  LlamaModel m(tiny_config(tok->vocab_size()), 2);
  DpoRows rows = build_dpo_rows(*tok, two_pairs(), tok->eos_id());
  // Content only: the terminator and headers are out of both responses.
  int64_t counted = 0;
  for (uint8_t x : rows.loss_mask) counted += x;
  EXPECT_EQ(counted, int64_t(tok->encode("5").size() + tok->encode("APPLE").size() +
                             tok->encode("6").size() + tok->encode("apple world").size()));
  auto ref = sequence_logps(m, rows);
  for (auto& r : ref) r -= 0.3;  // a reference different from the policy
  const double base = dpo_loss(m, rows, ref, 0.1f, 0.2f).loss.item();
  DpoRows c = rows;
  for (size_t i = 0; i < c.labels.size(); ++i)
    if (!c.loss_mask[i]) c.labels[i] = (c.labels[i] + 5) % int32_t(tok->vocab_size());
  EXPECT_EQ(dpo_loss(m, c, ref, 0.1f, 0.2f).loss.item(), base);
  DpoRows d = rows;
  for (size_t i = d.labels.size() / 2; i < d.labels.size(); ++i)  // a rejected content token
    if (d.loss_mask[i]) {
      d.labels[i] = (d.labels[i] + 5) % int32_t(tok->vocab_size());
      break;
    }
  EXPECT_NE(dpo_loss(m, d, ref, 0.1f, 0.2f).loss.item(), base);
}

TEST_F(PostTest, KvCacheGreedyGenerationEqualsFullRecomputation) {
  LlamaModel m(tiny_config(tok->vocab_size()), 3);
  // Scale the head up so greedy choices of the random model are not near-ties.
  {
    autograd::NoGradGuard ng;
    backend_for(Device::cpu()).scale(m.lm_head().weight, 20.f);
  }
  std::vector<std::vector<int32_t>> prompts = {
      render(*tok, {{Role::kUser, "What is 2 + 3?", false}}, true).ids,
      render(*tok, {{Role::kUser, "hello", false}}, true).ids};
  SamplingOptions so;
  so.greedy = true;
  so.max_new_tokens = 20;
  auto gens = generate(m, prompts, so);
  for (size_t b = 0; b < prompts.size(); ++b) {
    std::vector<int32_t> seq = prompts[b];
    std::vector<int32_t> ref;
    for (int t = 0; t < 20; ++t) {
      Tensor lg = m.logits(Tensor::from_vector(seq, {1, int64_t(seq.size())}));
      auto v = lg.to_vector<float>();
      const int64_t V = m.config().vocab_size;
      const float* last = v.data() + (seq.size() - 1) * V;
      const int32_t nx = int32_t(std::max_element(last, last + V) - last);
      ref.push_back(nx);
      seq.push_back(nx);
    }
    EXPECT_EQ(gens[b].tokens, ref) << "prompt " << b;
  }
  // The cached logits equal the recomputed ones (not only their argmax).
  KvCache cache(m.config(), 1, 64);
  std::vector<int32_t> p = prompts[0];
  Tensor l1 = forward_cached(m, cache, {0}, {p.begin(), p.end() - 1}, int64_t(p.size()) - 1);
  Tensor l2 = forward_cached(m, cache, {0}, {p.back()}, 1);
  auto full = m.logits(Tensor::from_vector(p, {1, int64_t(p.size())})).to_vector<float>();
  auto got = l2.to_vector<float>();
  const int64_t V = m.config().vocab_size;
  double err = 0;
  for (int64_t v = 0; v < V; ++v)
    err = std::max(err, double(std::abs(got[v] - full[(p.size() - 1) * V + v])));
  EXPECT_LT(err, 1e-4);
  (void)l1;
}

// bf16 precision decodes from DecodeWeights (fused q/k/v and gate/up in bf16, packed in
// panels for the CPU decode GEMM): its logits match a full bf16 recomputation within bf16
// tolerance, and greedy decoding picks the same tokens.
TEST_F(PostTest, KvCacheBf16DecodeMatchesFullRecomputation) {
  LlamaModel m(tiny_config(tok->vocab_size()), 3);
  {
    autograd::NoGradGuard ng;
    backend_for(Device::cpu()).scale(m.lm_head().weight, 20.f);
  }
  m.options().precision = ops::Precision::bf16;
  const std::vector<int32_t> p = render(*tok, {{Role::kUser, "What is 2 + 3?", false}}, true).ids;
  SamplingOptions so;
  so.greedy = true;
  so.max_new_tokens = 12;
  auto gens = generate(m, {p, p}, so);  // two rows: the batched decode path
  std::vector<int32_t> seq = p, ref;
  const int64_t V = m.config().vocab_size;
  for (int t = 0; t < 12; ++t) {
    auto v = m.logits(Tensor::from_vector(seq, {1, int64_t(seq.size())})).to_vector<float>();
    const float* last = v.data() + (seq.size() - 1) * V;
    ref.push_back(int32_t(std::max_element(last, last + V) - last));
    seq.push_back(ref.back());
  }
  EXPECT_EQ(gens[0].tokens, ref);
  EXPECT_EQ(gens[1].tokens, ref);
  DecodeWeights dw(m);
  KvCache cache(m.config(), 1, 64);
  forward_cached(m, cache, {0}, {p.begin(), p.end() - 1}, int64_t(p.size()) - 1, &dw);
  auto got = forward_cached(m, cache, {0}, {p.back()}, 1, &dw).to_vector<float>();
  auto full = m.logits(Tensor::from_vector(p, {1, int64_t(p.size())})).to_vector<float>();
  double err = 0, mag = 0;
  for (int64_t v = 0; v < V; ++v) {
    err = std::max(err, double(std::abs(got[v] - full[(p.size() - 1) * V + v])));
    mag = std::max(mag, double(std::abs(full[(p.size() - 1) * V + v])));
  }
  EXPECT_LT(err / mag, 1e-2);
}

TEST(PostSampling, TopKOneAndTinyTopPAreGreedyAndSamplingFollowsTemperature) {
  std::vector<float> l = {0.1f, 2.0f, 1.9f, -1.f};
  Rng rng(1);
  SamplingOptions o;
  o.top_k = 1;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(l.data(), 4, o, rng), 1);
  o.top_k = 0, o.top_p = 0.01f;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(l.data(), 4, o, rng), 1);
  o.top_p = 1.f, o.temperature = 1.f;
  int c2 = 0;
  for (int i = 0; i < 4000; ++i) c2 += sample_token(l.data(), 4, o, rng) == 2;
  // p(2) = e^1.9 / (e^0.1 + e^2 + e^1.9 + e^-1) = 0.4253
  EXPECT_NEAR(c2 / 4000.0, 0.4253, 0.03);
  o.top_k = 2;  // only tokens 1 and 2: p(2) = e^1.9 / (e^2 + e^1.9) = 0.475
  c2 = 0;
  for (int i = 0; i < 4000; ++i) c2 += sample_token(l.data(), 4, o, rng) == 2;
  EXPECT_NEAR(c2 / 4000.0, 0.475, 0.03);
}

// A vocabulary larger than the sampler's first sorted prefix (64): the nucleus is found and
// sampled in order of decreasing logit, and without truncation a token ranked past the first
// prefix is drawn at its softmax probability.
TEST(PostSampling, NucleusAndDeepCandidatesFollowTheSoftmax) {
  const int64_t V = 1000;
  std::vector<float> l(static_cast<size_t>(V), -30.f);
  l[500] = std::log(0.5f), l[7] = std::log(0.3f), l[900] = std::log(0.15f);  // ~0.95 of the mass
  Rng rng(3);
  SamplingOptions o;
  o.top_p = 0.9f;  // 0.5 + 0.3 < 0.9 <= 0.5 + 0.3 + 0.15: exactly these three
  std::map<int32_t, int> seen;
  for (int i = 0; i < 6000; ++i) ++seen[sample_token(l.data(), V, o, rng)];
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_NEAR(seen[500] / 6000.0, 0.5 / 0.95, 0.03);
  EXPECT_NEAR(seen[900] / 6000.0, 0.15 / 0.95, 0.02);
  // Flat logits but for one lower token: ranked last, past the first prefix.
  const int64_t Vf = 200;
  std::vector<float> f(static_cast<size_t>(Vf), 0.f);
  f[123] = std::log(0.5f);  // half the weight of every other token
  o.top_p = 1.f;
  int hits = 0, draws = 40000;
  for (int i = 0; i < draws; ++i) hits += sample_token(f.data(), Vf, o, rng) == 123;
  const double p123 = 0.5 / (Vf - 1 + 0.5);
  EXPECT_NEAR(hits / double(draws), p123, 4 * std::sqrt(p123 / draws));
}

TEST_F(PostTest, AveragingIdenticalCheckpointsIsIdentityAndTwoGiveTheirMean) {
  LlamaModel a(tiny_config(tok->vocab_size()), 4), b(tiny_config(tok->vocab_size()), 5);
  save_policy(a, tok_path, (dir / "a").string());
  save_policy(b, tok_path, (dir / "b").string());
  std::string a_dir = (dir / "a").string(), b_dir = (dir / "b").string();
  run_average({{a_dir, a_dir, a_dir}, {}, (dir / "aaa").string()});
  auto same = io::load_safetensors((dir / "aaa/model.safetensors").string());
  for (auto& p : a.named_parameters())
    EXPECT_EQ(same.at(p.name).to_vector<float>(), p.tensor->to_vector<float>()) << p.name;
  run_average({{a_dir, b_dir}, {}, (dir / "ab").string()});
  auto mean = io::load_safetensors((dir / "ab/model.safetensors").string());
  auto pb = b.named_parameters();
  auto pa = a.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    auto x = pa[i].tensor->to_vector<float>(), y = pb[i].tensor->to_vector<float>(),
         z = mean.at(pa[i].name).to_vector<float>();
    for (size_t j = 0; j < x.size(); ++j)
      ASSERT_NEAR(z[j], 0.5 * (double(x[j]) + double(y[j])), 1e-7) << pa[i].name;
  }
  run_average({{a_dir, b_dir}, {3.0, 1.0}, (dir / "w").string()});
  auto wm = io::load_safetensors((dir / "w/model.safetensors").string());
  auto x = pa[1].tensor->to_vector<float>(), y = pb[1].tensor->to_vector<float>(),
       z = wm.at(pa[1].name).to_vector<float>();
  for (size_t j = 0; j < x.size(); ++j) ASSERT_NEAR(z[j], 0.75 * x[j] + 0.25 * y[j], 1e-6);
  // A checkpoint of another architecture is refused, naming the tensor.
  LlamaConfig wide = tiny_config(tok->vocab_size());
  wide.n_kv_heads = 4;
  LlamaModel c(wide, 6);
  save_policy(c, tok_path, (dir / "c").string());
  {
    // Same config.json as a so the tensor check is what fails.
    io::TensorMap t = io::load_safetensors((dir / "c/model.safetensors").string());
    io::TensorMap ta = io::load_safetensors((dir / "a/model.safetensors").string());
    ta["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"];
    LlamaModel tmp(tiny_config(tok->vocab_size()), 4);
    save_policy(tmp, tok_path, (dir / "d").string());
    io::save_safetensors((dir / "d/model.safetensors").string(), ta);
    fs::remove(dir / "d/checksums.json");
    io::CheckpointWriter w((dir / "e").string());
    w.tensors("model.safetensors", ta);
    w.json("config.json", tiny_config(tok->vocab_size()).to_hf_json());
    w.commit();
  }
  try {
    run_average({{a_dir, (dir / "e").string()}, {}, (dir / "bad").string()});
    FAIL() << "expected a shape error";
  } catch (const Error& e) {
    EXPECT_NE(
        std::string(e.what()).find("tensor 'model.layers.1.self_attn.k_proj.weight' has shape"),
        std::string::npos)
        << e.what();
  }
  try {
    run_average({{a_dir, (dir / "c").string()}, {}, (dir / "bad").string()});
    FAIL() << "expected a config error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("config.json differs"), std::string::npos) << e.what();
  }
}
