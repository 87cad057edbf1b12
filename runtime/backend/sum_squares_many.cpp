// Backend::sum_squares_many, the default: one sum_squares per tensor, summed in order.
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

}  // namespace llama3
