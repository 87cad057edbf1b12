// Differentiable communication: collectives as autograd Nodes, so tensor parallelism can be
// inserted around unmodified layers (Megatron's f and g operators).
#pragma once

#include "runtime/dist/communicator.h"

namespace llama3::dist {

// Forward: identity. Backward: all-reduce (sum) of the gradient over `comm`.
// Put before a column-parallel linear whose input is replicated.
Tensor copy_to_group(const Tensor& x, Communicator& comm);

// Forward: all-reduce (sum) over `comm`. Backward: identity.
// Put after a row-parallel linear whose output is a partial sum.
Tensor reduce_from_group(const Tensor& x, Communicator& comm);

}  // namespace llama3::dist
