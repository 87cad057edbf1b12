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

Tensor normal_init(const Shape& shape, double stddev, Rng& rng) {
  std::vector<float> v(shape_numel(shape));
  for (auto& x : v) x = float(rng.normal() * stddev);
  return Tensor::from_vector(v, shape);
}

}  // namespace llama3::nn
