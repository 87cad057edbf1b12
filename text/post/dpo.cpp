// DPO: -log sigmoid(beta * ((lc - ref_c) - (lr - ref_r))) + alpha * NLL(chosen), with the
// log-probs summed over assistant content only (headers and terminators masked out of both
// responses) and the reference log-probs computed once from the frozen starting policy.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>

#include "runtime/autograd/autograd.h"
#include "text/post/stages.h"

namespace llama3::text::post {

Tensor DpoRows::targets_t() const {
  std::vector<int32_t> t(labels.size());
  for (size_t i = 0; i < t.size(); ++i) t[i] = loss_mask[i] ? labels[i] : -1;
  return Tensor::from_vector(t, {int64_t(t.size())});
}

DpoRows build_dpo_rows(const Tokenizer& tok, const std::vector<Preference>& pairs, int32_t pad_id) {
  DpoRows r;
  r.n = int64_t(pairs.size());
  std::vector<Rendered> seqs;
  for (auto& p : pairs) seqs.push_back(render_response(tok, p.prompt, p.chosen));
  for (auto& p : pairs) seqs.push_back(render_response(tok, p.prompt, p.rejected));
  for (auto& s : seqs) r.T = std::max(r.T, int64_t(s.ids.size()) - 1);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Rendered& s = seqs[i];
    const int64_t n = int64_t(s.ids.size()) - 1;
    int64_t counted = 0;
    for (int64_t t = 0; t < r.T; ++t) {
      const bool in = t < n;
      r.tokens.push_back(in ? s.ids[size_t(t)] : pad_id);
      r.labels.push_back(in ? s.ids[size_t(t + 1)] : pad_id);
      const bool m = in && s.kinds[size_t(t + 1)] == TokenKind::kAssistant;  // content only
      r.loss_mask.push_back(m);
      counted += m;
    }
    if (int64_t(i) < r.n) r.chosen_tokens.push_back(std::max<int64_t>(counted, 1));
  }
  return r;
}

namespace {
Tensor row_logps(const LlamaModel& m, const DpoRows& rows) {
  Tensor h = m.hidden(Tensor::from_vector(rows.tokens, {2 * rows.n, rows.T}));
  return ops::sequence_logprob(h, m.lm_head().weight, rows.targets_t(), 2 * rows.n,
                               m.ce_chunk_rows(h.device()));
}
Tensor pick(const Tensor& v, int64_t from, int64_t n) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[size_t(i)] = from + i;
  return ops::reshape(ops::gather_rows(ops::reshape(v, {v.numel(), 1}), idx), {n});
}

// What a DPO policy is judged on, all from its starting (reference) policy: the held-out pairs
// with their reference log-probs, and the held-out prompts with the starting policy's greedy
// responses (the win-rate opponent) and, for the sampled win rate, its K sampled responses.
struct DpoEvalSet {
  std::vector<DpoRows> batches;
  std::vector<std::vector<double>> ref;
  std::vector<DialogRecord> prompts;
  std::vector<std::string> before;
  std::vector<std::vector<std::string>> before_samples;  // [k][prompt]
  SamplingOptions so;
};

// The sampled win rate's draws: as rejection sampling samples (temperature 1, top-p 0.95).
// Draw k of both policies uses the same seed, so where the two policies agree their samples
// agree too and the comparison is a tie, not noise.
SamplingOptions win_rate_sampling(const SamplingOptions& greedy, int64_t k) {
  SamplingOptions so = greedy;
  so.greedy = false, so.temperature = 1.f, so.top_p = 0.95f;
  so.seed = 7919 * uint64_t(k + 1);
  return so;
}

DpoEvalSet make_eval_set(const LlamaModel& reference, const Tokenizer& tok,
                         std::vector<Preference> eval, const std::string& eval_prompts,
                         int64_t max_new_tokens, const LoadOptions& load, int64_t win_samples) {
  DpoEvalSet e;
  for (Preference& q : eval) q = dpo_pair(q);
  const int32_t pad = tok.eos_id();
  for (size_t i = 0; i < eval.size(); i += 16)
    e.batches.push_back(
        build_dpo_rows(tok, {eval.begin() + i, eval.begin() + std::min(eval.size(), i + 16)}, pad));
  for (auto& b : e.batches) e.ref.push_back(sequence_logps(reference, b));
  e.so =
      SamplingOptions{.greedy = true, .max_new_tokens = max_new_tokens, .stop_ids = stop_ids(tok)};
  if (!eval_prompts.empty()) {
    LoadOptions el = load;
    el.max_tokens = reference.config().max_seq_len - max_new_tokens;
    e.prompts = load_prompts(eval_prompts, tok, el, nullptr);
    e.before = respond(reference, tok, e.prompts, e.so);
    for (int64_t k = 0; k < win_samples; ++k)
      e.before_samples.push_back(respond(reference, tok, e.prompts, win_rate_sampling(e.so, k)));
  }
  return e;
}

// Held-out preference accuracy (implicit reward margin > 0), exact match, and the win rate
// against the starting policy's responses judged by the reward model (ties count half; the
// counts are kept so the report can give the interval of a three-valued outcome).
// With `judged`, one record per prompt: both responses, whether each verifies, and the RM's
// scores - what a reader needs to see why a win rate is what it is.
nlohmann::json dpo_eval(const LlamaModel& m, const Tokenizer& tok, const DpoEvalSet& e,
                        const std::string& reward_model, const std::string& reward_model_tokenizer,
                        float beta, float alpha, std::vector<nlohmann::json>* judged) {
  nlohmann::json metrics = nlohmann::json::object();
  {
    autograd::NoGradGuard ng;
    int64_t ok = 0, n = 0;
    double margin = 0;
    for (size_t i = 0; i < e.batches.size(); ++i)
      for (double mg : dpo_loss(m, e.batches[i], e.ref[i], beta, alpha).margins)
        ok += mg > 0, ++n, margin += mg;
    metrics["eval_accuracy"] = n ? double(ok) / double(n) : 0.0;
    metrics["eval_margin"] = n ? margin / double(n) : 0.0;
    metrics["eval_pairs"] = n;
  }
  if (e.prompts.empty()) return metrics;
  metrics["start_exact_match"] = exact_match(e.before, e.prompts);
  auto after = respond(m, tok, e.prompts, e.so);
  metrics["eval_exact_match"] = exact_match(after, e.prompts);
  metrics["eval_prompts"] = int64_t(e.prompts.size());
  // Per prompt against the starting policy: answers DPO fixed and answers it broke (the
  // paired difference in exact match, and its interval, follow from these).
  int64_t fixed = 0, broken = 0;
  for (size_t i = 0; i < e.prompts.size(); ++i) {
    const bool was = verify(e.prompts[i], e.before[i]), is = verify(e.prompts[i], after[i]);
    fixed += !was && is, broken += was && !is;
  }
  metrics["exact_match_fixed"] = fixed, metrics["exact_match_broken"] = broken;
  if (!reward_model.empty()) {
    RewardModel rm(
        load_policy(ModelSource{.dir = reward_model, .tokenizer = reward_model_tokenizer}));
    int64_t wins = 0, ties = 0, losses = 0, agree = 0, disagree = 0;
    for (size_t i = 0; i < e.prompts.size(); ++i) {
      auto s = rm.score_responses(e.prompts[i].messages, {after[i], e.before[i]});
      (s[0] > s[1] ? wins : s[0] == s[1] ? ties : losses) += 1;
      // Where exactly one of the two responses verifies, the judge can be checked: how often
      // the RM prefers that one. The other decisive outcomes (both wrong, or both right but
      // different) carry no verifiable signal and are the win rate's noise.
      const bool a = verify(e.prompts[i], after[i]), b = verify(e.prompts[i], e.before[i]);
      if (a != b && s[0] != s[1]) ((s[0] > s[1]) == a ? agree : disagree) += 1;
      if (judged)
        judged->push_back({{"prompt", e.prompts[i].messages.back().content},
                           {"answer", e.prompts[i].answer},
                           {"response", after[i]},
                           {"start_response", e.before[i]},
                           {"correct", a},
                           {"start_correct", b},
                           {"score", s[0]},
                           {"start_score", s[1]},
                           {"outcome", s[0] > s[1]    ? "win"
                                       : s[0] == s[1] ? "tie"
                                                      : "loss"}});
    }
    metrics["win_rate_vs_start"] = (double(wins) + 0.5 * double(ties)) / double(e.prompts.size());
    metrics["win_rate_wins"] = wins, metrics["win_rate_ties"] = ties,
    metrics["win_rate_losses"] = losses;
    metrics["judge_agrees_with_verifier"] = agree,
    metrics["judge_disagrees_with_verifier"] = disagree;
    // The sampled win rate: K sampled responses of each policy per prompt, draw k against
    // draw k. A greedy response changes on few prompts (most comparisons are ties), so the
    // greedy win rate sees little of what DPO moved; the samples see the distributions. The
    // interval comes from the per-prompt mean outcome (the K draws of one prompt are not
    // independent of each other).
    const int64_t K = int64_t(e.before_samples.size());
    if (K > 0) {
      std::vector<std::vector<std::string>> after_s;
      for (int64_t k = 0; k < K; ++k)
        after_s.push_back(respond(m, tok, e.prompts, win_rate_sampling(e.so, k)));
      int64_t sw = 0, st = 0, sl = 0;
      double sum = 0, sum2 = 0;
      for (size_t i = 0; i < e.prompts.size(); ++i) {
        // All 2K responses of the prompt in one RM forward: DPO's draws, then the start's.
        std::vector<std::string> both;
        for (int64_t k = 0; k < K; ++k) both.push_back(after_s[size_t(k)][i]);
        for (int64_t k = 0; k < K; ++k) both.push_back(e.before_samples[size_t(k)][i]);
        const std::vector<double> s = rm.score_responses(e.prompts[i].messages, both);
        double per = 0;
        for (int64_t k = 0; k < K; ++k) {
          // The same text is a tie whatever rounding its row position gets in the batch.
          const size_t a = size_t(k), b = size_t(K + k);
          const double o = both[a] == both[b] ? 0.5 : s[a] > s[b] ? 1.0 : s[a] == s[b] ? 0.5 : 0.0;
          (o == 1.0 ? sw : o == 0.5 ? st : sl) += 1;
          per += o / double(K);
        }
        sum += per, sum2 += per * per;
      }
      const double n = double(e.prompts.size()), mean = sum / n;
      metrics["win_rate_sampled"] = mean;
      metrics["win_rate_sampled_h"] = 1.96 * std::sqrt(std::max(0.0, sum2 / n - mean * mean) / n);
      metrics["win_rate_sampled_k"] = K;
      metrics["win_rate_sampled_wins"] = sw, metrics["win_rate_sampled_ties"] = st,
      metrics["win_rate_sampled_losses"] = sl;
    }
  }
  return metrics;
}
}  // namespace

nlohmann::json evaluate_dpo(const DpoEvalOptions& o) {
  Policy ref = load_policy(o.reference);
  LoadOptions lo;
  lo.max_tokens = ref.model->config().max_seq_len + 1;
  DpoEvalSet e = make_eval_set(
      *ref.model, ref.tok, load_preferences(o.eval_prefs, ref.tok, lo, nullptr), o.eval_prompts,
      o.max_new_tokens, lo, o.reward_model.empty() ? 0 : o.win_rate_samples);
  ref.model.reset();
  Policy p = load_policy(o.model);
  std::vector<nlohmann::json> judged;
  nlohmann::json f = dpo_eval(*p.model, p.tok, e, o.reward_model, o.reward_model_tokenizer, o.beta,
                              o.alpha, o.judged_path.empty() ? nullptr : &judged);
  if (!judged.empty()) write_jsonl(o.judged_path, judged);
  return f;
}

std::vector<double> sequence_logps(const LlamaModel& m, const DpoRows& rows) {
  autograd::NoGradGuard ng;
  return row_logps(m, rows).to_vector<double>();
}

DpoLossParts dpo_loss(const LlamaModel& m, const DpoRows& rows, const std::vector<double>& ref,
                      float beta, float alpha) {
  const int64_t n = rows.n;
  LLAMA3_CHECK(int64_t(ref.size()) == 2 * n, "dpo: {} reference log-probs for {} pairs", ref.size(),
               n);
  Tensor lp = row_logps(m, rows);
  Tensor lc = pick(lp, 0, n), lr = pick(lp, n, n);
  std::vector<double> off(static_cast<size_t>(n)), nll(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    off[size_t(i)] = double(beta) * (ref[size_t(i)] - ref[size_t(n + i)]);
    nll[size_t(i)] = -double(alpha) / (double(n) * double(rows.chosen_tokens[size_t(i)]));
  }
  Tensor dt = Tensor::from_vector(off, {n}).to(lc.dtype());
  Tensor loss = ops::pairwise_logistic_loss(lc, lr, beta, dt);
  if (alpha != 0.f)
    loss = ops::add(loss, ops::dot(lc, Tensor::from_vector(nll, {n}).to(lc.dtype())));
  DpoLossParts out{loss, {}};
  std::vector<double> lpv = lp.to_vector<double>();
  for (int64_t i = 0; i < n; ++i)
    out.margins.push_back((lpv[size_t(i)] - ref[size_t(i)]) -
                          (lpv[size_t(n + i)] - ref[size_t(n + i)]));
  return out;
}

Preference dpo_pair(const Preference& p) {
  Preference q = p;
  if (!q.edited.empty() && q.edited != q.rejected) q.chosen = q.edited;
  q.edited.clear();
  return q;
}

PostStageResult run_dpo(const DpoOptions& o) {
  LLAMA3_CHECK(!o.prefs.empty(), "dpo: no preference files");
  Policy p = load_policy(o.model);
  LlamaModel& m = *p.model;
  LoadOptions lo = o.load;
  lo.max_tokens = m.config().max_seq_len + 1;
  nlohmann::json metrics = nlohmann::json::object();
  std::vector<Preference> prefs, eval;
  int64_t skipped = 0;
  for (auto& f : o.prefs) {
    LoadReport rep;
    auto v = load_preferences(f, p.tok, lo, &rep);
    prefs.insert(prefs.end(), v.begin(), v.end());
    skipped += rep.skipped_total();
    for (auto& [k, c] : rep.skipped)
      metrics["skipped_" + k] = metrics.value("skipped_" + k, int64_t(0)) + c;
  }
  std::mt19937_64 g(o.seed);
  std::shuffle(prefs.begin(), prefs.end(), g);
  if (!o.eval_prefs.empty()) {
    eval = load_preferences(o.eval_prefs, p.tok, lo, nullptr);
  } else {
    const size_t ne = size_t(double(prefs.size()) * o.eval_fraction);
    eval.assign(prefs.end() - ne, prefs.end());
    prefs.resize(prefs.size() - ne);
  }
  LLAMA3_CHECK(!prefs.empty(), "dpo: no usable preference pairs ({} skipped)", skipped);
  // One pair per prompt, best vs worst: with an edit, the `chosen` response can be a near miss
  // that the NLL term would otherwise teach the policy to say.
  for (Preference& q : prefs) q = dpo_pair(q);
  const int32_t pad = p.tok.eos_id();
  const int64_t bs = std::min<int64_t>(o.batch, int64_t(prefs.size()));
  std::vector<DpoRows> batches;
  for (size_t i = 0; i + size_t(bs) <= prefs.size(); i += size_t(bs))
    batches.push_back(build_dpo_rows(p.tok, {prefs.begin() + i, prefs.begin() + i + bs}, pad));
  // Reference log-probs: once, from the frozen starting policy; stored with the run. The
  // held-out set (and the starting policy's responses, for the win rate) comes from it too.
  std::vector<std::vector<double>> ref;
  for (auto& b : batches) ref.push_back(sequence_logps(m, b));
  const DpoEvalSet ev = make_eval_set(m, p.tok, eval, o.eval_prompts, o.max_new_tokens, o.load,
                                      o.reward_model.empty() ? 0 : o.win_rate_samples);
  std::filesystem::create_directories(o.out_dir + ".ref");
  {
    nlohmann::json rj = {{"train", ref}, {"eval", ev.ref}};
    std::ofstream(o.out_dir + ".ref/reference_logps.json") << rj.dump();
  }
  TrainLoopOptions to = o.train;
  to.steps = o.steps;
  to.tag = "dpo";
  std::vector<size_t> order(batches.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  const double loss = train_loop(m.named_parameters(), to, [&](int64_t s) {
    if (size_t(s) % order.size() == 0) std::shuffle(order.begin(), order.end(), g);
    const size_t i = order[size_t(s) % order.size()];
    return dpo_loss(m, batches[i], ref[i], o.beta, o.alpha).loss;
  });
  metrics["train_loss"] = loss;
  metrics["train_pairs"] = int64_t(prefs.size());
  metrics["skipped"] = skipped;
  std::vector<nlohmann::json> judged;
  metrics.update(
      dpo_eval(m, p.tok, ev, o.reward_model, o.reward_model_tokenizer, o.beta, o.alpha, &judged));
  spdlog::info("dpo: {}", metrics.dump());
  save_policy(m, p.tokenizer_path, o.out_dir, p.extra);
  if (!judged.empty())
    write_jsonl(o.judged_path.empty() ? o.out_dir + "/win_rate.jsonl" : o.judged_path, judged);
  std::filesystem::rename(o.out_dir + ".ref/reference_logps.json",
                          o.out_dir + "/reference_logps.json");
  std::filesystem::remove_all(o.out_dir + ".ref");
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
