#include "runtime/nn/module.h"

#include <fmt/format.h>

namespace llama3::nn {

std::vector<NamedParam> Module::named_parameters(const std::string& prefix) const {
  std::vector<NamedParam> out;
  for (const auto& p : params_)
    out.push_back({prefix.empty() ? p->name : prefix + "." + p->name, &p->tensor, p->info});
  for (const auto& [name, child] : children_) {
    auto sub = child->named_parameters(prefix.empty() ? name : prefix + "." + name);
    out.insert(out.end(), sub.begin(), sub.end());
  }
  return out;
}

Tensor& Module::parameter(const std::string& full_name) {
  auto all = named_parameters();
  for (auto& p : all)
    if (p.name == full_name) return *p.tensor;
  std::string some;
  for (size_t i = 0; i < all.size() && i < 5; ++i) some += (i ? ", " : "") + all[i].name;
  fail("no parameter named '{}' (the module has {} parameters, e.g. {})", full_name, all.size(),
       some);
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (auto& p : named_parameters()) n += p.tensor->numel();
  return n;
}

void Module::set_trainable(bool trainable) {
  for (auto& p : params_) {
    p->info.trainable = trainable;
    p->tensor.set_requires_grad(trainable);
  }
  for (auto& [n, c] : children_) c->set_trainable(trainable);
}

void Module::zero_grad() {
  for (auto& p : named_parameters()) p.tensor->zero_grad();
}

Tensor& Module::register_parameter(const std::string& name, Tensor t, ParamInfo info) {
  for (auto& p : params_)
    LLAMA3_CHECK(p->name != name, "parameter '{}' registered twice", name);
  t.set_requires_grad(info.trainable);
  params_.push_back(std::make_unique<Param>(Param{name, std::move(t), info}));
  return params_.back()->tensor;
}

namespace {
thread_local int t_skip_init = 0;
}  // namespace

SkipInitGuard::SkipInitGuard() {
  ++t_skip_init;
}
SkipInitGuard::~SkipInitGuard() {
  --t_skip_init;
}

Tensor normal_init(const Shape& shape, double stddev, Rng& rng) {
  const int64_t n = shape_numel(shape);
  // Value i is the normal() drawn with the counter at c0 + 2i (each normal() takes two
  // uniforms) and the counter ends at c0 + 2n: the serial loop's values and state, computed
  // by all threads (a 1B model's 1.5 billion values took about 50 s on one core).
  const uint64_t seed = rng.seed(), c0 = rng.counter();
  rng = Rng(seed, c0 + 2 * uint64_t(n));
  if (t_skip_init > 0) return Tensor::zeros(shape, DType::f32);
  Tensor t = Tensor::empty(shape, DType::f32);
  float* p = t.data<float>();
#pragma omp parallel for schedule(static) if (n >= (int64_t(1) << 16))
  for (int64_t i = 0; i < n; ++i) {
    Rng r(seed, c0 + 2 * uint64_t(i));
    p[i] = float(r.normal() * stddev);
  }
  return t;
}

}  // namespace llama3::nn
