// The defaults of the Backend calls a captured training step uses (backend.h): host-side
// versions that synchronise, so that every backend runs the same step code; CUDA overrides
// them with kernels that read and write device memory only. Also the default of gemm_add
// (two calls; CUDA fuses them).
#include <algorithm>
#include <cmath>

#include "runtime/backend/backend.h"

namespace llama3 {

AdamWStepScalars adamw_step_scalars(const AdamWParams& p) {
  const float bc1 = 1.f - std::pow(p.beta1, float(p.step));
  const float bc2 = 1.f - std::pow(p.beta2, float(p.step));
  return {p.lr / bc1, std::sqrt(bc2), 1.f - p.lr * p.weight_decay};
}

float clip_factor(double norm, float max_norm) {
  return max_norm > 0 ? float(std::min(1.0, max_norm / (norm + 1e-6))) : 1.f;
}

void Backend::grad_clip_state(const std::vector<Tensor>& xs, const Tensor& loss, float max_norm,
                              Tensor& state) {
  LLAMA3_CHECK(
      state.dtype() == DType::f32 && state.numel() == AdamWDynamic::size && state.is_contiguous(),
      "grad_clip_state: state {} must be {} contiguous f32", state.str(),
      int64_t(AdamWDynamic::size));
  const double norm = std::sqrt(sum_squares_many(xs, {}));
  const float scale = clip_factor(norm, max_norm);
  const bool bad = !std::isfinite(norm) || (loss.defined() && !std::isfinite(loss.item()));
  std::vector<float> head = {float(norm), scale, bad ? 1.f : 0.f};
  Tensor h = state.narrow(0, 0, 3);
  copy_from_host(head.data(), head.size() * sizeof(float), h);
}

void Backend::scale_by(Tensor& x, const Tensor& s) {
  LLAMA3_CHECK(s.numel() == 1, "scale_by: s {} must have one element", s.str());
  scale(x, float(s.item()));
}

void Backend::axpy_by(const Tensor& s, const Tensor& x, Tensor& y) {
  LLAMA3_CHECK(s.numel() == 1, "axpy_by: s {} must have one element", s.str());
  axpy(float(s.item()), x, y);
}

void Backend::gemm_add(const Tensor& a, Trans ta, const Tensor& b, Trans tb, const Tensor& c,
                       Tensor& d) {
  LLAMA3_CHECK(c.dtype() == d.dtype() && c.shape() == d.shape() && c.data_ptr() != d.data_ptr(),
               "gemm_add: c {} must be distinct from d {} with its dtype and shape", c.str(),
               d.str());
  // (add takes contiguous tensors; it is element-wise, so t may be its operand and output)
  Tensor t = d.is_contiguous() ? d : Tensor::empty(d.shape(), d.dtype(), d.device());
  gemm(a, ta, b, tb, t, 1.f, 0.f);
  add(c.contiguous(), t, t);
  if (!d.is_contiguous()) d.copy_(t);
}

std::unique_ptr<DeviceGraph> Backend::capture(const std::function<void()>&) {
  fail("capture: {} does not support graph capture (CUDA graphs need a cuda device)", name());
}

}  // namespace llama3
