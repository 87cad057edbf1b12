// The parallelize step of the Llama 3 text model and the distributed training step that
// runs it. The model code is unchanged; this file applies, in this order:
//
//   1. TP  - q/k/v and gate/up projections become column-parallel (a slice of the output
//            rows: whole heads / FFN columns), o/down row-parallel (a slice of the input
//            columns); communication enters through nn::Linear's input/output hooks
//            (copy_to_group before column-parallel layers, reduce_from_group after
//            row-parallel ones). The embedding and lm_head are vocabulary-parallel (rows
//            split; text/model/vocab_parallel.h: no full-vocabulary logits on any rank);
//            norms stay replicated. With ParallelizeOptions::overlap the column-parallel
//            layers all-reduce their input gradient asynchronously inside their backward
//            (nn::Linear::dx_hook), in flight while the weight-gradient GEMM runs, instead of
//            copy_to_group's all-reduce after the node (same values, bitwise), and the
//            row-parallel layers compute their output in row slices whose all-reduces are
//            in flight while the next slice is computed (nn::Linear::out_hook; bitwise too).
//   2. PP  - the layers are cut into pp x V contiguous stages (first and last may hold one
//            layer fewer); pipeline rank r runs stages r, r + pp, ... (V model chunks;
//            V = 1: 1F1B, V > 1: interleaved 1F1B, Megatron's order). Global stage 0 keeps
//            the embedding, the last the final norm, lm_head and the loss; other parameters
//            are dropped from this rank. Point-to-point transfers go in batches
//            (Communicator::batch_p2p; NCCL: grouped calls): before each unit of the
//            schedule (one operation; in interleaved steady state a forward and a backward)
//            one batch carries the previous unit's sends and this unit's receives, an order
//            that cannot deadlock under NCCL's in-order matching. A batch is waited only
//            where its data is consumed; with ParallelizeOptions::overlap on MPI it also posts
//            the receives of the next two operations; each send owns its buffer until it
//            completes. A micro-batch's activations are freed after its
//            backward.
//      CP  - tokens are split over cp in 2*cp load-balanced causal chunks (rank r: chunks r
//            and 2cp-1-r); each attention gathers K/V over cp (Attention::kv_hook; with
//            ParallelizeOptions::overlap kv_hook_async: V's all-gather is issued before
//            the K and Q projections, K's before Q's, both waited just before attention)
//            and queries carry their global positions (AttentionParams::q_pos), so the
//            causal and document masks are exact. Parameter gradients are summed over cp.
//            With overlap the backward's reduce-scatters of dK and dV are issued as soon as
//            the attention's backward has produced them (autograd Node::prepare) and waited
//            where the engine consumes them: dK's runs during V's projection backward.
//   3. AC  - each block may be recomputed in backward (autograd::checkpoint).
//   4. FSDP- every parameter this rank keeps is flattened, padded to a multiple of dp_shard
//            and sharded; the optimizer sees only shards. A block's parameters are
//            all-gathered right before its forward and again before its recompute in
//            backward (FSDP implies per-block recompute here: the gathered weights are not
//            kept between forward and backward), and each gradient is reduce-scattered as
//            soon as it is complete (AutogradMeta::post_accumulate_hooks). The embedding,
//            final norm and lm_head (the root unit) are gathered once per step.
//            With ParallelizeOptions::overlap these collectives are asynchronous: the
//            gather of the next block (forward: l+1, recompute in backward: l-1; the last
//            block of a chunk prefetches itself for its recompute) is issued before block l
//            computes, and block l's gradient reduce-scatters run while the backward of
//            block l-1 computes. At most two gathered blocks exist at once (the running one
//            and one prefetched) and the reduce-scatters of at most two blocks are in
//            flight; all are completed, in issue order, before the step returns, so results
//            are bitwise those of the blocking path.
//
// Devices: every buffer, shard and transfer is on the device of the model's parameters (CPU
// tensors with the MPI communicator, CUDA tensors with NCCL: dist::communicator_for_device).
//
// After backward, shard gradients are all-reduced over dp_replicate (HSDP) and the loss is
// the global mean over all valid targets of the global batch: every micro-batch loss is
// scaled by its valid-target count / the global count, and gradients are summed.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/dist/dist_checkpoint.h"
#include "runtime/dist/parallel_dims.h"
#include "runtime/optim/adamw.h"
#include "text/model/llama.h"

namespace llama3::text {

struct ParallelizeOptions {
  int64_t microbatches = 1;     // per step and data-parallel rank (pipeline micro-batches)
  int virtual_stages = 1;       // model chunks per pipeline rank: 1 = 1F1B, V > 1 = interleaved 1F1B
  bool activation_checkpointing = false;
  bool overlap = true;          // FSDP: asynchronous gathers / reduce-scatters overlapping compute;
                                // PP: batches waited where consumed, receives posted ahead (MPI);
                                // CP: K/V all-gathers issued before the Q/K projections;
                                // CP: dK/dV reduce-scatters issued before V's backward;
                                // TP: input-gradient all-reduces during the dW GEMMs,
                                // row-parallel output all-reduces during the next row slice
  bool tp_overlap = true;       // with overlap: the TP part (off: FSDP/PP/CP overlap only; benchmarks)
  // With overlap, to isolate two parts in benchmarks (off: that part's blocking form): with
  // tp_overlap the row-parallel forward all-reduces by row slices; the dK/dV reduce-scatters
  // issued as soon as their gradient is complete.
  bool tp_forward_overlap = true;
  bool cp_backward_overlap = true;
  bool verbose = true;          // print the pipeline schedule and bubble fraction on rank 0
};

class ParallelLlama {
 public:
  // Applies the layout to `model` in place (it keeps only this rank's slices afterwards).
  // Collective over groups.world.
  ParallelLlama(LlamaModel& model, dist::ProcessGroups groups, ParallelizeOptions opt);
  ~ParallelLlama();

  // One forward/backward over this rank's data-parallel slice (B_local, T) of the global
  // batch (rows [dp_rank * B_local, (dp_rank + 1) * B_local)). Gradients end up on the
  // shards returned by optimizer_params(). Returns the global mean loss (all ranks).
  double forward_backward(const Tensor& tokens, const Tensor& targets, const Tensor& doc_ids = Tensor());
  // The same global mean loss without backward (evaluation): every rank runs its forwards
  // in the schedule's forward order, activations are dropped as soon as they are sent.
  double forward_loss(const Tensor& tokens, const Tensor& targets, const Tensor& doc_ids = Tensor());
  // Pipeline micro-batches per call from the next call on (the trainer's gradient
  // accumulation changes with a batch-size ramp); validated like the constructor's.
  void set_microbatches(int64_t m);
  int64_t microbatches() const { return opt_.microbatches; }

  // The parameters this rank updates (shards under FSDP) and the norm reduction that makes
  // AdamW's gradient clipping global.
  std::vector<nn::NamedParam> optimizer_params() const;
  optim::AdamW::NormReduction norm_reduction() const;
  void zero_grad();

  // Full parameters by HF name, reassembled from every rank (collective; tests/checkpoints),
  // as host tensors whatever the model's device.
  std::map<std::string, Tensor> full_state_dict() const;

  // Distributed checkpoints (runtime/dist/dist_checkpoint.h): this rank's pieces of the
  // weights and, with `opt`, of its AdamW moments (one copy of every element over all
  // ranks); and loading from full tensors written under any layout.
  std::vector<dist::Piece> checkpoint_pieces(const optim::AdamW* opt) const;
  void load_full(const std::map<std::string, Tensor>& full, optim::AdamW* opt, int64_t step);

  const dist::ProcessGroups& groups() const { return g_; }
  // The device of the model's parameters: every buffer, shard and transfer of the step is
  // there (CPU tensors with the MPI communicator, CUDA tensors with the NCCL one).
  Device device() const { return dev_; }
  // Layer ranges [first, end) of this rank's model chunks (chunk k is global stage k*pp + rank).
  const std::vector<std::pair<int64_t, int64_t>>& chunks() const { return chunks_; }
  double bubble_fraction() const;

 private:
  struct Param;
  // FSDP all-gathers of one unit (a block, or the root unit as layer -1) in flight.
  struct Gathering {
    int64_t layer = -1;
    std::vector<Param*> params;
    std::vector<Tensor> full;
    std::vector<std::unique_ptr<dist::Work>> works;
  };
  // One gradient reduce-scatter in flight; completed (accumulated into the shard) in order.
  struct PendingGrad {
    int64_t layer = -1;
    Param* param = nullptr;
    Tensor flat, part;
    std::unique_ptr<dist::Work> work;
  };
  void gather(Param& p);
  void install(Param& p, const Tensor& full);
  Gathering issue_gather(const std::vector<Param*>& ps, int64_t layer);
  void complete(Gathering& g);
  void prefetch(int64_t layer);
  void materialize(int64_t layer);
  void reduce_scatter_grad(Param& p, Tensor& g);
  void finish_grads(size_t keep_layers);
  void progress();
  void drain();
  Tensor shard_of(const Param& p, const Tensor& full) const;
  void reshard(Param& p);
  Tensor run_blocks(int chunk, Tensor h, const Tensor& pos, const AttentionParams& ap);
  double run_step(const Tensor& tokens, const Tensor& targets, const Tensor& doc_ids, bool backward);

  LlamaModel& model_;
  dist::ProcessGroups g_;
  ParallelizeOptions opt_;
  Device dev_;
  std::vector<std::unique_ptr<Param>> params_;
  std::vector<std::vector<Param*>> block_params_;  // by layer (empty for other ranks' layers)
  std::vector<Param*> root_params_;                // embedding, norm, lm_head held here
  std::vector<std::pair<int64_t, int64_t>> chunks_;
  bool training_ = false;                 // the current step runs backward
  std::deque<Gathering> prefetched_;      // block gathers issued ahead (at most one)
  std::deque<PendingGrad> pending_grads_; // reduce-scatters in flight, issue order
  std::vector<dist::Work*> p2p_;          // pipeline receives / sends in flight (owned by run_step)
};

// Layer range [first, end) of pipeline stage `stage` of `stages` for n_layers layers.
std::pair<int64_t, int64_t> stage_layers(int64_t n_layers, int stage, int stages);

}  // namespace llama3::text
