// The defaults of Backend's multi-tensor calls: sum_squares_many (one sum_squares per tensor,
// summed in order) and adamw_step_many (one adamw_step per parameter).
#include "runtime/backend/backend.h"

namespace llama3 {

double Backend::sum_squares_many(const std::vector<Tensor>& xs,
                                 const std::vector<double>& weights) {
  LLAMA3_CHECK(weights.empty() || weights.size() == xs.size(),
               "sum_squares_many: {} weights for {} tensors", weights.size(), xs.size());
  double s = 0;
  for (size_t i = 0; i < xs.size(); ++i)
    s += (weights.empty() ? 1.0 : weights[i]) * sum_squares(xs[i]);
  return s;
}

void Backend::adamw_step_many(const std::vector<AdamWItem>& items, const AdamWParams& p) {
  for (const AdamWItem& it : items) {
    AdamWParams q = p;
    q.weight_decay = it.weight_decay;
    Tensor param = it.param, m = it.m, v = it.v, copy = it.param_bf16;  // (handles)
    adamw_step(param, it.grad, m, v, q, copy.defined() ? &copy : nullptr);
  }
}

}  // namespace llama3
