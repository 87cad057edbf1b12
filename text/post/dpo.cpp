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
  return ops::sequence_logprob(h, m.lm_head().weight, rows.targets_t(), 2 * rows.n, m.options().ce_chunk);
}
Tensor pick(const Tensor& v, int64_t from, int64_t n) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[size_t(i)] = from + i;
  return ops::reshape(ops::gather_rows(ops::reshape(v, {v.numel(), 1}), idx), {n});
}
}  // namespace

std::vector<double> sequence_logps(const LlamaModel& m, const DpoRows& rows) {
  autograd::NoGradGuard ng;
  return row_logps(m, rows).to_vector<double>();
}

DpoLossParts dpo_loss(const LlamaModel& m, const DpoRows& rows, const std::vector<double>& ref, float beta,
                      float alpha) {
  const int64_t n = rows.n;
  LLAMA3_CHECK(int64_t(ref.size()) == 2 * n, "dpo: {} reference log-probs for {} pairs", ref.size(), n);
  Tensor lp = row_logps(m, rows);
  Tensor lc = pick(lp, 0, n), lr = pick(lp, n, n);
  std::vector<double> off(static_cast<size_t>(n)), nll(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    off[size_t(i)] = double(beta) * (ref[size_t(i)] - ref[size_t(n + i)]);
    nll[size_t(i)] = -double(alpha) / (double(n) * double(rows.chosen_tokens[size_t(i)]));
  }
  Tensor dt = Tensor::from_vector(off, {n}).to(lc.dtype());
  Tensor loss = ops::pairwise_logistic_loss(lc, lr, beta, dt);
  if (alpha != 0.f) loss = ops::add(loss, ops::dot(lc, Tensor::from_vector(nll, {n}).to(lc.dtype())));
  DpoLossParts out{loss, {}};
  std::vector<double> lpv = lp.to_vector<double>();
  for (int64_t i = 0; i < n; ++i)
    out.margins.push_back((lpv[size_t(i)] - ref[size_t(i)]) - (lpv[size_t(n + i)] - ref[size_t(n + i)]));
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
    for (auto& [k, c] : rep.skipped) metrics["skipped_" + k] = metrics.value("skipped_" + k, int64_t(0)) + c;
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
  for (auto* v : {&prefs, &eval})
    for (Preference& q : *v) q = dpo_pair(q);
  const int32_t pad = p.tok.eos_id();
  const int64_t bs = std::min<int64_t>(o.batch, int64_t(prefs.size()));
  std::vector<DpoRows> batches;
  for (size_t i = 0; i + size_t(bs) <= prefs.size(); i += size_t(bs))
    batches.push_back(build_dpo_rows(p.tok, {prefs.begin() + i, prefs.begin() + i + bs}, pad));
  std::vector<DpoRows> eval_batches;
  for (size_t i = 0; i < eval.size(); i += 16)
    eval_batches.push_back(build_dpo_rows(p.tok, {eval.begin() + i, eval.begin() + std::min(eval.size(), i + 16)}, pad));
  // Reference log-probs: once, from the frozen starting policy; stored with the run.
  std::vector<std::vector<double>> ref, ref_eval;
  for (auto& b : batches) ref.push_back(sequence_logps(m, b));
  for (auto& b : eval_batches) ref_eval.push_back(sequence_logps(m, b));
  std::filesystem::create_directories(o.out_dir + ".ref");
  {
    nlohmann::json rj = {{"train", ref}, {"eval", ref_eval}};
    std::ofstream(o.out_dir + ".ref/reference_logps.json") << rj.dump();
  }
  // The starting policy's greedy responses, for the win rate.
  std::vector<DialogRecord> prompts;
  std::vector<std::string> before;
  SamplingOptions so{.greedy = true, .max_new_tokens = o.max_new_tokens, .stop_ids = stop_ids(p.tok)};
  if (!o.eval_prompts.empty()) {
    LoadOptions el = o.load;
    el.max_tokens = m.config().max_seq_len - o.max_new_tokens;
    prompts = load_prompts(o.eval_prompts, p.tok, el, nullptr);
    before = respond(m, p.tok, prompts, so);
    metrics["start_exact_match"] = exact_match(before, prompts);
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
  {
    autograd::NoGradGuard ng;
    int64_t ok = 0, n = 0;
    double margin = 0;
    for (size_t i = 0; i < eval_batches.size(); ++i)
      for (double mg : dpo_loss(m, eval_batches[i], ref_eval[i], o.beta, o.alpha).margins) ok += mg > 0, ++n, margin += mg;
    metrics["eval_accuracy"] = n ? double(ok) / double(n) : 0.0;
    metrics["eval_margin"] = n ? margin / double(n) : 0.0;
    metrics["eval_pairs"] = n;
  }
  if (!prompts.empty()) {
    auto after = respond(m, p.tok, prompts, so);
    metrics["eval_exact_match"] = exact_match(after, prompts);
    metrics["eval_prompts"] = int64_t(prompts.size());
    if (!o.reward_model.empty()) {
      RewardModel rm(load_policy(ModelSource{.dir = o.reward_model, .tokenizer = o.reward_model_tokenizer}));
      double wins = 0;
      for (size_t i = 0; i < prompts.size(); ++i) {
        auto s = rm.score_responses(prompts[i].messages, {after[i], before[i]});
        wins += s[0] > s[1] ? 1.0 : (s[0] == s[1] ? 0.5 : 0.0);
      }
      metrics["win_rate_vs_start"] = wins / double(prompts.size());
    }
  }
  spdlog::info("dpo: {}", metrics.dump());
  save_policy(m, p.tokenizer_path, o.out_dir, p.extra);
  std::filesystem::rename(o.out_dir + ".ref/reference_logps.json", o.out_dir + "/reference_logps.json");
  std::filesystem::remove_all(o.out_dir + ".ref");
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
