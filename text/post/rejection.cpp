// Rejection sampling: K sampled responses per prompt from the policy, scored by the reward
// model; the best becomes an SFT example, best vs worst a preference pair, and the verifier's
// correct-vs-wrong samples become on-policy preference pairs. Without a reward model the
// stage only samples and labels (the annotation step before a round's reward model).
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
}  // namespace

std::vector<std::pair<size_t, size_t>> verified_pairs(const std::vector<std::string>& responses,
                                                      const std::vector<uint8_t>& correct,
                                                      const std::vector<double>& scores) {
  LLAMA3_CHECK(correct.size() == responses.size() && scores.size() == responses.size(),
               "verified_pairs: {} responses, {} labels, {} scores", responses.size(),
               correct.size(), scores.size());
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

PostStageResult run_rejection_sampling(const RejectionOptions& o) {
  LLAMA3_CHECK(o.k >= 1, "rejection sampling: k must be >= 1, got {}", o.k);
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
  SamplingOptions so = o.sampling;
  so.stop_ids = stop_ids(p.tok);
  int64_t kept = 0, verified = 0, best_correct = 0, sample_correct = 0, samples = 0, pairs = 0,
          vpairs = 0, any_correct = 0;
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
    const bool has_answer = !prompts[i].answer.empty();
    size_t pick = best;
    if (has_answer) {
      ++verified;
      best_correct += verify(prompts[i], resp[best]);
      std::vector<uint8_t> ok(resp.size());
      for (size_t j = 0; j < resp.size(); ++j)
        ok[j] = verify(prompts[i], resp[j]), sample_correct += ok[j], ++samples;
      for (auto [c, w] : verified_pairs(resp, ok, sc)) {
        vprefs << nlohmann::json({{"prompt", messages_json(prompts[i].messages)},
                                  {"chosen", resp[c]},
                                  {"rejected", resp[w]}})
                      .dump()
               << "\n";
        ++vpairs;
      }
      std::vector<size_t> good;
      for (size_t j = 0; j < resp.size(); ++j)
        if (ok[j]) good.push_back(j);
      std::stable_sort(good.begin(), good.end(), [&](size_t a, size_t b) { return sc[a] > sc[b]; });
      any_correct += !good.empty();
      const double d =
          double(verify(prompts[i], resp[best])) - double(good.size()) / double(resp.size());
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
      prefs << nlohmann::json({{"prompt", messages_json(prompts[i].messages)},
                               {"chosen", resp[best]},
                               {"rejected", resp[worst]},
                               {"scores", {sc[best], sc[worst]}}})
                   .dump()
            << "\n";
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
