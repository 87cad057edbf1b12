// ParallelDims: the degrees of 4D(+1) parallelism of one model, validated against the world
// size and the model's shapes (errors show the arithmetic), and the process groups derived
// from them - once, from ONE rank order - and passed explicitly (no global groups; an
// encoder and the LM may use different layouts, Megatron issue #6307).
//
// Rank order (tp fastest, then cp, dp_shard, dp_replicate, pp slowest):
//
//   rank = tp_r + tp * (cp_r + cp * (dps_r + dp_shard * (dpr_r + dp_replicate * pp_r)))
//
// Worked example, dp_replicate 1, dp_shard 2, cp 1, tp 2, pp 2 (world 8):
//   rank 5 = 1 + 2 * (0 + 1 * (0 + 2 * (0 + 1 * 1)))  ->  tp 1, cp 0, dp_shard 0, dp_rep 0, pp 1
//   tp groups {0,1} {2,3} {4,5} {6,7}; dp_shard groups {0,2} {1,3} {4,6} {5,7};
//   pp groups {0,4} {1,5} {2,6} {3,7}.
// tp is fastest so a tensor-parallel group sits on neighbouring ranks (one node, fastest
// links); pp is slowest since its point-to-point traffic is the smallest.
#pragma once

#include <memory>
#include <string>

#include "runtime/dist/communicator.h"

namespace llama3::dist {

struct ParallelDims {
  int dp_replicate = 1;  // replicas of the (sharded) model: gradients all-reduced
  int dp_shard = 1;      // FSDP: parameters, gradients, optimizer state sharded
  int cp = 1;            // context parallel: the sequence split across ranks
  int tp = 1;            // tensor parallel: heads and FFN columns split
  int pp = 1;            // pipeline stages

  int world_size() const { return dp_replicate * dp_shard * cp * tp * pp; }
  int dp() const { return dp_replicate * dp_shard; }  // ways the batch is split
  bool dp_replicate_enabled() const { return dp_replicate > 1; }
  bool fsdp_enabled() const { return dp_shard > 1; }
  bool cp_enabled() const { return cp > 1; }
  bool tp_enabled() const { return tp > 1; }
  bool pp_enabled() const { return pp > 1; }
  // The sequence length must be a multiple of this (2 chunks per cp rank, load-balanced).
  int seq_len_divisor() const { return 2 * cp; }
  std::string str() const;  // "dp_replicate 1 x dp_shard 2 x cp 1 x tp 2 x pp 2"

  // Every degree >= 1 and the product equals world_size; the message shows the product.
  void validate(int world_size) const;
  // "tp=2,pp=2,dp_shard=2" (keys dp_replicate, dp_shard, cp, tp, pp; unnamed degrees are 1),
  // the syntax of `llama3 train --parallel`. Throws naming the bad item.
  static ParallelDims parse(const std::string& spec);
};

// What the layout needs from a model (checked before any work).
struct ModelShape {
  int64_t n_heads = 0, n_kv_heads = 0, n_layers = 0, ffn_hidden = 0, vocab = 0;
  int64_t seq_len = 0, global_batch = 0, microbatches = 1;
  int virtual_stages = 1;  // per pipeline rank (interleaved 1F1B)
};
void validate_for_model(const ParallelDims& d, const ModelShape& m);

struct Coords {
  int tp = 0, cp = 0, dp_shard = 0, dp_replicate = 0, pp = 0;
};
Coords coords_of(const ParallelDims& d, int rank);
int rank_of(const ParallelDims& d, const Coords& c);

// The groups of one rank. `dp_shard_cp`-style merged groups are not needed here: CP
// gradients are summed over `cp` explicitly.
struct ProcessGroups {
  ParallelDims dims;
  Coords coords;
  std::shared_ptr<Communicator> world, tp, cp, dp_shard, dp_replicate, pp;
  std::shared_ptr<Communicator> dp;  // dp_replicate x dp_shard (loss and token counts)
};
// Collective over `world`: every rank must call it. Validates dims against world->size().
ProcessGroups make_process_groups(const ParallelDims& d, std::shared_ptr<Communicator> world);

}  // namespace llama3::dist
