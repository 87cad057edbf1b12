// The default of Backend::rmsnorm_backward_parts (backend.h): the parts summed into one f32
// gradient (in their order), then the plain backward.
#include "runtime/backend/backend.h"

namespace llama3 {

void Backend::rmsnorm_backward_parts(const std::vector<Tensor>& dys, const Tensor& x,
                                     const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                                     bool accumulate_dx, Tensor* dx_bf16) {
  LLAMA3_CHECK(!dys.empty() && dys.size() <= 4,
               "rmsnorm_backward_parts: {} gradient parts (1 to 4)", dys.size());
  Tensor dy = Tensor::empty(x.shape(), x.dtype(), x.device());
  copy(dys[0], dy);
  for (size_t i = 1; i < dys.size(); ++i) {
    Tensor p = dys[i];
    if (p.dtype() != x.dtype() || !p.is_contiguous()) {
      Tensor c = Tensor::empty(x.shape(), x.dtype(), x.device());
      copy(p, c);
      p = c;
    }
    axpy(1.f, p, dy);
  }
  if (dx_bf16)
    rmsnorm_backward_bf16(dy, x, w, rstd, dx, dw, accumulate_dx, *dx_bf16);
  else
    rmsnorm_backward(dy, x, w, rstd, dx, dw, accumulate_dx);
}

}  // namespace llama3
