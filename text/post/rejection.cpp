// Rejection sampling: K sampled responses per prompt from the policy, scored by the reward
// model; the best becomes an SFT example, best vs worst a preference pair, and the verifier's
// correct-vs-wrong samples become on-policy preference pairs; optionally the RM also ranks the
// samples of prompts none of whose samples verifies. Without a reward model the stage only
// samples and labels (the annotation step before a round's reward model).
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>

#include "text/post/stages.h"

namespace llama3::text::post {

namespace {
nlohmann::json messages_json(const Dialog& d) {
  nlohmann::json a = nlohmann::json::array();
  for (auto& m : d) a.push_back({{"role", role_name(m.role)}, {"content", m.content}});
  return a;
}
void check_sample_sizes(const char* what, const std::vector<std::string>& responses,
                        const std::vector<uint8_t>& correct, const std::vector<double>& scores) {
  LLAMA3_CHECK(correct.size() == responses.size() && scores.size() == responses.size(),
               "{}: {} responses, {} labels, {} scores", what, responses.size(), correct.size(),
               scores.size());
}
}  // namespace

std::vector<std::pair<size_t, size_t>> verified_pairs(const std::vector<std::string>& responses,
                                                      const std::vector<uint8_t>& correct,
                                                      const std::vector<double>& scores) {
  check_sample_sizes("verified_pairs", responses, correct, scores);
  std::vector<size_t> good, bad;
  for (size_t j = 0; j < responses.size(); ++j) {
    if (correct[j])
      good.push_back(j);
    else if (!trim(responses[j]).empty())
      bad.push_back(j);
  }
  auto by_score = [&](size_t a, size_t b) { return scores[a] > scores[b]; };
  std::stable_sort(good.begin(), good.end(), by_score);
  std::stable_sort(bad.begin(), bad.end(), by_score);
  std::vector<std::pair<size_t, size_t>> out;
  if (good.empty()) return out;
  std::set<std::string> seen;
  for (size_t j : bad)
    if (seen.insert(responses[j]).second) out.emplace_back(good[out.size() % good.size()], j);
  return out;
}

std::vector<std::pair<size_t, size_t>> ranked_wrong_pairs(const std::vector<std::string>& responses,
                                                          const std::vector<uint8_t>& correct,
                                                          const std::vector<double>& scores) {
  check_sample_sizes("ranked_wrong_pairs", responses, correct, scores);
  std::vector<std::pair<size_t, size_t>> out;
  std::vector<size_t> wrong;
  for (size_t j = 0; j < responses.size(); ++j) {
    if (correct[j]) return out;
    if (!trim(responses[j]).empty()) wrong.push_back(j);
  }
  if (wrong.empty()) return out;
  size_t best = wrong[0];  // the first of equal bests
  for (size_t j : wrong)
    if (scores[j] > scores[best]) best = j;
  std::stable_sort(wrong.begin(), wrong.end(),
                   [&](size_t a, size_t b) { return scores[a] < scores[b]; });
  std::set<std::string> seen{responses[best]};
  for (size_t j : wrong)
    if (scores[j] < scores[best] && seen.insert(responses[j]).second) out.emplace_back(best, j);
  return out;
}

PostStageResult run_rejection_sampling(const RejectionOptions& o) {
  LLAMA3_CHECK(o.k >= 1, "rejection sampling: k must be >= 1, got {}", o.k);
  LLAMA3_CHECK(!o.rank_wrong_pairs || !o.reward_model.empty(),
               "rejection sampling: rank_wrong_pairs needs a reward model to rank with");
  Policy p = load_policy(o.policy);
  // Without a reward model the stage only samples and lets the verifier label the samples
  // (the paper's annotation of the latest model's outputs, for the next reward model).
  std::optional<RewardModel> rm;
  if (!o.reward_model.empty())
    rm.emplace(
        load_policy(ModelSource{.dir = o.reward_model, .tokenizer = o.reward_model_tokenizer}));
  LoadOptions lo = o.load;
  lo.max_tokens = p.model->config().max_seq_len - o.sampling.max_new_tokens;
  LoadReport rep;
  auto prompts = load_prompts(o.prompts, p.tok, lo, &rep);
  if (o.max_prompts > 0 && int64_t(prompts.size()) > o.max_prompts)
    prompts.resize(size_t(o.max_prompts));
  LLAMA3_CHECK(!prompts.empty(), "rejection sampling: no usable prompts in {}", o.prompts);
  std::filesystem::create_directories(o.out_dir);
  std::ofstream sft(o.out_dir + "/sft.jsonl"), prefs(o.out_dir + "/prefs.jsonl"),
      vprefs(o.out_dir + "/verified_prefs.jsonl");
  // Every sample with its score and verdict: what a reader needs to see why the RM picked
  // what it picked (the best-of-K gain is one number over all of them).
  std::ofstream all(o.out_dir + "/samples.jsonl");
  std::optional<std::ofstream> rprefs;
  if (o.rank_wrong_pairs) rprefs.emplace(o.out_dir + "/ranked_prefs.jsonl");
  SamplingOptions so = o.sampling;
  so.stop_ids = stop_ids(p.tok);
  int64_t kept = 0, verified = 0, best_correct = 0, sample_correct = 0, samples = 0, pairs = 0,
          vpairs = 0, any_correct = 0, rpairs = 0;
  double sum_best = 0, sum_mean = 0;
  // Per verifiable prompt: the RM's pick is correct (0/1) minus the share of correct samples;
  // the mean is the verifier's best-of-K gain, the spread gives its interval.
  double gain_sum = 0, gain_sq = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<std::vector<int32_t>> ps(size_t(o.k), render(p.tok, prompts[i].messages, true).ids);
    so.seed = o.sampling.seed * 1000003 + i;
    auto gens = generate(*p.model, ps, so);
    std::vector<std::string> resp;
    for (auto& g : gens) resp.push_back(decode_text(p.tok, g.tokens));
    // No RM: every sample scores 0, so "best" is the first sample (a random one).
    const std::vector<double> sc =
        rm ? rm->score_responses(prompts[i].messages, resp) : std::vector<double>(resp.size(), 0.0);
    const size_t best = size_t(std::max_element(sc.begin(), sc.end()) - sc.begin());
    const size_t worst = size_t(std::min_element(sc.begin(), sc.end()) - sc.begin());
    double mean = 0;
    for (double s : sc) mean += s;
    mean /= double(sc.size());
    sum_best += sc[best], sum_mean += mean;
    // One preference pair as a JSONL line (the RM's scores with it where they rank it).
    auto write_pair = [&](std::ostream& f, size_t c, size_t w, bool with_scores) {
      nlohmann::json j = {{"prompt", messages_json(prompts[i].messages)},
                          {"chosen", resp[c]},
                          {"rejected", resp[w]}};
      if (with_scores) j["scores"] = {sc[c], sc[w]};
      f << j.dump() << "\n";
    };
    const bool has_answer = !prompts[i].answer.empty();
    std::vector<uint8_t> ok;
    if (has_answer)
      for (auto& r : resp) ok.push_back(verify(prompts[i], r));
    {
      nlohmann::json rec = {{"prompt", messages_json(prompts[i].messages)}};
      if (rm) rec["best"] = best;  // the RM's pick
      if (has_answer) rec["answer"] = prompts[i].answer;
      nlohmann::json ss = nlohmann::json::array();
      for (size_t j = 0; j < resp.size(); ++j) {
        nlohmann::json x = {{"response", resp[j]}};
        if (rm) x["score"] = sc[j];
        if (has_answer) x["correct"] = bool(ok[j]);
        ss.push_back(std::move(x));
      }
      rec["samples"] = std::move(ss);
      all << rec.dump() << "\n";
    }
    size_t pick = best;
    if (has_answer) {
      ++verified;
      best_correct += ok[best];
      for (uint8_t x : ok) sample_correct += x, ++samples;
      for (auto [c, w] : verified_pairs(resp, ok, sc)) {
        write_pair(vprefs, c, w, false);
        ++vpairs;
      }
      if (rprefs)
        for (auto [c, w] : ranked_wrong_pairs(resp, ok, sc)) {
          write_pair(*rprefs, c, w, true);
          ++rpairs;
        }
      std::vector<size_t> good;
      for (size_t j = 0; j < resp.size(); ++j)
        if (ok[j]) good.push_back(j);
      std::stable_sort(good.begin(), good.end(), [&](size_t a, size_t b) { return sc[a] > sc[b]; });
      any_correct += !good.empty();
      const double d = double(ok[best]) - double(good.size()) / double(resp.size());
      gain_sum += d, gain_sq += d * d;
      if (o.require_correct) {
        if (good.empty()) continue;
        pick = good[0];
      }
    }
    if (sc[pick] < o.min_score || trim(resp[pick]).empty()) continue;
    ++kept;
    Dialog d = prompts[i].messages;
    d.push_back(Message{Role::kAssistant, resp[pick], false});
    nlohmann::json rec = {{"messages", messages_json(d)}};
    if (rm) rec["score"] = sc[pick], rec["mean_score"] = mean;
    if (has_answer) rec["answer"] = prompts[i].answer;
    sft << rec.dump() << "\n";
    if (rm && resp[best] != resp[worst] && !trim(resp[worst]).empty()) {
      write_pair(prefs, best, worst, true);
      ++pairs;
    }
  }
  const double n = double(prompts.size());
  nlohmann::json metrics = {{"prompts", int64_t(prompts.size())},
                            {"k", o.k},
                            {"kept", kept},
                            {"acceptance", double(kept) / n},
                            {"verified_pairs", vpairs},
                            {"skipped", rep.skipped_total()}};
  if (rm) {
    metrics["mean_score"] = sum_mean / n;
    metrics["mean_best_score"] = sum_best / n;
    // In the RM's own score: the best of K is at least the mean by construction.
    metrics["best_of_k_gain"] = (sum_best - sum_mean) / n;
    metrics["pairs"] = pairs;
    if (o.rank_wrong_pairs) metrics["ranked_wrong_pairs"] = rpairs;
  }
  if (verified) {
    metrics["sample_correct_rate"] = double(sample_correct) / double(samples);
    metrics["any_correct_rate"] = double(any_correct) / double(verified);
    if (rm) {
      metrics["best_correct_rate"] = double(best_correct) / double(verified);
      // Best-of-K gain as the verifier sees it: the RM's pick vs a random sample; negative
      // when the RM prefers wrong answers.
      metrics["verified_best_of_k_gain"] =
          metrics["best_correct_rate"].get<double>() - metrics["sample_correct_rate"].get<double>();
      // Half-width of its 95% interval over the prompts (paired per prompt).
      const double nv = double(verified), mg = gain_sum / nv;
      metrics["verified_best_of_k_gain_h"] =
          1.96 * std::sqrt(std::max(0.0, gain_sq / nv - mg * mg) / nv);
    }
  }
  spdlog::info("rejection sampling: {}", metrics.dump());
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
