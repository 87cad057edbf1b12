#include "runtime/core/tensor.h"

#include <fmt/format.h>

#include <numeric>

#include "runtime/autograd/autograd.h"
#include "runtime/backend/backend.h"
#include "runtime/core/allocator.h"

namespace llama3 {

std::string Device::str() const {
  return type == DeviceType::cpu ? "cpu" : fmt::format("cuda:{}", index);
}

std::string shape_str(const Shape& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t s = 1;
  for (int i = int(shape.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

Storage::~Storage() {
  if (deleter)
    deleter(data);
  else if (allocator)
    allocator->deallocate(data, bytes);
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) LLAMA3_CHECK(d >= 0, "negative dimension in shape {}", shape_str(shape));
  Tensor t;
  auto st = std::make_shared<Storage>();
  st->bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  st->device = device;
  st->allocator = &backend_for(device).allocator();
  st->data = st->allocator->allocate(st->bytes);
  t.storage_ = std::move(st);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  return full(shape, 0.0, dtype, device);
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}

Tensor Tensor::from_blob(void* data, const Shape& shape, DType dtype,
                         std::shared_ptr<void> keep_alive) {
  Tensor t;
  auto st = std::make_shared<Storage>();
  st->data = data;
  st->bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  st->deleter = [k = std::move(keep_alive)](void*) mutable { k.reset(); };
  t.storage_ = std::move(st);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& v, const Shape& shape, Device device) {
  LLAMA3_CHECK(int64_t(v.size()) == shape_numel(shape), "from_vector: {} values for shape {}",
               v.size(), shape_str(shape));
  Tensor t = empty(shape, dtype_of<T>(), device);
  backend_for(device).copy_from_host(v.data(), v.size() * sizeof(T), t);
  return t;
}
template Tensor Tensor::from_vector(const std::vector<float>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<double>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<int32_t>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<int64_t>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<uint8_t>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<bf16>&, const Shape&, Device);

int64_t Tensor::size(int d) const {
  int n = dim();
  if (d < 0) d += n;
  LLAMA3_CHECK(d >= 0 && d < n, "dimension {} out of range for shape {}", d, shape_str(shape_));
  return shape_[d];
}

void* Tensor::data_ptr() const {
  LLAMA3_CHECK(defined(), "data of an undefined tensor");
  return static_cast<char*>(storage_->data) + offset_ * int64_t(dtype_size(dtype_));
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_) || numel() <= 1; }

Tensor Tensor::view(const Shape& shape) const {
  LLAMA3_CHECK(is_contiguous(), "view of a non-contiguous tensor {}", str());
  Shape s = shape;
  int64_t known = 1;
  int infer = -1;
  for (int i = 0; i < int(s.size()); ++i) {
    if (s[i] == -1) {
      LLAMA3_CHECK(infer < 0, "view: more than one -1 in {}", shape_str(shape));
      infer = i;
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    LLAMA3_CHECK(known > 0 && numel() % known == 0, "view: cannot infer {} from {}",
                 shape_str(shape), shape_str(shape_));
    s[infer] = numel() / known;
  }
  LLAMA3_CHECK(shape_numel(s) == numel(), "view: shape {} has {} elements, tensor {} has {}",
               shape_str(s), shape_numel(s), shape_str(shape_), numel());
  Tensor t = detach();
  t.shape_ = s;
  t.strides_ = contiguous_strides(s);
  return t;
}

Tensor Tensor::transpose(int a, int b) const {
  int n = dim();
  if (a < 0) a += n;
  if (b < 0) b += n;
  LLAMA3_CHECK(a >= 0 && a < n && b >= 0 && b < n, "transpose({}, {}) of {}", a, b, str());
  Tensor t = detach();
  std::swap(t.shape_[a], t.shape_[b]);
  std::swap(t.strides_[a], t.strides_[b]);
  return t;
}

Tensor Tensor::narrow(int d, int64_t start, int64_t length) const {
  int n = dim();
  if (d < 0) d += n;
  LLAMA3_CHECK(d >= 0 && d < n && start >= 0 && length >= 0 && start + length <= shape_[d],
               "narrow(dim {}, start {}, length {}) of {}", d, start, length, str());
  Tensor t = detach();
  t.shape_[d] = length;
  t.offset_ += start * strides_[d];
  return t;
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  Tensor t = empty(shape_, dtype_, device());
  t.copy_(*this);
  return t;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return *this;
  Tensor t = empty(shape_, dtype, device());
  t.copy_(*this);
  return t;
}

Tensor Tensor::to(Device d) const {
  if (d == device()) return *this;
  Tensor src = contiguous();
  Tensor t = empty(shape_, dtype_, d);
  if (d.is_cpu()) {
    backend_for(src.device()).copy_to_host(src, t.data_ptr(), t.nbytes());
  } else {
    LLAMA3_CHECK(src.device().is_cpu(), "copy {} -> {} must go through the host",
                 src.device().str(), d.str());
    backend_for(d).copy_from_host(src.data_ptr(), src.nbytes(), t);
  }
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device());
  t.copy_(*this);
  return t;
}

void Tensor::copy_(const Tensor& src) {
  LLAMA3_CHECK(src.shape_ == shape_, "copy_: shape {} into {}", shape_str(src.shape_),
               shape_str(shape_));
  if (src.device() == device()) {
    backend_for(device()).copy(src, *this);
    return;
  }
  Tensor moved = src.to(device());
  backend_for(device()).copy(moved, *this);
}

void Tensor::fill_(double value) { backend_for(device()).fill(*this, value); }

template <typename T>
std::vector<T> Tensor::to_vector() const {
  Tensor host = to(Device::cpu()).to(dtype_of<T>()).contiguous();
  const T* p = host.data<T>();
  return std::vector<T>(p, p + host.numel());
}
template std::vector<float> Tensor::to_vector() const;
template std::vector<double> Tensor::to_vector() const;
template std::vector<int32_t> Tensor::to_vector() const;
template std::vector<int64_t> Tensor::to_vector() const;
template std::vector<uint8_t> Tensor::to_vector() const;

double Tensor::item() const {
  LLAMA3_CHECK(numel() == 1, "item() of a tensor with {} elements", numel());
  return to_vector<double>()[0];
}

bool Tensor::requires_grad() const { return meta_ && meta_->requires_grad; }

Tensor& Tensor::set_requires_grad(bool value) {
  if (!meta_) meta_ = std::make_shared<AutogradMeta>();
  LLAMA3_CHECK(!value || is_floating(dtype_), "requires_grad on a {} tensor", dtype_name(dtype_));
  meta_->requires_grad = value;
  return *this;
}

Tensor Tensor::grad() const { return meta_ ? meta_->grad : Tensor(); }

void Tensor::set_grad(const Tensor& g) {
  if (!meta_) meta_ = std::make_shared<AutogradMeta>();
  meta_->grad = g;
}

void Tensor::zero_grad() {
  if (meta_) meta_->grad = Tensor();
}

void Tensor::backward() const { autograd::backward(*this, Tensor()); }
void Tensor::backward(const Tensor& grad) const { autograd::backward(*this, grad); }

Tensor Tensor::detach() const {
  Tensor t = *this;
  t.meta_.reset();
  return t;
}

std::string Tensor::str() const {
  if (!defined()) return "undefined";
  return fmt::format("{}{} {}", dtype_name(dtype_), shape_str(shape_), device().str());
}

}  // namespace llama3
