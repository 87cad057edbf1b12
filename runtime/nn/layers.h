// Basic layers shared by every model: Linear (no bias, HF `weight` of shape (out, in)),
// Embedding and RMSNorm. Each is a Module so its parameter names follow the tree.
#pragma once

#include <functional>

#include "runtime/nn/module.h"
#include "runtime/ops/ops.h"

namespace llama3::nn {

class Linear : public Module {
 public:
  Linear(int64_t in, int64_t out, double init_std, Rng& rng);
  Tensor operator()(const Tensor& x, ops::Precision p = ops::Precision::f32, bool bf16_out = false,
                    bool f32_grad = false) const {
    Tensor y = ops::linear(input_hook ? input_hook(x) : x, weight, p, bf16_out, f32_grad, dx_hook,
                           out_hook);
    return output_hook ? output_hook(y) : y;
  }
  // residual + this layer's output: the add done by the GEMM (ops::linear_residual), unless
  // an output_hook or out_hook stands between the projection and the add (a tensor-parallel
  // layer's all-reduce of its partial output must come first): then a separate ops::add.
  Tensor plus(const Tensor& x, const Tensor& residual,
              ops::Precision p = ops::Precision::f32) const {
    if (output_hook || out_hook) return ops::add(residual, (*this)(x, p));
    return ops::linear_residual(input_hook ? input_hook(x) : x, weight, residual, p, dx_hook);
  }
  Tensor& weight;  // (out, in)
  // Optional differentiable transforms of the input and output (unset: identity). A
  // parallelize step uses them to insert communication (tensor parallelism) without the
  // model knowing; the layer itself attaches no meaning to them.
  std::function<Tensor(const Tensor&)> input_hook, output_hook;
  // Optional operation on the input gradient, started in the backward before the weight
  // gradient is computed and completed after it (ops::linear's dx_hook): the parallelize
  // step's asynchronous tp all-reduce of a column-parallel layer's input gradient.
  ops::DxHook dx_hook;
  // Optional operation on slices of the output rows, started as each slice of the forward GEMM
  // is computed and completed before the layer returns (ops::linear's out_hook): the
  // parallelize step's chunked tp all-reduce of a row-parallel layer's partial output.
  ops::OutHook out_hook;
};

class Embedding : public Module {
 public:
  Embedding(int64_t vocab, int64_t dim, double init_std, Rng& rng);
  Tensor operator()(const Tensor& ids) const { return ops::embedding(weight, ids); }
  Tensor& weight;  // (vocab, dim)
};

class RMSNorm : public Module {
 public:
  RMSNorm(int64_t dim, float eps);
  Tensor operator()(const Tensor& x, bool bf16_out = false) const {
    return ops::rmsnorm(x, weight, eps, bf16_out);
  }
  Tensor& weight;  // (dim), in the no-decay group
  float eps;
};

}  // namespace llama3::nn
