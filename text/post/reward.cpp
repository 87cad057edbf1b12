// Reward model: the LM's final hidden state at the last token through a (1, dim) head,
// trained with the pairwise loss -log sigmoid(r_better - r_worse) (no margin term).
#include <spdlog/spdlog.h>

#include <algorithm>
#include <limits>
#include <random>
#include <unordered_map>

#include "runtime/autograd/autograd.h"
#include "text/post/stages.h"

namespace llama3::text::post {

RewardModel::RewardModel(Policy p) : policy(std::move(p)) {
  auto it = policy.extra.find("score.weight");
  const int64_t D = policy.model->config().dim;
  if (it != policy.extra.end()) {
    LLAMA3_CHECK(it->second.shape() == Shape({1, D}), "score.weight has shape {}, expected (1, {})",
                 shape_str(it->second.shape()), D);
    score = it->second.to(DType::f32).contiguous().clone();
    policy.extra.erase(it);
  } else {
    score = Tensor::zeros({1, D}, DType::f32);
  }
  score.set_requires_grad(true);
}

Tensor RewardModel::scores(const std::vector<std::vector<int32_t>>& seqs) const {
  const int64_t n = int64_t(seqs.size());
  int64_t T = 0;
  for (auto& s : seqs) T = std::max(T, int64_t(s.size()));
  const int32_t pad = policy.tok.eos_id();
  std::vector<int32_t> tok(size_t(n * T), pad);
  std::vector<int64_t> last(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    std::copy(seqs[size_t(i)].begin(), seqs[size_t(i)].end(), tok.begin() + i * T);
    last[size_t(i)] =
        i * T + int64_t(seqs[size_t(i)].size()) - 1;  // padding comes after: causal, unseen
  }
  Tensor h = policy.model->hidden(Tensor::from_vector(tok, {n, T}));
  Tensor hl = ops::gather_rows(h, last);             // (n, D)
  return ops::reshape(ops::linear(hl, score), {n});  // (n)
}

std::vector<double> RewardModel::score_responses(const Dialog& prompt,
                                                 const std::vector<std::string>& responses) const {
  autograd::NoGradGuard ng;
  std::vector<std::vector<int32_t>> seqs;
  const size_t ctx = size_t(policy.model->config().max_seq_len);
  for (auto& r : responses) {
    // A sampled response may re-encode longer than it was generated (U+FFFD for broken
    // UTF-8); the RM then scores what fits in its context.
    seqs.push_back(render_response(policy.tok, prompt, r).ids);
    if (seqs.back().size() > ctx) seqs.back().resize(ctx);
  }
  return scores(seqs).to_vector<double>();
}

std::vector<nn::NamedParam> RewardModel::parameters() {
  auto ps = policy.model->named_parameters();
  // The LM head does not influence the score: keep it out of the update.
  std::vector<nn::NamedParam> out;
  for (auto& p : ps)
    if (p.name != "lm_head.weight") out.push_back(p);
  out.push_back({"score.weight", &score, {true, false}});
  return out;
}

void RewardModel::save(const std::string& dir) const {
  io::TensorMap extra = policy.extra;
  extra["score.weight"] = score.detach();
  save_policy(*policy.model, policy.tokenizer_path, dir, extra);
}

namespace {
struct Pair {
  std::vector<int32_t> better, worse;
  std::string prompt, better_text, worse_text;  // for the per-pair records (eval_pairs.jsonl)
};
std::vector<Pair> to_pairs(const Tokenizer& tok, const std::vector<Preference>& prefs) {
  std::vector<Pair> out;
  for (auto& p : prefs)
    for (auto& [b, w] : ranked_pairs(p))
      out.push_back({render_response(tok, p.prompt, b).ids, render_response(tok, p.prompt, w).ids,
                     p.prompt.empty() ? std::string() : p.prompt.back().content, b, w});
  return out;
}
// Per pair: does the RM score the better response strictly higher. With `rows`, one record per
// pair (its held-out set, prompt, both responses and scores) is appended.
std::vector<uint8_t> pair_correct(const RewardModel& rm, const std::vector<Pair>& ps,
                                  std::vector<nlohmann::json>* rows = nullptr,
                                  const char* set = "") {
  autograd::NoGradGuard ng;
  std::vector<uint8_t> ok;
  ok.reserve(ps.size());
  for (size_t i = 0; i < ps.size(); i += 16) {
    std::vector<std::vector<int32_t>> seqs;
    const size_t e = std::min(ps.size(), i + 16);
    for (size_t j = i; j < e; ++j) seqs.push_back(ps[j].better);
    for (size_t j = i; j < e; ++j) seqs.push_back(ps[j].worse);
    auto s = rm.scores(seqs).to_vector<double>();
    const size_t n = e - i;
    for (size_t j = 0; j < n; ++j) {
      ok.push_back(s[j] > s[n + j]);
      if (rows)
        rows->push_back({{"set", set},
                         {"prompt", ps[i + j].prompt},
                         {"better", ps[i + j].better_text},
                         {"worse", ps[i + j].worse_text},
                         {"better_score", s[j]},
                         {"worse_score", s[n + j]},
                         {"correct", bool(ok.back())}});
    }
  }
  return ok;
}
double fraction(const std::vector<uint8_t>& ok) {
  int64_t n = 0;
  for (uint8_t c : ok) n += c;
  return ok.empty() ? 0.0 : double(n) / double(ok.size());
}
std::vector<Preference> load_all(const std::vector<std::string>& files, const Tokenizer& tok,
                                 const LoadOptions& lo, LoadReport* rep) {
  std::vector<Preference> out;
  for (auto& f : files) {
    auto v = load_preferences(f, tok, lo, rep);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

// The held-out sets an RM is judged on.
struct HeldOut {
  std::vector<Pair> generated;  // the generated held-out pairs
  std::vector<Pair> on_policy;  // the current policy's held-out samples (right vs wrong)
  // With `common`: the set every round's RM is compared on (the generated pairs plus earlier
  // policies' held-out samples, which no later RM trains on), and optionally an earlier RM to
  // compare with on it, pair by pair.
  bool common = false;
  std::vector<Pair> common_on_policy;
  std::string compare_with, tokenizer;
};

// Held-out accuracy over generated + on-policy pairs, and each part on its own (the on-policy
// part is what rejection sampling needs: ranking the policy's own samples); with h.common, the
// accuracy on the common set, and with h.compare_with that RM on the same pairs too: pairs
// this RM ranks right and the other wrong (fixed) and the reverse (broken), whose paired
// difference has a much tighter interval than two accuracies side by side. Each scored pair
// lands in `rows` (the generated ones once, though they are in two sets).
nlohmann::json held_out_metrics(const RewardModel& rm, const HeldOut& h,
                                std::vector<nlohmann::json>& rows) {
  const auto ok_gen = pair_correct(rm, h.generated, &rows, "generated");
  const auto ok_onp = pair_correct(rm, h.on_policy, &rows, "on_policy");
  const double n = double(ok_gen.size() + ok_onp.size());
  const double a = fraction(ok_gen), b = fraction(ok_onp);
  nlohmann::json j = {
      {"eval_accuracy", n > 0 ? (a * double(ok_gen.size()) + b * double(ok_onp.size())) / n : 0.0},
      {"eval_pairs", int64_t(n)},
      {"eval_accuracy_generated", a},
      {"eval_pairs_generated", int64_t(ok_gen.size())}};
  if (!ok_onp.empty())
    j["eval_accuracy_on_policy"] = b, j["eval_pairs_on_policy"] = int64_t(ok_onp.size());
  if (!h.common) return j;
  const size_t first_common = rows.size();
  std::vector<uint8_t> ok = ok_gen;
  const auto ok_c = pair_correct(rm, h.common_on_policy, &rows, "common_on_policy");
  ok.insert(ok.end(), ok_c.begin(), ok_c.end());
  j["eval_accuracy_common"] = fraction(ok), j["eval_pairs_common"] = int64_t(ok.size());
  if (h.compare_with.empty()) return j;
  RewardModel other(load_policy(ModelSource{.dir = h.compare_with, .tokenizer = h.tokenizer}));
  std::vector<Pair> common = h.generated;
  common.insert(common.end(), h.common_on_policy.begin(), h.common_on_policy.end());
  const auto ok2 = pair_correct(other, common);
  int64_t fixed = 0, broken = 0;
  for (size_t i = 0; i < ok.size(); ++i) {
    fixed += ok[i] && !ok2[i], broken += !ok[i] && ok2[i];
    // The common set's rows: the generated ones first, then its own on-policy ones.
    rows[i < ok_gen.size() ? i : first_common + i - ok_gen.size()]["compared_correct"] =
        bool(ok2[i]);
  }
  j["compared_eval_accuracy_common"] = fraction(ok2);
  j["common_fixed"] = fixed, j["common_broken"] = broken;
  return j;
}
}  // namespace

nlohmann::json evaluate_reward_model(const ModelSource& model, const std::string& eval_prefs,
                                     const std::vector<std::string>& eval_on_policy,
                                     const std::vector<std::string>& common_eval_on_policy,
                                     const std::string& compare_with,
                                     const std::string& pairs_path) {
  RewardModel rm(load_policy(model));
  LoadOptions lo;
  lo.max_tokens = rm.policy.model->config().max_seq_len;
  const Tokenizer& tok = rm.policy.tok;
  HeldOut h{.generated = to_pairs(tok, load_preferences(eval_prefs, tok, lo, nullptr)),
            .on_policy = to_pairs(tok, load_all(eval_on_policy, tok, lo, nullptr)),
            .common = !common_eval_on_policy.empty() || !compare_with.empty(),
            .common_on_policy = to_pairs(tok, load_all(common_eval_on_policy, tok, lo, nullptr)),
            .compare_with = compare_with,
            .tokenizer = rm.policy.tokenizer_path};
  std::vector<nlohmann::json> rows;
  auto j = held_out_metrics(rm, h, rows);
  if (!pairs_path.empty()) write_jsonl(pairs_path, rows);
  return j;
}

std::vector<Preference> balance_response_pairs(const std::vector<Preference>& prefs) {
  std::unordered_map<std::string, int64_t> chosen, rejected;
  for (const Preference& p : prefs) ++chosen[p.chosen], ++rejected[p.rejected];
  // How many more of each role. A response only ever in one role (a word task's answer, or a
  // fragment the policy made up) has no room limit: it is specific to its prompt, so there is no
  // frequency across prompts to balance, and dropping its pairs would leave the RM with almost
  // no word-task pairs of the policy's own (r2_rm kept 83 of 1,012 period-task pairs).
  constexpr int64_t kFree = std::numeric_limits<int64_t>::max();
  std::unordered_map<std::string, int64_t> room_c, room_r;
  for (const auto& [a, n] : chosen) {
    const auto it = rejected.find(a);
    room_c[a] = room_r[a] = it == rejected.end() ? kFree : std::min(n, it->second);
  }
  for (const auto& [a, n] : rejected) room_c.emplace(a, kFree), room_r.emplace(a, kFree);
  std::vector<Preference> out;
  for (const Preference& p : prefs) {
    int64_t &c = room_c[p.chosen], &r = room_r[p.rejected];
    if (c > 0 && r > 0) c -= c != kFree, r -= r != kFree, out.push_back(p);
  }
  return out;
}

PostStageResult run_reward_model(const RewardOptions& o) {
  LLAMA3_CHECK(!o.prefs.empty() || !o.on_policy_prefs.empty(), "reward model: no preference files");
  LLAMA3_CHECK(o.on_policy_fraction >= 0 && o.on_policy_fraction <= 1,
               "reward model: on_policy_fraction {} outside [0, 1]", o.on_policy_fraction);
  RewardModel rm(load_policy(o.model));
  LoadOptions lo = o.load;
  lo.max_tokens = rm.policy.model->config().max_seq_len;
  std::vector<Preference> prefs, eval, onp_prefs;
  nlohmann::json metrics = nlohmann::json::object();
  int64_t skipped = 0;
  auto load = [&](const std::vector<std::string>& files, std::vector<Preference>& to) {
    for (auto& f : files) {
      LoadReport rep;
      auto v = load_preferences(f, rm.policy.tok, lo, &rep);
      to.insert(to.end(), v.begin(), v.end());
      skipped += rep.skipped_total();
      for (auto& [k, n] : rep.skipped)
        metrics["skipped_" + k] = metrics.value("skipped_" + k, int64_t(0)) + n;
    }
  };
  load(o.prefs, prefs);
  load(o.on_policy_prefs, onp_prefs);
  if (o.balance_responses) {
    std::mt19937_64 gb(o.seed + 1);  // which pairs of an over-represented answer are kept
    std::shuffle(onp_prefs.begin(), onp_prefs.end(), gb);
    const size_t before = onp_prefs.size();
    onp_prefs = balance_response_pairs(onp_prefs);
    metrics["balance_dropped_pairs"] = int64_t(before - onp_prefs.size());
  }
  // Without a share of their own, on-policy pairs are simply more preference data.
  if (o.on_policy_fraction <= 0)
    prefs.insert(prefs.end(), onp_prefs.begin(), onp_prefs.end()), onp_prefs.clear();
  std::mt19937_64 g(o.seed);
  std::shuffle(prefs.begin(), prefs.end(), g);
  if (!o.eval_prefs.empty()) {
    eval = load_preferences(o.eval_prefs, rm.policy.tok, lo, nullptr);
  } else {
    const size_t ne = size_t(double(prefs.size()) * o.eval_fraction);
    eval.assign(prefs.end() - ne, prefs.end());
    prefs.resize(prefs.size() - ne);
  }
  auto train = to_pairs(rm.policy.tok, prefs), held = to_pairs(rm.policy.tok, eval),
       onp = to_pairs(rm.policy.tok, onp_prefs);
  auto held_onp = to_pairs(rm.policy.tok, load_all(o.eval_on_policy, rm.policy.tok, lo, nullptr));
  // With no pairs of one pool, every batch comes from the other.
  const int64_t n_onp =
      onp.empty() ? 0
      : train.empty()
          ? o.batch
          : std::clamp<int64_t>(int64_t(std::lround(o.on_policy_fraction * double(o.batch))), 1,
                                o.batch - 1);
  LLAMA3_CHECK(!train.empty() || !onp.empty(),
               "reward model: no usable preference pairs ({} skipped)", skipped);
  spdlog::info(
      "reward model: {} training pairs from {} prompts + {} on-policy pairs ({} of {} per batch), "
      "{} + {} "
      "held-out pairs",
      train.size(), prefs.size(), onp.size(), n_onp, o.batch, held.size(), held_onp.size());
  TrainLoopOptions to = o.train;
  to.steps = o.steps;
  to.tag = "reward_model";
  // Two pools, each shuffled and walked in epochs.
  struct Pool {
    const std::vector<Pair>* pairs;
    std::vector<size_t> order;
    size_t cursor = 0;
  };
  auto make_pool = [](const std::vector<Pair>& ps) {
    Pool p{&ps, std::vector<size_t>(ps.size()), ps.size()};
    for (size_t i = 0; i < ps.size(); ++i) p.order[i] = i;
    return p;
  };
  Pool gen_pool = make_pool(train), onp_pool = make_pool(onp);
  auto draw = [&](Pool& p) -> const Pair& {
    if (p.cursor >= p.order.size()) std::shuffle(p.order.begin(), p.order.end(), g), p.cursor = 0;
    return (*p.pairs)[p.order[p.cursor++]];
  };
  const double loss = train_loop(rm.parameters(), to, [&](int64_t) {
    std::vector<const Pair*> pick;
    for (int64_t j = 0; j < o.batch; ++j) pick.push_back(&draw(j < n_onp ? onp_pool : gen_pool));
    std::vector<std::vector<int32_t>> seqs;
    for (const Pair* q : pick) seqs.push_back(q->better);
    for (const Pair* q : pick) seqs.push_back(q->worse);
    Tensor s = ops::reshape(rm.scores(seqs), {2 * o.batch, 1});
    std::vector<int64_t> a(static_cast<size_t>(o.batch)), b(static_cast<size_t>(o.batch));
    for (int64_t j = 0; j < o.batch; ++j) a[size_t(j)] = j, b[size_t(j)] = o.batch + j;
    return ops::pairwise_logistic_loss(ops::reshape(ops::gather_rows(s, a), {o.batch}),
                                       ops::reshape(ops::gather_rows(s, b), {o.batch}), 1.f);
  });
  metrics["train_loss"] = loss;
  metrics["train_pairs"] = int64_t(train.size() + onp.size());
  if (!onp.empty()) metrics["train_pairs_on_policy"] = int64_t(onp.size());
  HeldOut h{.generated = std::move(held),
            .on_policy = std::move(held_onp),
            .common = !o.common_eval_on_policy.empty() || !o.compare_with.empty(),
            .common_on_policy = to_pairs(
                rm.policy.tok, load_all(o.common_eval_on_policy, rm.policy.tok, lo, nullptr)),
            .compare_with = o.compare_with,
            .tokenizer = rm.policy.tokenizer_path};
  std::vector<nlohmann::json> rows;
  metrics.update(held_out_metrics(rm, h, rows));
  metrics["skipped"] = skipped;
  spdlog::info("reward model: held-out pairwise accuracy {:.3f} on {} pairs",
               metrics["eval_accuracy"].get<double>(), metrics["eval_pairs"].get<int64_t>());
  rm.save(o.out_dir);
  write_jsonl(o.pairs_path.empty() ? o.out_dir + "/eval_pairs.jsonl" : o.pairs_path, rows);
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
