// Rejection sampling: K sampled responses per prompt from the policy, scored by the reward
// model; the best becomes an SFT example, best vs worst a preference pair.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "text/post/stages.h"

namespace llama3::text::post {

namespace {
nlohmann::json messages_json(const Dialog& d) {
  nlohmann::json a = nlohmann::json::array();
  for (auto& m : d) a.push_back({{"role", role_name(m.role)}, {"content", m.content}});
  return a;
}
}  // namespace

PostStageResult run_rejection_sampling(const RejectionOptions& o) {
  LLAMA3_CHECK(o.k >= 1, "rejection sampling: k must be >= 1, got {}", o.k);
  Policy p = load_policy(o.policy);
  RewardModel rm(load_policy(ModelSource{.dir = o.reward_model, .tokenizer = o.reward_model_tokenizer}));
  LoadOptions lo = o.load;
  lo.max_tokens = p.model->config().max_seq_len - o.sampling.max_new_tokens;
  LoadReport rep;
  auto prompts = load_prompts(o.prompts, p.tok, lo, &rep);
  LLAMA3_CHECK(!prompts.empty(), "rejection sampling: no usable prompts in {}", o.prompts);
  std::filesystem::create_directories(o.out_dir);
  std::ofstream sft(o.out_dir + "/sft.jsonl"), prefs(o.out_dir + "/prefs.jsonl"),
      vprefs(o.out_dir + "/verified_prefs.jsonl");
  SamplingOptions so = o.sampling;
  so.stop_ids = stop_ids(p.tok);
  int64_t kept = 0, verified = 0, best_correct = 0, sample_correct = 0, samples = 0, pairs = 0, vpairs = 0,
          any_correct = 0;
  double sum_best = 0, sum_mean = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<std::vector<int32_t>> ps(size_t(o.k), render(p.tok, prompts[i].messages, true).ids);
    so.seed = o.sampling.seed * 1000003 + i;
    auto gens = generate(*p.model, ps, so);
    std::vector<std::string> resp;
    for (auto& g : gens) resp.push_back(decode_text(p.tok, g.tokens));
    auto sc = rm.score_responses(prompts[i].messages, resp);
    const size_t best = size_t(std::max_element(sc.begin(), sc.end()) - sc.begin());
    const size_t worst = size_t(std::min_element(sc.begin(), sc.end()) - sc.begin());
    double mean = 0;
    for (double s : sc) mean += s;
    mean /= double(sc.size());
    sum_best += sc[best], sum_mean += mean;
    const bool has_answer = !prompts[i].answer.empty();
    std::vector<uint8_t> ok(resp.size(), 0);
    size_t pick = best;
    if (has_answer) {
      ++verified;
      best_correct += verify(prompts[i], resp[best]);
      for (size_t j = 0; j < resp.size(); ++j) ok[j] = verify(prompts[i], resp[j]), sample_correct += ok[j], ++samples;
      // The verifier's pair: the RM's favourite among the correct samples vs its favourite
      // among the wrong ones (the hardest negative), when the K samples hold both.
      int64_t good = -1, bad = -1;
      for (size_t j = 0; j < resp.size(); ++j) {
        if (ok[j] && (good < 0 || sc[j] > sc[size_t(good)])) good = int64_t(j);
        if (!ok[j] && !trim(resp[j]).empty() && (bad < 0 || sc[j] > sc[size_t(bad)])) bad = int64_t(j);
      }
      any_correct += good >= 0;
      if (good >= 0 && bad >= 0 && resp[size_t(good)] != resp[size_t(bad)]) {
        vprefs << nlohmann::json({{"prompt", messages_json(prompts[i].messages)},
                                  {"chosen", resp[size_t(good)]},
                                  {"rejected", resp[size_t(bad)]}})
                      .dump()
               << "\n";
        ++vpairs;
      }
      if (o.require_correct) {
        if (good < 0) continue;
        pick = size_t(good);
      }
    }
    if (sc[pick] < o.min_score || trim(resp[pick]).empty()) continue;
    ++kept;
    Dialog d = prompts[i].messages;
    d.push_back(Message{Role::kAssistant, resp[pick], false});
    nlohmann::json rec = {{"messages", messages_json(d)}, {"score", sc[pick]}, {"mean_score", mean}};
    if (has_answer) rec["answer"] = prompts[i].answer;
    sft << rec.dump() << "\n";
    if (resp[best] != resp[worst] && !trim(resp[worst]).empty()) {
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
                            {"mean_score", sum_mean / n},
                            {"mean_best_score", sum_best / n},
                            {"best_of_k_gain", (sum_best - sum_mean) / n},
                            {"pairs", pairs},
                            {"verified_pairs", vpairs},
                            {"skipped", rep.skipped_total()}};
  if (verified) {
    metrics["best_correct_rate"] = double(best_correct) / double(verified);
    metrics["sample_correct_rate"] = double(sample_correct) / double(samples);
    metrics["any_correct_rate"] = double(any_correct) / double(verified);
    // Best-of-K gain as the verifier sees it: the RM's pick vs a random sample.
    metrics["verified_best_of_k_gain"] = metrics["best_correct_rate"].get<double>() -
                                         metrics["sample_correct_rate"].get<double>();
  }
  spdlog::info("rejection sampling: {}", metrics.dump());
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
