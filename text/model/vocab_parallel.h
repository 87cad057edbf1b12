// Vocabulary-parallel embedding and cross-entropy (tensor parallelism of the vocabulary):
// each tp rank holds rows [rank * V/tp, (rank + 1) * V/tp) of the embedding and of lm_head.
// No rank ever holds full-vocabulary logits. f32 parameters and activations on any device
// (CPU with the MPI communicator, CUDA with NCCL), the loss optionally with bf16 GEMM inputs
// (mixed precision, as ops::linear_cross_entropy). The loss runs on the tensors' device:
// GEMMs and the softmax statistics (row max, sum of exponentials, target logit, dlogits:
// Backend::vocab_* kernels, f32) stay there and are all-reduced there; only the loss and the
// count of valid rows reach the host (and the incoming gradient in the backward). The
// embedding reads the ids on the host: rows of ids outside a rank's range are zeroed one
// fill per run of such rows.
#pragma once

#include "runtime/dist/communicator.h"
#include "runtime/ops/ops.h"

namespace llama3::text {

// ids (B, T) int32 global token ids -> (B, T, D): rows of ids outside this rank's range are
// zero, then summed over tp (forward all-reduce; the backward is local).
Tensor vocab_parallel_embedding(const Tensor& w_local, const Tensor& ids, dist::Communicator& tp);

// Mean cross-entropy over targets >= 0 of logits = h @ W^T with W split by rows over tp:
// per-row max, sum of exponentials and the target logit are all-reduced over tp. The
// backward writes dW_local and all-reduces dh over tp (h is replicated). h (N, D), w_local
// (V/tp, D), targets (N) global ids. Rows are processed in chunks of `chunk_rows` (0: all at
// once): at most (chunk_rows, V/tp) logits exist at a time; the backward recomputes them per
// chunk from the kept row max and sum of exponentials. One max all-reduce per chunk, one
// all-reduce of the sums and target logits, one of dh: the bytes do not depend on the chunk.
// precision bf16 is the mixed-precision path of the single-process ops::linear_cross_entropy:
// h and w_local are rounded to bf16 for the three GEMMs (logits, dh, dW; dlogits rounded to
// bf16 too), accumulation is f32, the softmax statistics (max, sum of exponentials, target
// logit) and everything communicated stay f32; dh and dW are f32.
Tensor vocab_parallel_cross_entropy(const Tensor& h, const Tensor& w_local, const Tensor& targets,
                                    dist::Communicator& tp, int64_t chunk_rows = 0,
                                    ops::Precision precision = ops::Precision::f32);

}  // namespace llama3::text
