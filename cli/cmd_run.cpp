// `llama3 run RECIPE`: validates a recipe (with --set overrides) and runs its stages into a
// run directory, or prints the plan with --dry-run. See docs/recipes.md.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

#include "cli/flags.h"
#include "recipes/runner.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/dist/communicator.h"

namespace llama3::cli {

namespace {
constexpr const char* kUsage =
    "usage: llama3 run RECIPE [--out DIR] [--set stage.field=value]... [--only STAGE]\n"
    "                  [--from STAGE] [--dry-run] [--timeout 3600]\n"
    "                  [--device cpu|cuda [--cuda-graph]]\n"
    "  Runs the recipe's stages in order into DIR (default: the recipe's out_dir), skipping\n"
    "  finished stages and resuming an interrupted one from its latest checkpoint.\n"
    "  --set      overrides a field: pretrain.total_tokens=1000000, pretrain.optimizer.lr=1e-3,\n"
    "             pretrain.batch.ramp[0].at_tokens=5000, pretrain.mix[0].weights.math=0.3, seed=3\n"
    "             (repeatable; an index equal to the size appends, a new map key adds an entry)\n"
    "  --only     runs just STAGE (again, from scratch); its inputs must have finished\n"
    "  --from     runs STAGE and every later stage again from scratch\n"
    "  --dry-run  validates and prints the plan: params, tokens, FLOPs, estimated time\n"
    "  --device   cuda: the text training stages (pretrain, long context, annealing) train and\n"
    "             evaluate on the GPU (one process); every other stage runs on the CPU.\n"
    "             --cuda-graph replays their steps as CUDA graphs\n"
    "  Under mpirun -np N, training stages whose parallel { ... } layout has N ranks run on all\n"
    "  ranks, every other stage on rank 0; --timeout is how long a rank waits for its peers\n"
    "  (e.g. while rank 0 alone runs a data stage) before the run fails.";
}  // namespace

int cmd_run(const Args& args) {
  Flags f(args, {"--out", "--set", "--only", "--from", "--timeout", "--device"},
          {"--dry-run", "--cuda-graph"}, kUsage);
  LLAMA3_CHECK(f.positional().size() == 1, "expected one RECIPE file\n{}", kUsage);
  LLAMA3_CHECK(!(f.has("--only") && f.has("--from")), "give --only or --from, not both");
  recipes::LoadedRecipe recipe = recipes::LoadedRecipe::load(f.positional()[0]);
  for (const auto& s : f.all("--set")) recipe.apply_override(s);
  const bool dry = f.has("--dry-run");
  dist::CommOptions co;
  co.timeout_s = f.real("--timeout", 3600.0);
  auto world = dry ? dist::single_rank_communicator() : dist::world_communicator(co);
  if (world->rank() != 0) spdlog::set_level(spdlog::level::warn);
  recipe.validate(/*runnable=*/!dry, world->size());
  if (dry) {
    recipes::print_plan(recipe, std::cout);
    return 0;
  }
  recipes::RunOptions o;
  std::string out = f.str("--out", recipe.recipe().out_dir());
  LLAMA3_CHECK(!out.empty(), "no run directory: give --out DIR or set out_dir in {}", recipe.file());
  o.run_dir = std::filesystem::absolute(out).lexically_normal().string();
  o.only = f.str("--only");
  o.from = f.str("--from");
  if (world->size() > 1) o.world = world;
  const std::string device = f.str("--device", "cpu");
  LLAMA3_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '{}'",
               device);
  LLAMA3_CHECK(!f.has("--cuda-graph") || device == "cuda", "--cuda-graph needs --device cuda");
  if (device == "cuda") {
    LLAMA3_CHECK(world->size() == 1,
                 "--device cuda: the runner trains on one GPU in one process ({} ranks given; "
                 "multi-GPU layouts: llama3 train --device cuda --parallel)",
                 world->size());
    LLAMA3_CHECK(cuda_init(), "--device cuda: no CUDA device (or this build has no CUDA)");
    o.device = Device::cuda(0);
    o.cuda_graph = f.has("--cuda-graph");
  }
  recipes::run_recipe(recipe, o);
  return 0;
}

}  // namespace llama3::cli
