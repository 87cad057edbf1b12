// Module: a tree of named parameters and children. A parameter's full name - the path of
// child names joined by '.' - is its checkpoint key, so HF names such as
// `model.layers.3.self_attn.q_proj.weight` come from one place: the module tree.
// Parameters carry metadata (trainable, weight-decay group) rather than positions.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/core/rng.h"
#include "runtime/core/tensor.h"

namespace llama3::nn {

struct ParamInfo {
  bool trainable = true;
  bool weight_decay = true;  // false for the no-decay group (norm gains, biases)
};

struct NamedParam {
  std::string name;
  Tensor* tensor;  // owned by its module; stable while the module lives
  ParamInfo info;
};

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // All parameters below this module with their full names, in registration order.
  std::vector<NamedParam> named_parameters(const std::string& prefix = "") const;
  // Parameter by full name; throws listing a few known names when absent.
  Tensor& parameter(const std::string& full_name);
  int64_t num_parameters() const;
  // Freezes or unfreezes every parameter below this module.
  void set_trainable(bool trainable);
  // Drops all accumulated gradients.
  void zero_grad();

 protected:
  Tensor& register_parameter(const std::string& name, Tensor t, ParamInfo info = {});
  template <typename M>
  M& register_module(const std::string& name, std::unique_ptr<M> m) {
    M& ref = *m;
    children_.emplace_back(name, std::move(m));
    return ref;
  }

 private:
  struct Param {
    std::string name;
    Tensor tensor;
    ParamInfo info;
  };
  std::vector<std::unique_ptr<Param>> params_;
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> children_;
};

// Initialisers (deterministic for a seed: the same values whatever the thread count).
Tensor normal_init(const Shape& shape, double stddev, Rng& rng);

// In its scope (per thread) the initialisers give zeros, advancing the generator as if they
// had drawn: for modules whose parameters are overwritten next (a checkpoint's weights, a
// copy of another model's, a model built for its shapes), which would otherwise spend the
// draws for nothing (about 50 s of one core for a 1B model, minutes at 8B).
class SkipInitGuard {
 public:
  SkipInitGuard();
  ~SkipInitGuard();
  SkipInitGuard(const SkipInitGuard&) = delete;
  SkipInitGuard& operator=(const SkipInitGuard&) = delete;
};

}  // namespace llama3::nn
