// The defaults of Backend's deferred cross-entropy gradient (backend.h): no deferred form, so
// ops::linear_cross_entropy computes the gradient with the loss instead.
#include "runtime/backend/backend.h"

namespace llama3 {

bool Backend::linear_cross_entropy_keep(const Tensor&, const Tensor&, const Tensor&, int64_t, float,
                                        CrossEntropyKept&, double*, Tensor*, double) {
  return false;
}

void Backend::linear_cross_entropy_grad(CrossEntropyKept&, const Tensor&, const Tensor&,
                                        const Tensor&, const Tensor&, Tensor&, Tensor*, bool) {
  fail(
      "linear_cross_entropy_grad: {} has no deferred cross-entropy gradient "
      "(linear_cross_entropy_keep returned false)",
      name());
}

}  // namespace llama3
