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
void vocab_shard_max(const Tensor& logits, Tensor& mx);
void vocab_shard_stats(const Tensor& logits, const Tensor& mx, const Tensor& targets, int64_t v0,
                       Tensor& sum_exp, Tensor& target_logit);
void vocab_shard_dlogits(Tensor& logits, const Tensor& mx, const Tensor& sum_exp,
                         const Tensor& targets, int64_t v0, float scale);
void vocab_row_loss(const Tensor& mx, const Tensor& sum_exp, const Tensor& target_logit,
                    const Tensor& targets, Tensor& loss, Tensor& valid);

}  // namespace llama3::cpu
