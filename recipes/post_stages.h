// The post-training stage kinds of the recipe runner (POST_DATA, SFT, REWARD_MODEL,
// REJECTION_SAMPLING, DPO): their validation before any work, their plan rows, running them
// through the text/post library into RUN/<stage>/ with per-step metrics, and the per-round
// report table. Kept apart from runner.cpp so the pre-training runner stays readable;
// runner.cpp and recipe.cpp only dispatch here. Iterative rounds are explicit stages tagged
// with `round` (docs/recipes.md).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "recipes/recipe.h"
#include "text/model/config.h"

namespace llama3::recipes {

bool is_post_kind(StageKind k);         // POST_DATA, SFT, REWARD_MODEL, REJECTION_SAMPLING, DPO
bool post_produces_model(StageKind k);  // SFT, REWARD_MODEL, DPO (in RUN/<stage>/model)

// Throws "file:line:col: stage 'x' field y: ..." for the first problem of post stage `stage`.
void validate_post_stage(const LoadedRecipe& lr, int stage);

// Stages a post stage reads beyond init_from/data_from (reward_model_from, samples_from).
std::vector<std::string> post_stage_inputs(const Stage& s);

// Runs the stage into run_dir/<name>; returns its final metrics (flat name -> number).
nlohmann::json run_post_stage(const LoadedRecipe& lr, int stage, const std::string& run_dir, bool quiet);

// An AVERAGE stage whose inputs are all post-training models of one kind (REWARD_MODEL; SFT;
// DPO) is evaluated like them on their POST_DATA stage's held-out data (RM: pairwise accuracy;
// policies: greedy exact match), so the report can show whether averaging helped. Returns
// those metrics plus "average_of"; empty for any other AVERAGE.
nlohmann::json evaluate_post_average(const LoadedRecipe& lr, int stage, const std::string& run_dir);

// A --dry-run row: the model (from init_from's config, or the stage's flavour), a rough
// FLOP count (training tokens x 6N plus generated tokens x 2N) and notes.
struct PostPlan {
  std::optional<text::LlamaConfig> config;
  double tokens = 0, flops = 0;
  std::string notes;
};
PostPlan plan_post_stage(const LoadedRecipe& lr, int stage, const text::LlamaConfig* init_config);

// Markdown: one row per round with the headline metric of each post stage (RM held-out
// accuracy, RS acceptance and best-of-K gain, SFT exact match, DPO accuracy/exact match/win
// rate, each with its 95% interval), then a table of the post-training model averages. Empty when
// the run has no post stages (or no readable recipe.textproto).
std::string post_rounds_markdown(const std::string& run_dir);

}  // namespace llama3::recipes
