// Differentiable communication: collectives as autograd Nodes, so tensor parallelism can be
// inserted around unmodified layers (Megatron's f and g operators).
#pragma once

#include <vector>

#include "runtime/dist/communicator.h"

namespace llama3::dist {

// Forward: identity. Backward: all-reduce (sum) of the gradient over `comm`.
// Put before a column-parallel linear whose input is replicated.
Tensor copy_to_group(const Tensor& x, Communicator& comm);

// Forward: all-reduce (sum) over `comm`. Backward: identity.
// Put after a row-parallel linear whose output is a partial sum.
Tensor reduce_from_group(const Tensor& x, Communicator& comm);

// Context parallelism with load-balanced causal chunking: the sequence of T positions is cut
// into 2*cp chunks of T/(2cp) and cp rank r holds chunks r and 2cp-1-r (so every rank gets
// the same causal work). These are the global positions of rank r's local tokens.
std::vector<int32_t> cp_positions(int64_t T, int cp, int rank);

// x (B, T_local, ...) in rank-local chunk order -> (B, T, ...) in global order, gathered over
// `cp`. Backward: the gradient of every rank's use is summed (reduce-scatter) back to the
// owner of each position.
Tensor gather_sequence(const Tensor& x, Communicator& cp);

}  // namespace llama3::dist
