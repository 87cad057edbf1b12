#include "runtime/dist/comm_ops.h"

#include "runtime/autograd/autograd.h"

namespace llama3::dist {

namespace {
struct CopyToGroup final : Node {
  Communicator* comm;
  const char* name() const override { return "copy_to_group"; }
  std::vector<Tensor> backward(const Tensor& g) override {
    Tensor r = g.contiguous().clone();
    comm->all_reduce(r, ReduceOp::sum);
    return {r};
  }
};
struct ReduceFromGroup final : Node {
  const char* name() const override { return "reduce_from_group"; }
  std::vector<Tensor> backward(const Tensor& g) override { return {g}; }
};
}  // namespace

Tensor copy_to_group(const Tensor& x, Communicator& comm) {
  if (comm.size() == 1) return x;
  Tensor out = x.detach();
  if (autograd::any_requires_grad({&x})) {
    auto n = std::make_shared<CopyToGroup>();
    n->comm = &comm;
    n->next = {autograd::edge(x)};
    autograd::set_history(out, n);
  }
  return out;
}

Tensor reduce_from_group(const Tensor& x, Communicator& comm) {
  if (comm.size() == 1) return x;
  Tensor out = x.contiguous().clone();
  comm.all_reduce(out, ReduceOp::sum);
  if (autograd::any_requires_grad({&x})) {
    auto n = std::make_shared<ReduceFromGroup>();
    n->next = {autograd::edge(x)};
    autograd::set_history(out, n);
  }
  return out;
}

}  // namespace llama3::dist
