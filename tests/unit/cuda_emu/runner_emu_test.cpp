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

TEST(RunnerEmu, PretrainStageOnTheDeviceMatchesTheCpu) {
  ASSERT_TRUE(cuda_init());
  const fs::path tmp =
      fs::temp_directory_path() / ("llama3_runner_emu_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  auto recipe =
      recipes::LoadedRecipe::load(std::string(LLAMA3_SOURCE_DIR) + "/recipes/tiny.textproto");
  // Two layers of dim 64, three steps of 1024 tokens (two micro-batches, one of pass-key
  // documents with the loss on their answers), one evaluation at the end.
  for (const char* s :
       {"pretrain.model.dim=64", "pretrain.model.n_layers=2", "pretrain.model.n_heads=4",
        "pretrain.model.n_kv_heads=2", "pretrain.total_tokens=3072",
        "pretrain.batch.ramp[0].at_tokens=2048", "pretrain.batch.ramp[0].batch_tokens=1024",
        "pretrain.lr.warmup_tokens=1024", "pretrain.eval.every_tokens=1000000",
        "pretrain.eval.batches=1", "pretrain.eval.niah.samples=2",
        "pretrain.checkpoint_every_steps=100"})
    recipe.apply_override(s);
  recipe.validate(true, 1);
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

  const auto a = step_losses((tmp / "cpu/pretrain/metrics.jsonl").string());
  const auto b = step_losses((tmp / "cuda/pretrain/metrics.jsonl").string());
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(b[i], a[i], 1e-4 * a[i]) << "step " << i + 1;
  const auto fa = read_json((tmp / "cpu/pretrain/final.json").string());
  const auto fb = read_json((tmp / "cuda/pretrain/final.json").string());
  EXPECT_EQ(fb["steps"], fa["steps"]);
  EXPECT_EQ(fb["tokens"], fa["tokens"]);
  EXPECT_NEAR(fb["eval_loss"].get<double>(), fa["eval_loss"].get<double>(),
              1e-4 * fa["eval_loss"].get<double>());
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
  const fs::path tmp =
      fs::temp_directory_path() / ("llama3_runner_emu_lc_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  auto recipe =
      recipes::LoadedRecipe::load(std::string(LLAMA3_SOURCE_DIR) + "/recipes/tiny.textproto");
  for (const char* s : {"pretrain.model.dim=64",
                        "pretrain.model.n_layers=2",
                        "pretrain.model.n_heads=4",
                        "pretrain.model.n_kv_heads=2",
                        "pretrain.total_tokens=2048",
                        "pretrain.batch.ramp[0].at_tokens=1024",
                        "pretrain.batch.ramp[0].batch_tokens=1024",
                        "pretrain.lr.warmup_tokens=1024",
                        "pretrain.eval.every_tokens=1000000",
                        "pretrain.eval.batches=1",
                        "pretrain.eval.niah.samples=2",
                        "long_context.lr.warmup_tokens=1024",
                        "long_context.long_context.min_tokens_per_increment=2048",
                        "long_context.long_context.check_every_tokens=2048",
                        "long_context.long_context.max_tokens_per_increment=2048",
                        "long_context.eval.batches=1",
                        "long_context.eval.niah.samples=2",
                        "anneal.batch.batch_tokens=2048",
                        "anneal.batch.micro_batch_tokens=2048",
                        "anneal.total_tokens=6144",
                        "anneal.anneal.average_every_tokens=2048",
                        "anneal.eval.batches=1"})
    recipe.apply_override(s);
  recipe.validate(true, 1);
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
  for (const char* st : {"long_context", "anneal"}) {
    SCOPED_TRACE(st);
    const auto a = step_losses((tmp / "cpu" / st / "metrics.jsonl").string());
    const auto b = step_losses((tmp / "cuda" / st / "metrics.jsonl").string());
    ASSERT_GE(a.size(), 2u);
    ASSERT_EQ(b.size(), a.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(b[i], a[i], 1e-4 * a[i]) << "line " << i + 1;
    const auto fa = read_json((tmp / "cpu" / st / "final.json").string());
    const auto fb = read_json((tmp / "cuda" / st / "final.json").string());
    EXPECT_EQ(fb["steps"], fa["steps"]);
    EXPECT_NEAR(fb["eval_loss"].get<double>(), fa["eval_loss"].get<double>(),
                1e-4 * fa["eval_loss"].get<double>());
  }
  const auto fb = read_json((tmp / "cuda/anneal/final.json").string());
  EXPECT_GE(fb["averaged_checkpoints"].get<int64_t>(), 2);
  fs::remove_all(tmp);
}

}  // namespace
