// Reverse-mode autograd over coarse, fused ops. Each op that records history creates one
// Node holding what its hand-written backward needs; the engine walks the graph from a
// root in topological order, sums gradients flowing into each node, and accumulates
// (`+=`) into leaf tensors' .grad(). Nodes drop their saved tensors as soon as their
// backward has run, so activations are freed during the backward pass.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "runtime/core/tensor.h"

namespace llama3 {

struct Node;

struct AutogradMeta {
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;  // null for leaves
  Tensor grad;                    // accumulated gradient (leaves only)
  // Called after a leaf's gradient was accumulated during backward (used by FSDP to
  // reduce-scatter a block's gradients as soon as they are complete).
  std::vector<std::function<void(Tensor& grad)>> post_accumulate_hooks;
};

struct Node {
  // One entry per differentiable input, in the order backward() returns gradients;
  // null where that input needs no gradient.
  std::vector<std::shared_ptr<AutogradMeta>> next;
  virtual ~Node() = default;
  virtual const char* name() const = 0;
  // Returns one gradient per `next` entry (undefined where not needed).
  virtual std::vector<Tensor> backward(const Tensor& grad_out) = 0;
  // Called once the node's incoming gradient is complete (every contribution summed), as
  // soon as the node is ready to run and before the engine runs any other node; backward()
  // follows later with the same gradient. A node may start asynchronous work on it here that
  // its backward() completes, so the work is in flight while the nodes the engine runs in
  // between compute (context parallelism: the reduce-scatter of dK during V's backward).
  // The engine's order is unchanged; nodes made ready together are prepared in the order
  // they will run.
  virtual void prepare(const Tensor& grad_out) { (void)grad_out; }
  // Whether backward() may add its gradient for an input into `accumulate_into` (below).
  virtual bool accumulates() const { return false; }
  // Set by the engine just before backward() of a node that accumulates(), one entry per
  // `next`: where another node's gradient for that input is already pending and nothing else
  // holds it, that tensor, which backward() may add its own gradient into in place (a GEMM
  // with beta 1 instead of a separate add pass: one read and write of the sum fewer) and
  // return as that input's gradient; for a leaf input, the gradient the leaf holds from an
  // earlier backward (micro-batches of one optimizer step), on the same terms. Undefined
  // elsewhere. Cleared after backward().
  std::vector<Tensor> accumulate_into;
  // Whether backward() would use a bf16 rounding of its incoming gradient (a bf16 GEMM's
  // operand: the linear layers in bf16 mixed precision, which would otherwise cast it).
  virtual bool wants_bf16_grad() const { return false; }
  // Set by the engine next to accumulate_into, one entry per `next`: true where this node's
  // gradient for that input completes it (added in place into accumulate_into[i], or the
  // only contribution; none is still to come) and the gradient's consumer wants_bf16_grad().
  // backward() may then also put the bf16 rounding of the completed f32 gradient in
  // bf16_grads[i] (written by the same kernel that writes the gradient: one read of it fewer
  // than the consumer's cast). Both cleared after backward().
  std::vector<char> offer_bf16;
  std::vector<Tensor> bf16_grads;
  // Set by the engine just before backward() when the node that completed its incoming
  // gradient wrote that bf16 rounding too (above); undefined otherwise. Cleared after.
  Tensor grad_bf16;
  // How many contributions to its incoming gradient backward() takes as separate parts
  // instead of their sum (1: the sum). A node that reads the parts in one kernel (the RMSNorm
  // backward summing the q/k/v projections' bf16 input gradients in f32) saves the sums'
  // passes; the engine then never offers that gradient for in-place sums, and adds
  // contributions beyond the limit, or of another shape, into the first part.
  virtual int max_grad_parts() const { return 1; }
  // Set by the engine before backward() of such a node: the contributions after the one
  // backward() receives (and prepare() saw), in arrival order. Cleared after backward().
  std::vector<Tensor> grad_parts;
  // Drops saved tensors once backward has run.
  virtual void release() {}
};

namespace autograd {

bool grad_enabled();

// Whether backward offers nodes the pending sums they may add into in place
// (Node::accumulate_into); on by default, per thread. Off, every sum is a separate add: the
// same gradients (tests compare the two) at one more pass over each summed gradient.
void set_in_place_accumulation(bool on);
// How many gradient sums this thread's backward passes did in place (statistics, tests).
int64_t in_place_accumulations();
// Whether backward offers the bf16 roundings of completed gradients (Node::offer_bf16); on
// by default, per thread, and only where in-place accumulation is on. Off, the consumers
// cast: the same bits (tests compare the two).
void set_bf16_grad_copies(bool on);
// How many gradients this thread's backward passes handed over with their bf16 rounding.
int64_t bf16_grad_copies();
// How many gradient contributions this thread's backward passes handed over as separate parts
// (Node::grad_parts) instead of adding them.
int64_t grad_parts_taken();

// Disables history recording in its scope (inference, optimizer updates, recompute).
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// True when grad mode is on and any of the tensors requires grad.
bool any_requires_grad(std::initializer_list<const Tensor*> ts);
// The edge to a tensor's history: its meta if it requires grad, else null.
std::shared_ptr<AutogradMeta> edge(const Tensor& t);
// Makes `out` the output of `node` (out.requires_grad() becomes true).
void set_history(Tensor& out, std::shared_ptr<Node> node);

// Backpropagates grad (ones for a scalar root when undefined) from root.
void backward(const Tensor& root, const Tensor& grad);

// Activation checkpointing: runs fn without recording its internals; during backward the
// forward is recomputed with history and backpropagated, so only `inputs` are kept alive
// between forward and backward. fn must be deterministic; parameters it uses receive
// their gradients during the recompute.
Tensor checkpoint(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                  const std::vector<Tensor>& inputs);

}  // namespace autograd
}  // namespace llama3
