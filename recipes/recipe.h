// Loading a recipe: text-format parsing with file:line:col errors, `--set stage.field=value`
// overrides by protobuf reflection, and validation before any work (inputs, batch arithmetic,
// parallel layout, schedules) whose errors name the file, line and field at fault.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "recipes/recipe.pb.h"

namespace llama3::recipes {

// A parsed recipe plus where each field came from, for error messages.
class LoadedRecipe {
 public:
  // Parses `text` (named `file` in errors). Unknown fields and wrong types throw
  // "file:line:col: message".
  static LoadedRecipe parse(const std::string& text, const std::string& file);
  static LoadedRecipe load(const std::string& path);

  // Applies "path=value": path is `stage_name.field[.field...]` (a repeated field takes an
  // index: `ramp[1].at_tokens`; index == size appends) or a top-level field (`name`, `seed`).
  void apply_override(const std::string& assignment);

  // Throws on the first problem: "file:line:col: stage 'x' field y: what is wrong".
  // `runnable` additionally rejects what this run cannot execute (a training stage whose
  // layout needs more than one rank but not `world_size`, the ranks this run was launched
  // with); dry runs validate without it.
  void validate(bool runnable, int world_size = 1) const;

  // "file:line:col" of a field of stage `stage` (path "batch.ramp[1].at_tokens"); falls back
  // to the nearest enclosing field found in the file, or "file (set by --set)".
  std::string where(int stage, const std::string& path) const;

  const Recipe& recipe() const { return recipe_; }
  Recipe& mutable_recipe() { return recipe_; }
  const std::string& file() const { return file_; }
  int stage_index(const std::string& name) const;  // -1 if absent

 private:
  Recipe recipe_;
  std::string file_;
  std::shared_ptr<void> tree_;  // google::protobuf::TextFormat::ParseInfoTree
  std::set<std::string> overridden_;
};

// Text format of a recipe (what the run directory's recipe.textproto holds).
std::string to_text(const Recipe& r);

// Effective values with defaults applied (zero fields mean "default").
struct Layout {
  int64_t dp_shard, tp, pp, cp, dp_replicate;
  int64_t world() const { return dp_shard * tp * pp * cp * dp_replicate; }
  int64_t dp() const { return dp_shard * dp_replicate; }
};
Layout layout_of(const Stage& s);
bool is_training(StageKind k);  // PRETRAIN, LONG_CONTEXT, ANNEAL

}  // namespace llama3::recipes
