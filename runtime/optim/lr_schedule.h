// Learning-rate schedules: linear warm-up, then constant, cosine (to min_lr) or linear (to
// min_lr, usually zero). Expressed over abstract "progress units" (steps or tokens), so
// the recipe runner can schedule in tokens while the batch size ramps.
#pragma once

#include <cstdint>
#include <string>

namespace llama3::optim {

enum class Decay { constant, cosine, linear };

Decay decay_from_name(const std::string& s);  // "constant" | "cosine" | "linear"

struct LrSchedule {
  float peak = 3e-4f;
  float min_lr = 0.f;      // value at the end of the decay
  int64_t warmup = 0;      // units of linear warm-up from 0 (exclusive) to peak
  int64_t total = 1;       // units at which the decay reaches min_lr
  Decay decay = Decay::cosine;
  // Learning rate after `done` units (the update about to happen is number done+1).
  float at(int64_t done) const;
};

}  // namespace llama3::optim
