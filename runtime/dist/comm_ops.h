// Differentiable communication: collectives as autograd Nodes, so tensor parallelism can be
// inserted around unmodified layers (Megatron's f and g operators).
#pragma once

#include <functional>
#include <vector>

#include "runtime/dist/communicator.h"

namespace llama3::dist {

// Forward: identity. Backward: all-reduce (sum) of the gradient over `comm`.
// Put before a column-parallel linear whose input is replicated.
Tensor copy_to_group(const Tensor& x, Communicator& comm);

// Forward: all-reduce (sum) over `comm`. Backward: identity.
// Put after a row-parallel linear whose output is a partial sum.
Tensor reduce_from_group(const Tensor& x, Communicator& comm);

// reduce_from_group for an x that is already all-reduced over `comm` (in place, slice by
// slice while it was computed: ops::linear's out_hook): no communication, and the same
// autograd node as reduce_from_group's (identity backward), so the graph is unchanged.
Tensor reduced_from_group(const Tensor& x, Communicator& comm);

// Context parallelism with load-balanced causal chunking: the sequence of T positions is cut
// into 2*cp chunks of T/(2cp) and cp rank r holds chunks r and 2cp-1-r (so every rank gets
// the same causal work). These are the global positions of rank r's local tokens.
std::vector<int32_t> cp_positions(int64_t T, int cp, int rank);

// x (B, T_local, ...) in rank-local chunk order -> (B, T, ...) in global order, gathered over
// `cp`. Backward: the gradient of every rank's use is summed (reduce-scatter) back to the
// owner of each position.
Tensor gather_sequence(const Tensor& x, Communicator& cp);

// gather_sequence in two halves, to overlap the all-gather with compute: issues the
// asynchronous all-gather of x now and returns the function that waits for it and yields
// exactly gather_sequence(x, cp) (same values, same backward). Every rank of `cp` must issue
// its gathers in the same order; the returned function is called once. Its backward's
// reduce-scatter is issued as soon as the gradient is complete (Node::prepare) and waited
// when the engine runs the node, so the reduce-scatter of dK is in flight while V's branch
// runs backward (same values: the same reduce-scatter of the same gradient);
// early_backward = false: issued and waited in the node, as gather_sequence's.
std::function<Tensor()> gather_sequence_async(const Tensor& x, Communicator& cp,
                                              bool early_backward = true);

}  // namespace llama3::dist
