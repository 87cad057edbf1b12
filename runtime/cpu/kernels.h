// CPU kernels too large to live inline in cpu_backend.cpp; see backend.h for contracts.
#pragma once

#include "runtime/backend/backend.h"

namespace llama3::cpu {

void gemm(const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, float alpha,
          float beta);
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionParams& p,
                       Tensor& out, Tensor& lse);
void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const AttentionParams& p, Tensor& dq,
                        Tensor& dk, Tensor& dv);
double linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                            int64_t chunk, float grad_scale, Tensor* dh, Tensor* dw);

}  // namespace llama3::cpu
