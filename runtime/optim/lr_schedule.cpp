#include "runtime/optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/error.h"

namespace llama3::optim {

Decay decay_from_name(const std::string& s) {
  if (s == "constant") return Decay::constant;
  if (s == "cosine") return Decay::cosine;
  if (s == "linear") return Decay::linear;
  fail("unknown LR decay '{}' (supported: constant, cosine, linear)", s);
}

float LrSchedule::at(int64_t done) const {
  if (warmup > 0 && done < warmup) return peak * float(done + 1) / float(warmup);
  if (decay == Decay::constant) return peak;
  const int64_t span = std::max<int64_t>(1, total - warmup);
  const double t = std::clamp(double(done - warmup) / double(span), 0.0, 1.0);
  if (decay == Decay::linear) return float(peak + (min_lr - peak) * t);
  return float(min_lr + 0.5 * (peak - min_lr) * (1.0 + std::cos(M_PI * t)));
}

}  // namespace llama3::optim
