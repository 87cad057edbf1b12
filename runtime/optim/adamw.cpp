#include "runtime/optim/adamw.h"

#include <cmath>
#include <vector>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"

namespace llama3::optim {

AdamW::AdamW(std::vector<nn::NamedParam> params, const AdamWConfig& cfg) : cfg_(cfg) {
  for (auto& p : params) {
    if (!p.info.trainable) continue;
    LLAMA3_CHECK(p.tensor->dtype() == DType::f32 || p.tensor->dtype() == DType::f64,
                 "AdamW: parameter {} is {}; master weights must be f32", p.name,
                 dtype_name(p.tensor->dtype()));
    params_.push_back(p);
    m_.push_back(Tensor::zeros(p.tensor->shape(), p.tensor->dtype(), p.tensor->device()));
    v_.push_back(Tensor::zeros(p.tensor->shape(), p.tensor->dtype(), p.tensor->device()));
  }
}

std::vector<AdamW::DeviceGroup> AdamW::with_grad_by_device() const {
  std::vector<DeviceGroup> groups;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor g = params_[i].tensor->grad();
    if (!g.defined()) continue;
    size_t d = 0;
    while (d < groups.size() && !(groups[d].device == g.device())) ++d;
    if (d == groups.size()) groups.push_back({g.device(), {}});
    groups[d].params.push_back(i);
  }
  return groups;
}

double AdamW::grad_norm() const {
  // One multi-tensor reduction per device (on CUDA one synchronisation, not one per tensor).
  double ss = 0;
  for (const DeviceGroup& dg : with_grad_by_device()) {
    std::vector<Tensor> gs;
    std::vector<double> ws;
    for (size_t i : dg.params) {
      gs.push_back(params_[i].tensor->grad());
      ws.push_back(norm_reduction_.weights.empty() ? 1.0 : norm_reduction_.weights[i]);
    }
    ss += backend_for(dg.device).sum_squares_many(gs, ws);
  }
  if (norm_reduction_.sum_all) ss = norm_reduction_.sum_all(ss);
  return std::sqrt(ss);
}

void AdamW::set_norm_reduction(NormReduction r) {
  LLAMA3_CHECK(r.weights.empty() || r.weights.size() == params_.size(),
               "AdamW: {} norm weights for {} parameters", r.weights.size(), params_.size());
  norm_reduction_ = std::move(r);
}

double AdamW::step(float lr) {
  return step(lr, grad_norm());
}

AdamWParams AdamW::hyper(float lr) const {
  AdamWParams hp;
  hp.lr = lr;
  hp.beta1 = cfg_.beta1, hp.beta2 = cfg_.beta2, hp.eps = cfg_.eps;
  return hp;
}

double AdamW::step(float lr, double norm) {
  autograd::NoGradGuard ng;
  const float scale = clip_factor(norm, cfg_.max_grad_norm);
  ++step_;
  AdamWParams hp = hyper(lr);
  hp.step = step_;
  hp.grad_scale = scale;
  std::vector<size_t> written;                           // the bf16 copies updated
  for (const DeviceGroup& dg : with_grad_by_device()) {  // one multi-tensor update per device
    std::vector<AdamWItem> items;
    for (size_t i : dg.params) {
      items.push_back(item(i, params_[i].tensor->grad()));
      if (!copy_of_.empty() && copy_of_[i] >= 0) written.push_back(size_t(copy_of_[i]));
    }
    backend_for(dg.device).adamw_step_many(items, hp);
  }
  for (size_t c : written) copies_->mark_written(c);
  return norm;
}

AdamWItem AdamW::item(size_t i, const Tensor& grad) {
  AdamWItem it;
  it.param = params_[i].tensor->detach();
  it.grad = grad;
  it.m = m_[i], it.v = v_[i];
  const int64_t c = copy_of_.empty() ? -1 : copy_of_[i];
  if (c >= 0) it.param_bf16 = copies_->copy(size_t(c));
  it.weight_decay = params_[i].info.weight_decay ? cfg_.weight_decay : 0.f;
  return it;
}

void AdamW::enqueue_captured_step(const Tensor& loss, Tensor& state) {
  autograd::NoGradGuard ng;
  LLAMA3_CHECK(!norm_reduction_.sum_all,
               "AdamW: a captured step runs in one process (the norm here is not a collective)");
  std::vector<Tensor> grads;
  std::vector<size_t> with_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor g = params_[i].tensor->grad();
    if (!g.defined()) continue;
    LLAMA3_CHECK(g.device() == state.device(),
                 "AdamW: a captured step needs every gradient on {} (state), {} is on {}",
                 state.device().str(), params_[i].name, g.device().str());
    grads.push_back(g);
    with_grad.push_back(i);
  }
  Backend& be = backend_for(state.device());
  be.grad_clip_state(grads, loss, cfg_.max_grad_norm, state);
  captured_copies_.clear();
  std::vector<AdamWItem> items;
  for (size_t k = 0; k < with_grad.size(); ++k) {
    const size_t i = with_grad[k];
    items.push_back(item(i, grads[k]));
    if (!copy_of_.empty() && copy_of_[i] >= 0) captured_copies_.push_back(size_t(copy_of_[i]));
  }
  AdamWParams hp = hyper(0.f);  // lr, step and grad_scale come from state
  hp.dynamic = state;
  be.adamw_step_many(items, hp);
}

void AdamW::set_captured_lr(Tensor& state, float lr) const {
  AdamWParams hp;  // the decay group's scalars (the kernel ignores decay for the others)
  hp.lr = lr;
  hp.beta1 = cfg_.beta1, hp.beta2 = cfg_.beta2, hp.eps = cfg_.eps;
  hp.weight_decay = cfg_.weight_decay;
  hp.step = step_ + 1;
  const AdamWStepScalars s = adamw_step_scalars(hp);
  const float host[3] = {s.step_size, s.bc2_sqrt, s.decay};
  Tensor tail = state.narrow(0, AdamWDynamic::step_size, 3);
  backend_for(state.device()).copy_from_host(host, sizeof host, tail);
}

void AdamW::commit_captured_step(bool skipped) {
  if (skipped) return;
  ++step_;
  for (size_t c : captured_copies_) copies_->mark_written(c);
}

void AdamW::enable_bf16_copies() {
  if (copies_) return;
  copies_.emplace();
  copy_of_.assign(params_.size(), -1);
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = *params_[i].tensor;
    if (p.dim() == 2 && p.dtype() == DType::f32 && p.is_contiguous())
      copy_of_[i] = int64_t(copies_->add(p));
  }
}

void AdamW::zero_grad() {
  for (auto& p : params_) p.tensor->zero_grad();
}

std::map<std::string, Tensor> AdamW::state_tensors() const {
  std::map<std::string, Tensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out["exp_avg." + params_[i].name] = m_[i];
    out["exp_avg_sq." + params_[i].name] = v_[i];
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, Tensor>& tensors, int64_t step) {
  for (size_t i = 0; i < params_.size(); ++i) {
    for (auto [prefix, dst] : {std::pair{"exp_avg.", &m_[i]}, std::pair{"exp_avg_sq.", &v_[i]}}) {
      auto it = tensors.find(prefix + params_[i].name);
      LLAMA3_CHECK(it != tensors.end(), "optimizer state has no '{}{}'", prefix, params_[i].name);
      LLAMA3_CHECK(it->second.shape() == dst->shape(),
                   "optimizer state '{}{}' has shape {}, parameter {}", prefix, params_[i].name,
                   shape_str(it->second.shape()), shape_str(dst->shape()));
      dst->copy_(it->second);
    }
  }
  step_ = step;
  invalidate_bf16_copies();  // the parameters were loaded beside this state
}

}  // namespace llama3::optim
