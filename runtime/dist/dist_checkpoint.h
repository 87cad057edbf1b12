// Distributed checkpoints: every rank writes the pieces it holds (rank-NNNNN.safetensors)
// with slice metadata, so a checkpoint written under one layout loads under any other
// (tp2 x pp2 -> dp_shard 4 -> one process). A piece is a contiguous flat range of one
// tensor-parallel slice of a full tensor:
//
//   full (full_shape) --narrow(split_dim, tp_index * n, n)--> tp-local --flatten-->
//   [offset, offset + numel)
//
// split_dim -1 means the tensor is not split over tp (tp_size 1). Loading reads every
// piece of every file and reassembles full tensors, checking that each is covered exactly.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "runtime/core/tensor.h"

namespace llama3::dist {

struct Piece {
  std::string name;  // e.g. "model.layers.0.mlp.up_proj.weight" or "exp_avg.<that>"
  Shape full_shape;
  int split_dim = -1;
  int64_t tp_index = 0, tp_size = 1;
  int64_t offset = 0;  // in the flattened tp-local tensor
  Tensor data;         // 1-D, the piece's elements (f32)
};

// Writes `pieces` of this rank to dir/rank-<rank>.safetensors (via a temporary file and a
// rename); `info` (e.g. {"step": "12"}) goes into the file's metadata.
void save_pieces(const std::string& dir, int rank, const std::vector<Piece>& pieces,
                 const std::map<std::string, std::string>& info);
// Reads every rank file of dir and reassembles the full tensors; throws naming the tensor
// when pieces overlap or leave elements uncovered. `info` receives rank 0's metadata.
std::map<std::string, Tensor> load_full(const std::string& dir, std::map<std::string, std::string>* info = nullptr);

}  // namespace llama3::dist
