#include "runtime/autograd/autograd.h"

#include <unordered_map>

#include "runtime/backend/backend.h"

namespace llama3::autograd {

namespace {
thread_local bool t_grad_enabled = true;
thread_local bool t_in_place = true;
thread_local int64_t t_in_place_count = 0;
thread_local bool t_bf16_copies = true;
thread_local int64_t t_bf16_copy_count = 0;
thread_local int64_t t_parts_count = 0;

// Sum of two gradients without mutating either (either may be aliased elsewhere).
Tensor add_grads(const Tensor& a, const Tensor& b) {
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  backend_for(a.device()).add(a.contiguous(), b.contiguous(), out);
  return out;
}

// The first gradient of a leaf is adopted without a copy when nothing else can see it (a
// contiguous tensor whose storage has no other owner: the engine's own result); otherwise
// it is cloned, so that a later in-place accumulation into m.grad never writes into a tensor
// that is also another leaf's gradient or a node's saved input.
void accumulate_leaf(AutogradMeta& m, Tensor g) {
  if (m.grad.defined() && g.data_ptr() == m.grad.data_ptr() && g.storage() == m.grad.storage()) {
    ++t_in_place_count;  // the node added into m.grad itself (Node::accumulate_into)
  } else if (!m.grad.defined()) {
    if (g.is_contiguous() && g.storage().use_count() == 1) {
      g.mutable_meta() = nullptr;  // a gradient carries no history (as a clone would not)
      m.grad = std::move(g);
    } else {
      m.grad = g.contiguous().clone();
    }
  } else {
    LLAMA3_CHECK(m.grad.shape() == g.shape(), "gradient shape {} for a leaf with gradient {}",
                 shape_str(g.shape()), shape_str(m.grad.shape()));
    backend_for(g.device()).axpy(1.f, g.contiguous(), m.grad);
  }
  for (auto& hook : m.post_accumulate_hooks) hook(m.grad);
}
// Offers `n` the pending gradients it may accumulate into (Node::accumulate_into): those of
// inputs whose producer has a pending sum that only the engine holds (storage without other
// owners, so no other node's input or saved tensor changes under an in-place add) and that
// appear once among n's inputs; and the gradients that leaves already hold from an earlier
// backward (gradient accumulation over micro-batches) when nothing but the leaf holds them.
void offer_pending(Node& n, std::unordered_map<Node*, Tensor>& pending,
                   const std::unordered_map<Node*, int>& deps) {
  n.accumulate_into.assign(n.next.size(), Tensor());
  n.offer_bf16.assign(n.next.size(), 0);
  n.bf16_grads.assign(n.next.size(), Tensor());
  for (size_t i = 0; i < n.next.size(); ++i) {
    const auto& e = n.next[i];
    if (!e) continue;
    if (!e->grad_fn) {
      if (!e->requires_grad || !e->grad.defined()) continue;
      bool once = true;
      for (size_t j = 0; j < n.next.size(); ++j)
        if (j != i && n.next[j] == e) once = false;
      const Tensor& t = e->grad;
      if (once && t.is_contiguous() && t.storage().use_count() == 1) n.accumulate_into[i] = t;
      continue;
    }
    Node* c = e->grad_fn.get();
    bool once = true;
    for (size_t j = 0; j < n.next.size(); ++j)
      if (j != i && n.next[j] && n.next[j]->grad_fn.get() == c) once = false;
    if (!once || c->max_grad_parts() > 1) continue;  // (c takes its contributions apart)
    // Whether this node's edge is the last one into c: then its gradient (added in place, or
    // the only one) completes c's, whose bf16 rounding c would compute next.
    auto d = deps.find(c);
    const bool last = t_bf16_copies && d != deps.end() && d->second == 1 && c->wants_bf16_grad();
    auto it = pending.find(c);
    if (it == pending.end()) {
      n.offer_bf16[i] = last;
      continue;
    }
    const Tensor& t = it->second;
    if (!t.is_contiguous() || t.storage().use_count() != 1) continue;
    n.accumulate_into[i] = t;
    n.offer_bf16[i] = last && t.dtype() == DType::f32;
  }
}
// The bf16 rounding node n wrote of its gradient for c, where offered: kept for c (checked).
void keep_bf16(const Node& n, Node* c, Tensor& bf16, const Tensor& grad,
               std::unordered_map<Node*, Tensor>& pending_bf16) {
  LLAMA3_CHECK(
      bf16.dtype() == DType::bf16 && bf16.shape() == grad.shape() && grad.dtype() == DType::f32,
      "{}: bf16 gradient {} for a gradient {}", n.name(), bf16.str(), grad.str());
  pending_bf16[c] = std::move(bf16);
  ++t_bf16_copy_count;
}
}  // namespace

bool grad_enabled() {
  return t_grad_enabled;
}
void set_in_place_accumulation(bool on) {
  t_in_place = on;
}
int64_t in_place_accumulations() {
  return t_in_place_count;
}
void set_bf16_grad_copies(bool on) {
  t_bf16_copies = on;
}
int64_t bf16_grad_copies() {
  return t_bf16_copy_count;
}
int64_t grad_parts_taken() {
  return t_parts_count;
}

NoGradGuard::NoGradGuard() : prev_(t_grad_enabled) {
  t_grad_enabled = false;
}
NoGradGuard::~NoGradGuard() {
  t_grad_enabled = prev_;
}

bool any_requires_grad(std::initializer_list<const Tensor*> ts) {
  if (!t_grad_enabled) return false;
  for (const Tensor* t : ts)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}

std::shared_ptr<AutogradMeta> edge(const Tensor& t) {
  return t.defined() && t.requires_grad() ? t.meta() : nullptr;
}

void set_history(Tensor& out, std::shared_ptr<Node> node) {
  auto m = std::make_shared<AutogradMeta>();
  m->requires_grad = true;
  m->grad_fn = std::move(node);
  out.mutable_meta() = std::move(m);
}

void backward(const Tensor& root, const Tensor& grad_in) {
  LLAMA3_CHECK(root.requires_grad(), "backward() on a tensor that does not require grad");
  Tensor grad = grad_in;
  if (!grad.defined()) {
    LLAMA3_CHECK(root.numel() == 1, "backward() without a gradient needs a scalar, got {}",
                 root.str());
    grad = Tensor::full(root.shape(), 1.0, root.dtype(), root.device());
  }
  auto root_meta = root.meta();
  if (!root_meta->grad_fn) {
    accumulate_leaf(*root_meta, grad);
    return;
  }
  // Count, for each node, how many edges from other reachable nodes point at it.
  std::unordered_map<Node*, int> deps;
  std::vector<Node*> stack{root_meta->grad_fn.get()};
  deps[root_meta->grad_fn.get()] = 0;
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (auto& e : n->next) {
      if (!e || !e->grad_fn) continue;
      Node* c = e->grad_fn.get();
      auto [it, inserted] = deps.try_emplace(c, 0);
      it->second++;
      if (inserted) stack.push_back(c);
    }
  }
  std::unordered_map<Node*, Tensor> pending;
  std::unordered_map<Node*, Tensor> pending_bf16;  // bf16 roundings of completed gradients
  std::unordered_map<Node*, std::vector<Tensor>> pending_parts;  // Node::grad_parts
  // Keep nodes alive while we run: the graph may be owned only by tensors that backward
  // frees as it goes.
  std::vector<std::shared_ptr<Node>> ready{root_meta->grad_fn};
  pending[root_meta->grad_fn.get()] = grad;
  root_meta->grad_fn->prepare(grad);
  while (!ready.empty()) {
    std::shared_ptr<Node> n = std::move(ready.back());
    ready.pop_back();
    Tensor g = std::move(pending[n.get()]);
    pending.erase(n.get());
    if (auto b = pending_bf16.find(n.get()); b != pending_bf16.end()) {
      n->grad_bf16 = std::move(b->second);
      pending_bf16.erase(b);
    }
    if (auto pp = pending_parts.find(n.get()); pp != pending_parts.end()) {
      n->grad_parts = std::move(pp->second);
      pending_parts.erase(pp);
    }
    if (t_in_place && n->accumulates()) offer_pending(*n, pending, deps);
    std::vector<Tensor> grads = n->backward(g);
    std::vector<Tensor> bf16_grads = std::move(n->bf16_grads);
    n->accumulate_into.clear(), n->offer_bf16.clear(), n->bf16_grads.clear();
    n->grad_bf16 = Tensor(), n->grad_parts.clear();
    g = Tensor();
    n->release();
    LLAMA3_CHECK(grads.size() == n->next.size(), "{} returned {} gradients for {} inputs",
                 n->name(), grads.size(), n->next.size());
    const size_t ready_before = ready.size();
    for (size_t i = 0; i < grads.size(); ++i) {
      auto& e = n->next[i];
      if (!e || !grads[i].defined()) continue;
      if (e->grad_fn) {
        Node* c = e->grad_fn.get();
        // The node's bf16 rounding of c's completed gradient (offered: the last edge into c).
        const bool has_bf16 = i < bf16_grads.size() && bf16_grads[i].defined() && deps[c] == 1;
        auto it = pending.find(c);
        if (it == pending.end()) {
          if (has_bf16) keep_bf16(*n, c, bf16_grads[i], grads[i], pending_bf16);
          pending.emplace(c, std::move(grads[i]));
        } else if (c->max_grad_parts() > 1 && grads[i].shape() == it->second.shape() &&
                   int(pending_parts[c].size()) + 1 < c->max_grad_parts()) {
          pending_parts[c].push_back(std::move(grads[i]));  // c sums them itself
          ++t_parts_count;
        } else if (grads[i].data_ptr() == it->second.data_ptr() &&
                   grads[i].storage() == it->second.storage()) {
          it->second = std::move(grads[i]), ++t_in_place_count;  // the node added in place
          if (has_bf16) keep_bf16(*n, c, bf16_grads[i], it->second, pending_bf16);
        } else {
          it->second = add_grads(it->second, grads[i]);
        }
        if (--deps[c] == 0) ready.push_back(e->grad_fn);
      } else if (e->requires_grad) {
        accumulate_leaf(*e, std::move(grads[i]));
      }
    }
    // The nodes just made ready run last-pushed first: prepare them in that order.
    for (size_t j = ready.size(); j-- > ready_before;) ready[j]->prepare(pending[ready[j].get()]);
  }
}

namespace {
struct CheckpointNode : Node {
  std::function<Tensor(const std::vector<Tensor>&)> fn;
  std::vector<Tensor> inputs;  // detached
  const char* name() const override { return "checkpoint"; }
  std::vector<Tensor> backward(const Tensor& grad_out) override {
    std::vector<Tensor> leaves;
    for (size_t i = 0; i < inputs.size(); ++i) {
      Tensor d = inputs[i].detach();
      if (next[i]) d.set_requires_grad(true);
      leaves.push_back(d);
    }
    Tensor out;
    {
      bool prev = t_grad_enabled;
      t_grad_enabled = true;
      out = fn(leaves);
      t_grad_enabled = prev;
    }
    if (out.requires_grad()) autograd::backward(out, grad_out);
    std::vector<Tensor> grads;
    for (auto& l : leaves) grads.push_back(l.grad());
    return grads;
  }
  void release() override {
    inputs.clear();
    fn = nullptr;
  }
};
}  // namespace

Tensor checkpoint(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                  const std::vector<Tensor>& inputs) {
  if (!t_grad_enabled) return fn(inputs);
  Tensor out;
  {
    NoGradGuard ng;
    out = fn(inputs);
  }
  auto node = std::make_shared<CheckpointNode>();
  node->fn = fn;
  for (const Tensor& t : inputs) {
    node->inputs.push_back(t.detach());
    node->next.push_back(edge(t));
  }
  // Parameters used inside fn get gradients during recompute, so history exists whenever
  // grad mode is on, even if no input requires grad.
  set_history(out, node);
  return out;
}

}  // namespace llama3::autograd
