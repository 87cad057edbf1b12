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
  RewardModel rm(load_policy(ModelSource{.dir = o.reward_model, .tokenizer = ""}));
  LoadOptions lo = o.load;
  lo.max_tokens = p.model->config().max_seq_len - o.sampling.max_new_tokens;
  LoadReport rep;
  auto prompts = load_prompts(o.prompts, p.tok, lo, &rep);
  LLAMA3_CHECK(!prompts.empty(), "rejection sampling: no usable prompts in {}", o.prompts);
  std::filesystem::create_directories(o.out_dir);
  std::ofstream sft(o.out_dir + "/sft.jsonl"), prefs(o.out_dir + "/prefs.jsonl");
  SamplingOptions so = o.sampling;
  so.stop_ids = stop_ids(p.tok);
  int64_t kept = 0, verified = 0, best_correct = 0, sample_correct = 0, samples = 0, pairs = 0;
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
    if (!prompts[i].answer.empty()) {
      ++verified;
      best_correct += verify(prompts[i], resp[best]);
      for (auto& r : resp) sample_correct += verify(prompts[i], r), ++samples;
    }
    if (sc[best] < o.min_score || trim(resp[best]).empty()) continue;
    ++kept;
    Dialog d = prompts[i].messages;
    d.push_back(Message{Role::kAssistant, resp[best], false});
    nlohmann::json rec = {{"messages", messages_json(d)}, {"score", sc[best]}, {"mean_score", mean}};
    if (!prompts[i].answer.empty()) rec["answer"] = prompts[i].answer;
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
                            {"skipped", rep.skipped_total()}};
  if (verified) {
    metrics["best_correct_rate"] = double(best_correct) / double(verified);
    metrics["sample_correct_rate"] = double(sample_correct) / double(samples);
  }
  spdlog::info("rejection sampling: {}", metrics.dump());
  write_final(o.out_dir, metrics);
  return {o.out_dir, metrics};
}

}  // namespace llama3::text::post
