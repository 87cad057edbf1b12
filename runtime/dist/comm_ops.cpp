#include "runtime/dist/comm_ops.h"

#include <utility>

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

namespace {
struct ReducedFromGroup final : Node {
  const char* name() const override { return "reduce_from_group"; }
  std::vector<Tensor> backward(const Tensor& g) override { return {g}; }
};
}  // namespace

Tensor reduced_from_group(const Tensor& x, Communicator& comm) {
  if (comm.size() == 1) return x;
  Tensor out = x.detach();
  if (autograd::any_requires_grad({&x})) {
    auto n = std::make_shared<ReducedFromGroup>();
    n->next = {autograd::edge(x)};
    autograd::set_history(out, n);
  }
  return out;
}

std::vector<int32_t> cp_positions(int64_t T, int cp, int rank) {
  const int64_t c = T / (2 * cp);
  std::vector<int32_t> pos;
  for (int64_t chunk : {int64_t(rank), int64_t(2 * cp - 1 - rank)})
    for (int64_t i = 0; i < c; ++i) pos.push_back(int32_t(chunk * c + i));
  return pos;
}

namespace {
// Copies between the gathered buffer (cp, B, T_local, R) and global order (B, T, R), where
// rank j's local halves are global chunks j and 2cp-1-j. to_global: buf -> out, else out -> buf.
void permute_chunks(Tensor& buf, Tensor& glob, int cp, bool to_global) {
  const int64_t Tl = buf.size(2), c = Tl / 2;
  for (int j = 0; j < cp; ++j) {
    Tensor bj = buf.narrow(0, j, 1).view({buf.size(1), Tl, buf.size(3)});
    const int64_t chunks[2] = {j, 2 * cp - 1 - j};
    for (int h = 0; h < 2; ++h) {
      Tensor b = bj.narrow(1, h * c, c);
      Tensor g = glob.narrow(1, chunks[h] * c, c);
      if (to_global)
        g.copy_(b);
      else
        b.copy_(g);
    }
  }
}

struct GatherSequence final : Node {
  Communicator* comm;
  Shape local_shape;
  // Overlap: the reduce-scatter is issued in prepare() (as soon as the gradient is complete)
  // and waited in backward(), so it is in flight while the engine runs the nodes between.
  bool early = false;
  Tensor buf, out;
  std::shared_ptr<Work> work;
  const char* name() const override { return "gather_sequence"; }
  // Global-order gradient -> the (cp, B, T_local, R) send buffer of the reduce-scatter.
  void pack(const Tensor& g) {
    const int cp = comm->size();
    const int64_t B = local_shape[0], Tl = local_shape[1], R = shape_numel(local_shape) / (B * Tl);
    Tensor glob = g.contiguous().view({B, Tl * cp, R});
    buf = Tensor::empty({cp, B, Tl, R}, g.dtype(), g.device());
    permute_chunks(buf, glob, cp, false);
    out = Tensor::empty(local_shape, g.dtype(), g.device());
  }
  void prepare(const Tensor& g) override {
    if (!early) return;
    pack(g);
    work = comm->ireduce_scatter(buf, out, ReduceOp::sum);
  }
  std::vector<Tensor> backward(const Tensor& g) override {
    if (early) {
      work->wait();
      work.reset();
    } else {  // the blocking path, as before the overlap existed
      pack(g);
      comm->reduce_scatter(buf, out, ReduceOp::sum);
    }
    buf = Tensor();
    return {std::exchange(out, Tensor())};
  }
  void release() override {
    buf = out = Tensor();
    work.reset();
  }
};

// The all-gather of gather_sequence(_async); early_backward: GatherSequence::early.
std::function<Tensor()> gather(const Tensor& x, Communicator& comm, bool early_backward) {
  const int cp = comm.size();
  if (cp == 1) return [x] { return x; };
  const int64_t B = x.size(0), Tl = x.size(1), R = x.numel() / (B * Tl);
  LLAMA3_CHECK(Tl % 2 == 0, "gather_sequence: local length {} must hold two equal chunks", Tl);
  Tensor xc = x.contiguous();  // the send buffer: kept alive until the gather completes
  Tensor buf = Tensor::empty({cp, B, Tl, R}, x.dtype(), x.device());
  std::shared_ptr<Work> work = comm.iall_gather(xc, buf);
  return [x, xc, buf, work, &comm, cp, B, Tl, R, early_backward]() mutable {
    work->wait();
    Shape gs = x.shape();
    gs[1] = Tl * cp;
    Tensor out = Tensor::empty(gs, x.dtype(), x.device());
    Tensor glob = out.view({B, Tl * cp, R});
    permute_chunks(buf, glob, cp, true);
    if (autograd::any_requires_grad({&x})) {
      auto n = std::make_shared<GatherSequence>();
      n->comm = &comm;
      n->local_shape = x.shape();
      n->early = early_backward;
      n->next = {autograd::edge(x)};
      autograd::set_history(out, n);
    }
    xc = buf = Tensor();
    return out;
  };
}
}  // namespace

Tensor gather_sequence(const Tensor& x, Communicator& comm) {
  return gather(x, comm, false)();
}

std::function<Tensor()> gather_sequence_async(const Tensor& x, Communicator& comm,
                                              bool early_backward) {
  return gather(x, comm, early_backward);
}

}  // namespace llama3::dist
