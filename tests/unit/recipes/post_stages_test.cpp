// Post-training stage kinds in recipes: validation of their inputs and options (file:line
// and field in every error), the dependencies the runner waits for, and the plan rows.
#include "recipes/post_stages.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "recipes/recipe.h"
#include "recipes/runner.h"
#include "runtime/core/error.h"
#include "test_util.h"

using namespace llama3;
using namespace llama3::recipes;

namespace {

// A valid post-training recipe; line numbers below refer to this text.
const char* kPost = R"(name: "p"
stage { name: "pd" kind: POST_DATA post_data { sft_dialogs: 10 bpe_vocab: 400 } }
stage { name: "sft" kind: SFT data_from: "pd" model { flavour: "debug" } optimizer { lr: 1e-3 } }
stage { name: "rm" kind: REWARD_MODEL round: 1 data_from: "pd" init_from: "sft" optimizer { lr: 1e-3 } }
stage { name: "rm_avg" kind: AVERAGE average { stages: "rm" stages: "rm" } }
stage { name: "rs" kind: REJECTION_SAMPLING round: 1 data_from: "pd" init_from: "sft"
        reward_model_from: "rm_avg" rejection_sampling { k: 4 } }
stage { name: "dpo" kind: DPO round: 1 data_from: "pd" init_from: "sft" samples_from: "rs"
        reward_model_from: "rm" optimizer { lr: 1e-4 } dpo { steps: 5 } }
)";

using test_util::replace;

std::string error_of(const std::string& text) {
  return test_util::error_of([&] { LoadedRecipe::parse(text, "p.textproto").validate(true); });
}

// A finished run directory for post_rounds_markdown: the recipe and each stage's final.json,
// removed again when the test ends.
struct ReportRun {
  std::filesystem::path dir;
  ReportRun(const std::string& name, const std::string& recipe)
      : dir(std::filesystem::temp_directory_path() / fmt::format("{}_{}", name, ::getpid())) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    std::ofstream(dir / "recipe.textproto") << recipe;
  }
  ~ReportRun() { std::filesystem::remove_all(dir); }
  void write(const std::string& stage, const std::string& final_json) const {
    std::filesystem::create_directories(dir / stage);
    std::ofstream(dir / stage / "final.json") << final_json;
  }
  std::string markdown() const { return post_rounds_markdown(dir.string()); }
};

}  // namespace

TEST(PostStages, ValidRecipePassesAndPlansEveryStage) {
  auto r = LoadedRecipe::parse(kPost, "p.textproto");
  EXPECT_NO_THROW(r.validate(true));
  std::ostringstream plan;
  print_plan(r, plan);
  for (const char* s : {"pd ", "sft ", "rm ", "rm_avg ", "rs ", "dpo "})
    EXPECT_NE(plan.str().find(std::string("\n") + s), std::string::npos) << s << "\n" << plan.str();
  EXPECT_NE(plan.str().find("K=4 samples of sft, scored by rm_avg"), std::string::npos)
      << plan.str();
  EXPECT_NE(plan.str().find("round 1: 5 steps x 8 pairs"), std::string::npos) << plan.str();
}

TEST(PostStages, RunnerWaitsForRewardModelAndSamples) {
  auto r = LoadedRecipe::parse(kPost, "p.textproto");
  EXPECT_EQ(post_stage_inputs(r.recipe().stage(5)), (std::vector<std::string>{"rm", "rs"}));
  EXPECT_EQ(post_stage_inputs(r.recipe().stage(4)), (std::vector<std::string>{"rm_avg"}));
  EXPECT_TRUE(post_stage_inputs(r.recipe().stage(3)).empty());  // AVERAGE: not a post kind
}

TEST(PostStages, RejectionSamplingWithoutARewardModelOnlyLabelsWithTheVerifier) {
  auto r = LoadedRecipe::parse(replace(kPost, "reward_model_from: \"rm_avg\" ", ""), "p.textproto");
  EXPECT_NO_THROW(r.validate(true));
  EXPECT_TRUE(post_stage_inputs(r.recipe().stage(4)).empty());
  std::ostringstream plan;
  print_plan(r, plan);
  EXPECT_NE(plan.str().find("K=4 samples of sft, labelled by the verifier only (no reward model)"),
            std::string::npos)
      << plan.str();
}

TEST(PostStages, SftTakesNoRewardModelAndAnRmOneOnlyToCompareOnTheCommonSet) {
  std::string e =
      error_of(replace(kPost, "model { flavour: \"debug\" } optimizer",
                       "model { flavour: \"debug\" } reward_model_from: \"pd\" optimizer"));
  EXPECT_NE(e.find("stage 'sft' field reward_model_from: a SFT stage uses no reward model"),
            std::string::npos)
      << e;
  // An RM takes an earlier RM only to compare with it on the common held-out set.
  const std::string second =
      std::string(kPost) +
      "stage { name: \"ho\" kind: REJECTION_SAMPLING round: 1 data_from: \"pd\" init_from: \"sft\" "
      "rejection_sampling { k: 2 held_out: true } }\n"
      "stage { name: \"rm2\" kind: REWARD_MODEL round: 2 data_from: \"pd\" init_from: \"rm_avg\" "
      "reward_model_from: \"rm_avg\" common_eval_samples_from: \"ho\" optimizer { lr: 1e-3 } }\n";
  auto r = LoadedRecipe::parse(second, "p.textproto");
  EXPECT_NO_THROW(r.validate(true)) << second;
  EXPECT_EQ(post_stage_inputs(r.recipe().stage(7)), (std::vector<std::string>{"rm_avg", "ho"}));
  e = error_of(replace(second, " common_eval_samples_from: \"ho\"", ""));
  EXPECT_NE(e.find("stage 'rm2' field reward_model_from: a REWARD_MODEL stage takes an earlier RM "
                   "only to compare with it on the common held-out set"),
            std::string::npos)
      << e;
  // The common set comes from held-out annotations only, like eval_samples_from.
  e = error_of(
      replace(second, "common_eval_samples_from: \"ho\"", "common_eval_samples_from: \"rs\""));
  EXPECT_NE(e.find("field common_eval_samples_from[0]: stage 'rs' is not a REJECTION_SAMPLING "
                   "stage with held_out"),
            std::string::npos)
      << e;
}

TEST(PostStages, RewardModelFromMustBeARewardModel) {
  const std::string e =
      error_of(replace(kPost, "reward_model_from: \"rm\"", "reward_model_from: \"sft\""));
  EXPECT_NE(
      e.find(
          "p.textproto:9:9: stage 'dpo' field reward_model_from: stage 'sft' is a SFT stage, not "
          "REWARD_MODEL (or an AVERAGE of them)"),
      std::string::npos)
      << e;
}

TEST(PostStages, UnknownAndLaterStagesAreRejected) {
  std::string e = error_of(replace(kPost, "samples_from: \"rs\"", "samples_from: \"rz\""));
  EXPECT_NE(e.find("p.textproto:8:73: stage 'dpo' field samples_from[0]: no stage named 'rz' "
                   "before this one"),
            std::string::npos)
      << e;
  e = error_of(replace(kPost, "init_from: \"sft\" optimizer", "init_from: \"dpo\" optimizer"));
  EXPECT_NE(e.find("stage 'rm' field init_from: 'dpo' is a later stage (stage 5)"),
            std::string::npos)
      << e;
  e = error_of(replace(kPost, "samples_from: \"rs\"", "samples_from: \"rm\""));
  EXPECT_NE(
      e.find("field samples_from[0]: stage 'rm' is a REWARD_MODEL stage, not REJECTION_SAMPLING"),
      std::string::npos)
      << e;
}

TEST(PostStages, DataMustComeFromPostData) {
  std::string e = error_of(
      replace(kPost, "name: \"sft\" kind: SFT data_from: \"pd\" ", "name: \"sft\" kind: SFT "));
  EXPECT_NE(e.find("p.textproto:3:1: stage 'sft' field data_from: a SFT stage needs data_from: a "
                   "POST_DATA stage"),
            std::string::npos)
      << e;
  e = error_of(replace(kPost, "kind: REWARD_MODEL round: 1 data_from: \"pd\"",
                       "kind: REWARD_MODEL round: 1 data_from: \"sft\""));
  EXPECT_NE(e.find("p.textproto:4:"), std::string::npos) << e;
  EXPECT_NE(e.find("field data_from: stage 'sft' is a SFT stage, not POST_DATA"), std::string::npos)
      << e;
}

TEST(PostStages, OptionsBelongToTheirKindAndPretrainingFieldsAreRejected) {
  std::string e = error_of(replace(kPost, "dpo { steps: 5 }", "sft { steps: 5 }"));
  EXPECT_NE(e.find("p.textproto:9:56: stage 'dpo' field sft: only SFT stages take it"),
            std::string::npos)
      << e;
  e = error_of(replace(kPost, "dpo { steps: 5 }", "dpo { steps: 5 } total_tokens: 100"));
  EXPECT_NE(
      e.find("stage 'dpo' field total_tokens: a DPO stage takes its budget from its own options"),
      std::string::npos)
      << e;
  e = error_of(replace(kPost, "optimizer { lr: 1e-4 } ", ""));
  EXPECT_NE(e.find("stage 'dpo' field optimizer.lr: must be > 0 (got 0)"), std::string::npos) << e;
  e = error_of(
      replace(kPost, "rejection_sampling { k: 4 }", "rejection_sampling { k: 4 min_score: 1 }"));
  EXPECT_NE(e.find("field rejection_sampling.min_score: set has_min_score: true to use it"),
            std::string::npos)
      << e;
  e = error_of(replace(kPost, "model { flavour: \"debug\" }", "model { flavour: \"huge\" }"));
  EXPECT_NE(e.find("p.textproto:3:55: stage 'sft' field model.flavour:"), std::string::npos) << e;
}

TEST(PostStages, ModelStagesFeedAverageAndLaterInitFrom) {
  // An AVERAGE of post-trained models, and a PRETRAIN stage is not a reward model.
  std::string ok =
      replace(kPost, "stages: \"rm\" stages: \"rm\"", "stages: \"rm\" stages: \"sft\"");
  const std::string e = error_of(ok);
  EXPECT_NE(e.find("stage 'rs' field reward_model_from: stage 'rm_avg' is a AVERAGE stage, not "
                   "REWARD_MODEL"),
            std::string::npos)
      << e;
}

TEST(PostStages, DpoOnlySamplesNeedsSamplesFrom) {
  const std::string e =
      error_of(replace(replace(kPost, "samples_from: \"rs\"", ""), "dpo { steps: 5 }",
                       "dpo { steps: 5 only_samples: true }"));
  EXPECT_NE(e.find("stage 'dpo' field dpo.only_samples: needs samples_from"), std::string::npos)
      << e;
}

TEST(PostStages, DpoSampledWinRateNeedsAJudge) {
  const std::string with =
      replace(kPost, "dpo { steps: 5 }", "dpo { steps: 5 win_rate_samples: 4 }");
  std::string e = error_of(replace(with, "reward_model_from: \"rm\" optimizer { lr: 1e-4 } dpo",
                                   "optimizer { lr: 1e-4 } dpo"));
  EXPECT_NE(e.find("stage 'dpo' field dpo.win_rate_samples: 4 needs reward_model_from"),
            std::string::npos)
      << e;
  e = error_of(replace(kPost, "dpo { steps: 5 }", "dpo { steps: 5 win_rate_samples: -1 }"));
  EXPECT_NE(e.find("dpo.win_rate_samples"), std::string::npos) << e;
}

TEST(PostStages, ReportShowsIntervalsAndWhetherAnAverageHelped) {
  // Two RM runs averaged in round 1; the round goes on with the average.
  const std::string recipe = replace(
      kPost, "stage { name: \"rm_avg\" kind: AVERAGE average { stages: \"rm\" stages: \"rm\" } }",
      "stage { name: \"rm_b\" kind: REWARD_MODEL round: 1 data_from: \"pd\" init_from: "
      "\"sft\" optimizer { lr: 1e-3 } }\n"
      "stage { name: \"rm_avg\" kind: AVERAGE round: 1 average { stages: \"rm\" "
      "stages: \"rm_b\" } }");
  const ReportRun run("post_report", recipe);
  run.write("sft", R"({"eval_exact_match": 0.4, "eval_prompts": 200})");
  run.write("rm", R"({"eval_accuracy": 0.7, "eval_pairs": 200})");
  run.write("rm_b", R"({"eval_accuracy": 0.65, "eval_pairs": 200})");
  run.write("rm_avg",
            R"({"eval_accuracy": 0.75, "eval_pairs": 200, "average_of": "REWARD_MODEL"})");
  run.write("rs", R"({"acceptance": 0.5, "prompts": 100})");
  run.write(
      "dpo",
      R"({"eval_accuracy": 0.6, "eval_pairs": 200, "eval_exact_match": 0.45, "eval_prompts": 200,
                   "win_rate_vs_start": 0.55})");
  const std::string md = run.markdown();
  // 1.96 sqrt(p (1 - p) / n): 0.4 over 200 -> 0.068; 0.75 over 200 -> 0.060; 0.5 over 100 -> 0.098.
  EXPECT_NE(md.find("| 0.400 ± 0.068 |"), std::string::npos) << md;  // round-0 SFT EM
  EXPECT_NE(md.find("| 1 | 0.750 ± 0.060 | - | - | - | 0.500 ± 0.098 |"), std::string::npos)
      << md;  // the average's RM acc (no held-out on-policy part, no common set)
  EXPECT_NE(md.find("| 0.450 ± 0.069 | - | 0.550 ± 0.069 |"), std::string::npos)
      << md;  // DPO EM, no paired gain (no fixed/broken counts), win rate
  EXPECT_NE(md.find("| rm_avg | 1 | REWARD_MODEL | RM acc | rm 0.700 ± 0.064, rm_b 0.650 ± 0.066 | "
                    "0.750 ± 0.060 |"),
            std::string::npos)
      << md;
}

TEST(PostStages, HeldOutSamplesOnlyEvaluateRewardModels) {
  // A held-out annotation (the policy's samples on the held-out prompts) feeds an RM's held-out
  // set through eval_samples_from; training on it (samples_from) is refused, as is
  // eval_samples_from naming an ordinary sampling stage or sitting on a non-RM stage.
  const std::string held =
      "stage { name: \"ho\" kind: REJECTION_SAMPLING round: 1 data_from: \"pd\" init_from: \"sft\" "
      "rejection_sampling { k: 2 held_out: true } }\n"
      "stage { name: \"rm\" kind: REWARD_MODEL round: 1 data_from: \"pd\" init_from: \"sft\" ";
  const std::string base = replace(
      kPost,
      "stage { name: \"rm\" kind: REWARD_MODEL round: 1 data_from: \"pd\" init_from: \"sft\" ",
      held);
  const std::string ok =
      replace(base, "optimizer { lr: 1e-3 } }\nstage { name: \"rm_avg\"",
              "eval_samples_from: \"ho\" optimizer { lr: 1e-3 } }\nstage { name: \"rm_avg\"");
  auto r = LoadedRecipe::parse(ok, "p.textproto");
  EXPECT_NO_THROW(r.validate(true)) << ok;
  EXPECT_EQ(post_stage_inputs(r.recipe().stage(3)), (std::vector<std::string>{"ho"}));
  std::string e = error_of(replace(ok, "samples_from: \"rs\"", "samples_from: \"ho\""));
  EXPECT_NE(e.find("stage 'dpo' field samples_from[0]: stage 'ho' samples the held-out prompts"),
            std::string::npos)
      << e;
  e = error_of(replace(ok, "eval_samples_from: \"ho\"", "eval_samples_from: \"sft\""));
  EXPECT_NE(e.find("field eval_samples_from[0]: stage 'sft' is not a REJECTION_SAMPLING stage with "
                   "held_out"),
            std::string::npos)
      << e;
  e = error_of(replace(ok, "reward_model_from: \"rm\" optimizer",
                       "reward_model_from: \"rm\" eval_samples_from: \"ho\" optimizer"));
  EXPECT_NE(e.find("stage 'dpo' field eval_samples_from[0]: only REWARD_MODEL stages"),
            std::string::npos)
      << e;
  // samples_fraction lies in [0, 1) and needs on-policy pairs (samples_from) to draw from.
  e = error_of(replace(
      ok, "eval_samples_from: \"ho\" optimizer { lr: 1e-3 }",
      "eval_samples_from: \"ho\" optimizer { lr: 1e-3 } reward_model { samples_fraction: 1.5 }"));
  EXPECT_NE(e.find("field reward_model.samples_fraction: 1.5 must lie in [0, 1)"),
            std::string::npos)
      << e;
  e = error_of(replace(
      ok, "eval_samples_from: \"ho\" optimizer { lr: 1e-3 }",
      "eval_samples_from: \"ho\" optimizer { lr: 1e-3 } reward_model { samples_fraction: 0.5 }"));
  EXPECT_NE(e.find("field reward_model.samples_fraction: needs samples_from"), std::string::npos)
      << e;
}

TEST(PostStages, ReportTakesDpoAveragesAndWinRateIntervalFromTheOutcomes) {
  const std::string recipe = std::string(kPost) +
                             "stage { name: \"dpo_b\" kind: DPO round: 1 data_from: \"pd\" "
                             "init_from: \"sft\" reward_model_from: "
                             "\"rm\" optimizer { lr: 1e-4 } }\n"
                             "stage { name: \"dpo_avg\" kind: AVERAGE round: 1 average { stages: "
                             "\"dpo\" stages: \"dpo_b\" } }\n";
  const ReportRun run("post_report_dpo", recipe);
  run.write("sft", R"({"eval_exact_match": 0.4, "eval_prompts": 200})");
  run.write(
      "rm",
      R"({"eval_accuracy": 0.7, "eval_pairs": 400, "eval_accuracy_on_policy": 0.8, "eval_pairs_on_policy": 100,
          "eval_accuracy_common": 0.75, "eval_pairs_common": 400, "common_fixed": 40, "common_broken": 20})");
  run.write("rs", R"({"acceptance": 0.5, "prompts": 100})");
  run.write(
      "dpo",
      R"({"eval_accuracy": 0.6, "eval_pairs": 200, "eval_exact_match": 0.45, "eval_prompts": 200,
                   "win_rate_vs_start": 0.55, "win_rate_wins": 30, "win_rate_ties": 160, "win_rate_losses": 10})");
  run.write(
      "dpo_b",
      R"({"eval_accuracy": 0.6, "eval_pairs": 200, "eval_exact_match": 0.4, "eval_prompts": 200})");
  run.write(
      "dpo_avg",
      R"({"eval_accuracy": 0.65, "eval_pairs": 200, "eval_exact_match": 0.5, "eval_prompts": 200,
                   "win_rate_vs_start": 0.6, "win_rate_wins": 50, "win_rate_ties": 140, "win_rate_losses": 10,
                   "judge_agrees_with_verifier": 25, "judge_disagrees_with_verifier": 7,
                   "win_rate_sampled": 0.58, "win_rate_sampled_h": 0.04, "win_rate_sampled_k": 4,
                   "win_rate_sampled_wins": 300, "win_rate_sampled_ties": 330, "win_rate_sampled_losses": 170,
                   "exact_match_fixed": 30, "exact_match_broken": 10,
                   "average_of": "DPO"})");
  const std::string md = run.markdown();
  // RM acc over all 400 held-out pairs, then its on-policy part (0.8 over 100 -> 0.078), the
  // common set (0.75 over 400 -> 0.042) and the paired gain over the earlier RM on it: 40 fixed,
  // 20 broken of 400 -> +0.05, variance 60/400 - 0.0025 = 0.1475 -> 1.96 sqrt(0.1475/400) = 0.038.
  EXPECT_NE(
      md.find("| 1 | 0.700 ± 0.045 | 0.800 ± 0.078 | 0.750 ± 0.042 | +0.050 ± 0.038 (40/20) |"),
      std::string::npos)
      << md;
  // The round's DPO is the average: w 50, t 140, l 10 of 200 -> p 0.6; per-prompt variance
  // (50 + 140/4)/200 - 0.36 = 0.065, so 1.96 sqrt(0.065/200) = 0.035 (p(1-p) would give 0.068).
  // Paired EM gain: 30 fixed, 10 broken of 200 -> +0.1, variance 40/200 - 0.01 = 0.19 -> 0.060.
  // Of the 32 judged prompts where exactly one response verifies, the RM preferred that one 25
  // times (dpo has no judge counts, so its cell has none).
  EXPECT_NE(
      md.find(
          "| 0.650 ± 0.066 | 0.500 ± 0.069 | +0.100 ± 0.060 (30/10) | 0.600 ± 0.035 (50/140/10; RM "
          "sides with the verifier 25/32) | 0.580 ± 0.040 (K 4: 300/330/170) | rm, rs, dpo, dpo_b, "
          "dpo_avg |"),
      std::string::npos)
      << md;
  EXPECT_NE(md.find("| dpo_avg | 1 | DPO | exact match | dpo 0.450 ± 0.069, dpo_b 0.400 ± 0.068 | "
                    "0.500 ± 0.069 |"),
            std::string::npos)
      << md;
  // dpo: (30 + 40)/200 - 0.3025 = 0.0475 -> 0.030; dpo_b has no win rate.
  EXPECT_NE(md.find("| dpo_avg | 1 | DPO | win rate vs SFT | dpo 0.550 ± 0.030 (30/160/10), dpo_b "
                    "- | 0.600 ± 0.035 (50/140/10; RM sides with the verifier 25/32) |"),
            std::string::npos)
      << md;
}
