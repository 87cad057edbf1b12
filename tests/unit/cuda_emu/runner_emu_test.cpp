// `llama3 run --device cuda` on the emulated cuda:0 (cuda_backend_emu.cpp): the tiny recipe's
// training stages (pre-training, long context, annealing), shrunk to a few steps, train and
// evaluate on the device with the same per-step losses and final evaluations as the same
// stages on the CPU (f32: within the parity tolerance), from the same inputs.
#define LLAMA3_CUDA_EMU 1
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "recipes/runner.h"
#include "runtime/cuda/cuda_backend.h"

using namespace llama3;
namespace fs = std::filesystem;

namespace {

// Per-step training losses of a stage's metrics.jsonl.
std::vector<double> step_losses(const std::string& path) {
  std::vector<double> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// The tiny recipe with its pre-training model narrowed to two layers of dim 64, one
// evaluation batch with two NIAH samples at the end, plus `more` overrides.
recipes::LoadedRecipe tiny_recipe(const std::vector<std::string>& more) {
  auto recipe =
      recipes::LoadedRecipe::load(std::string(LLAMA3_SOURCE_DIR) + "/recipes/tiny.textproto");
  for (const char* s : {"pretrain.model.dim=64", "pretrain.model.n_layers=2",
                        "pretrain.model.n_heads=4", "pretrain.model.n_kv_heads=2",
                        "pretrain.lr.warmup_tokens=1024", "pretrain.eval.every_tokens=1000000",
                        "pretrain.eval.batches=1", "pretrain.eval.niah.samples=2"})
    recipe.apply_override(s);
  for (const auto& s : more) recipe.apply_override(s);
  recipe.validate(true, 1);
  return recipe;
}

// A stage run on the device against the same stage on the CPU: `lines` metric lines with a
// loss, each within 1e-4, the same steps and tokens, the final evaluation within 1e-4.
void expect_stage_matches(const fs::path& cpu_run, const fs::path& cuda_run,
                          const std::string& stage, size_t lines) {
  SCOPED_TRACE(stage);
  const auto a = step_losses((cpu_run / stage / "metrics.jsonl").string());
  const auto b = step_losses((cuda_run / stage / "metrics.jsonl").string());
  ASSERT_EQ(a.size(), lines);
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(b[i], a[i], 1e-4 * a[i]) << "line " << i + 1;
  const auto fa = read_json((cpu_run / stage / "final.json").string());
  const auto fb = read_json((cuda_run / stage / "final.json").string());
  EXPECT_EQ(fb["steps"], fa["steps"]);
  EXPECT_EQ(fb["tokens"], fa["tokens"]);
  EXPECT_NEAR(fb["eval_loss"].get<double>(), fa["eval_loss"].get<double>(),
              1e-4 * fa["eval_loss"].get<double>());
}

fs::path fresh_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

TEST(RunnerEmu, PretrainStageOnTheDeviceMatchesTheCpu) {
  ASSERT_TRUE(cuda_init());
  const fs::path tmp = fresh_dir("llama3_runner_emu");
  // Three steps of 1024 tokens (two micro-batches, one of pass-key documents with the loss on
  // their answers).
  const auto recipe = tiny_recipe(
      {"pretrain.total_tokens=3072", "pretrain.batch.ramp[0].at_tokens=2048",
       "pretrain.batch.ramp[0].batch_tokens=1024", "pretrain.checkpoint_every_steps=100"});
  recipes::RunOptions o;
  o.quiet = true;
  o.run_dir = (tmp / "cpu").string();
  o.only = "data";
  recipes::run_recipe(recipe, o);
  for (const char* d : {"cuda", "graph"})
    fs::copy(tmp / "cpu", tmp / d, fs::copy_options::recursive);

  o.only = "pretrain";
  recipes::run_recipe(recipe, o);  // the CPU
  o.run_dir = (tmp / "cuda").string();
  o.device = Device::cuda(0);
  cuda_profile_start(0);
  recipes::run_recipe(recipe, o);
  // It trained there: the profile of the emulated device holds the step's kernels.
  const std::string profile = cuda_profile_report(0);
  for (const char* op : {"attention_backward", "linear_cross_entropy", "adamw_step_many"})
    EXPECT_NE(profile.find(op), std::string::npos) << op << " did not run on the device\n"
                                                   << profile;
  expect_stage_matches(tmp / "cpu", tmp / "cuda", "pretrain", 3);

  // --cuda-graph: the same device losses, bit for bit, with the later steps replayed.
  o.run_dir = (tmp / "graph").string();
  o.cuda_graph = true;
  recipes::run_recipe(recipe, o);
  int replays = 0;
  {
    std::ifstream g(tmp / "graph/pretrain/metrics.jsonl");
    for (std::string line; std::getline(g, line);) {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("loss")) replays += j.at("graph").get<bool>() ? 1 : 0;
    }
  }
  EXPECT_GE(replays, 1);
  EXPECT_EQ(step_losses((tmp / "graph/pretrain/metrics.jsonl").string()),
            step_losses((tmp / "cuda/pretrain/metrics.jsonl").string()));

  // The emulated device is in no row of the datasheet table: no MFU logged, and no CPU
  // percentage either.
  std::ifstream m(tmp / "cuda/pretrain/metrics.jsonl");
  for (std::string line; std::getline(m, line);) {
    EXPECT_EQ(line.find("pct_gemm_peak"), std::string::npos) << line;
    EXPECT_EQ(line.find("\"mfu\""), std::string::npos) << line;
  }
  fs::remove_all(tmp);
}

// Long context (two increments, 256 and 512 tokens, each one step long so that no gate
// decides anything) and annealing (three steps, a Polyak average of its snapshots evaluated
// on the device), from the same pre-trained model.
TEST(RunnerEmu, LongContextAndAnnealingStagesOnTheDeviceMatchTheCpu) {
  ASSERT_TRUE(cuda_init());
  const fs::path tmp = fresh_dir("llama3_runner_emu_lc");
  const auto recipe = tiny_recipe(
      {"pretrain.total_tokens=2048", "pretrain.batch.ramp[0].at_tokens=1024",
       "pretrain.batch.ramp[0].batch_tokens=1024", "long_context.lr.warmup_tokens=1024",
       "long_context.long_context.min_tokens_per_increment=2048",
       "long_context.long_context.check_every_tokens=2048",
       "long_context.long_context.max_tokens_per_increment=2048", "long_context.eval.batches=1",
       "long_context.eval.niah.samples=2", "anneal.batch.batch_tokens=2048",
       "anneal.batch.micro_batch_tokens=2048", "anneal.total_tokens=6144",
       "anneal.anneal.average_every_tokens=2048", "anneal.eval.batches=1"});
  recipes::RunOptions o;
  o.quiet = true;
  o.run_dir = (tmp / "cpu").string();
  for (const char* st : {"data", "pretrain"}) {
    o.only = st;
    recipes::run_recipe(recipe, o);
  }
  fs::copy(tmp / "cpu", tmp / "cuda", fs::copy_options::recursive);
  for (const bool device : {false, true}) {
    o.run_dir = (tmp / (device ? "cuda" : "cpu")).string();
    o.device = device ? Device::cuda(0) : Device::cpu();
    if (device) cuda_profile_start(0);
    for (const char* st : {"long_context", "anneal"}) {
      o.only = st;
      recipes::run_recipe(recipe, o);
    }
    if (device) {
      const std::string profile = cuda_profile_report(0);
      EXPECT_NE(profile.find("attention_backward"), std::string::npos) << profile;
    }
  }
  expect_stage_matches(tmp / "cpu", tmp / "cuda", "long_context", 2);
  expect_stage_matches(tmp / "cpu", tmp / "cuda", "anneal", 3);
  const auto fb = read_json((tmp / "cuda/anneal/final.json").string());
  EXPECT_GE(fb["averaged_checkpoints"].get<int64_t>(), 2);
  fs::remove_all(tmp);
}

}  // namespace
