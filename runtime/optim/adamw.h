// AdamW with f32 master weights and moments and decoupled weight decay (applied only to
// parameters in the decay group), fused with global-norm gradient clipping: the clip
// factor is folded into the update instead of rewriting every gradient.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "runtime/nn/module.h"
#include "runtime/ops/ops.h"

namespace llama3::optim {

struct AdamWConfig {
  float lr = 3e-4f;  // peak learning rate (schedules scale it per step)
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.1f;
  float max_grad_norm = 1.0f;  // <= 0 disables clipping
};

class AdamW {
 public:
  AdamW(std::vector<nn::NamedParam> params, const AdamWConfig& cfg);

  // Global L2 norm of all gradients (missing gradients count as zero); non-finite when any
  // gradient element is, so it doubles as the trainer's finiteness check. Under a
  // NormReduction it is a collective: every rank must call it.
  double grad_norm() const;
  // Distributed training: each parameter's squared norm is weighted (1 / the number of
  // ranks holding an identical copy of that tensor) and summed over all ranks by sum_all,
  // so the norm - and the clip factor - is the single-process one across shards/replicas.
  struct NormReduction {
    std::vector<double> weights;            // one per trainable parameter, in order
    std::function<double(double)> sum_all;  // all-reduce of one double
  };
  void set_norm_reduction(NormReduction r);
  // One update at learning rate lr; returns the gradient norm before clipping.
  double step(float lr);
  // The same with the norm grad_norm() returned for these gradients (not recomputed).
  double step(float lr, double norm);
  void zero_grad();
  int64_t steps() const { return step_; }

  // ---- captured steps (a CUDA graph of the whole training step, Trainer::cuda_graph) ----
  // A graph replays kernels with the arguments of capture time, so the clip factor, the skip
  // decision and the learning rate travel in `state` (f32, AdamWDynamic::size elements on
  // the parameters' device) instead. enqueue_captured_step enqueues the clipping state of
  // the current gradients (Backend::grad_clip_state; `loss`, the step's summed loss, only
  // decides the skip) and every update reading it; nothing is read back, so it may run
  // inside Backend::capture. Before each run of that work, set_captured_lr writes the host
  // part of state (the scalars of step steps() + 1 at lr); after it, commit_captured_step
  // counts the step unless it was skipped (state's skip flag), as step() would have. The
  // result equals step(lr, grad_norm()) bit for bit. One device only.
  void enqueue_captured_step(const Tensor& loss, Tensor& state);
  void set_captured_lr(Tensor& state, float lr) const;
  void commit_captured_step(bool skipped);

  // bf16 mixed precision: keep a bf16 copy of every matrix parameter (2-D, f32), written by
  // each step() in the same pass as the update, for the bf16 GEMMs to use instead of casting
  // the weights every step (ops::WeightCopyTable; install bf16_copies() with an
  // ops::WeightCopiesScope around the forward and backward). A copy counts once a step has
  // written it; load_state() and invalidate_bf16_copies() (for anything else that writes the
  // parameters) drop them all until the next step. Costs 2 bytes per parameter.
  void enable_bf16_copies();
  const ops::WeightCopyTable* bf16_copies() const { return copies_ ? &*copies_ : nullptr; }
  void invalidate_bf16_copies() {
    if (copies_) copies_->invalidate();
  }

  // Optimizer state by name: "exp_avg.<param>", "exp_avg_sq.<param>".
  std::map<std::string, Tensor> state_tensors() const;
  void load_state(const std::map<std::string, Tensor>& tensors, int64_t step);
  const std::vector<nn::NamedParam>& params() const { return params_; }
  const AdamWConfig& config() const { return cfg_; }

 private:
  // The update's scalars at lr (step and grad_scale are the caller's; each AdamWItem has its
  // decay group's weight decay).
  AdamWParams hyper(float lr) const;
  // The parameters with a gradient, grouped by the gradient's device (devices in order of
  // first appearance, parameters in order).
  struct DeviceGroup {
    Device device;
    std::vector<size_t> params;
  };
  std::vector<DeviceGroup> with_grad_by_device() const;
  // Parameter i's update with gradient grad (its tensors, bf16 copy and weight decay).
  AdamWItem item(size_t i, const Tensor& grad);
  std::vector<nn::NamedParam> params_;  // trainable only
  std::vector<Tensor> m_, v_;
  std::optional<ops::WeightCopyTable> copies_;
  std::vector<int64_t> copy_of_;  // per parameter: its index in copies_, or -1
  std::vector<size_t> captured_copies_;  // the copies a captured step writes
  AdamWConfig cfg_;
  int64_t step_ = 0;
  NormReduction norm_reduction_;
};

}  // namespace llama3::optim
