#include "runtime/nn/layers.h"

namespace llama3::nn {

Linear::Linear(int64_t in, int64_t out, double init_std, Rng& rng)
    : weight(register_parameter("weight", normal_init({out, in}, init_std, rng))) {}

Embedding::Embedding(int64_t vocab, int64_t dim, double init_std, Rng& rng)
    : weight(register_parameter("weight", normal_init({vocab, dim}, init_std, rng))) {}

RMSNorm::RMSNorm(int64_t dim, float eps_)
    : weight(register_parameter("weight", Tensor::full({dim}, 1.0, DType::f32),
                                ParamInfo{.trainable = true, .weight_decay = false})),
      eps(eps_) {}

}  // namespace llama3::nn
