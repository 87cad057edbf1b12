// Tensor: a strided view (shape, strides, element offset, dtype) over reference-counted
// storage on one device. Views (view, transpose, narrow) share storage and are O(1).
// The storage-level methods here do not record autograd history; differentiable
// operations live in runtime/ops (ops::reshape, ops::linear, ...).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"

namespace llama3 {

class Allocator;
struct AutogradMeta;

enum class DeviceType : uint8_t { cpu = 0, cuda = 1 };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  static Device cpu() { return {}; }
  static Device cuda(int i = 0) { return {DeviceType::cuda, i}; }
  bool is_cpu() const { return type == DeviceType::cpu; }
  bool operator==(const Device&) const = default;
  std::string str() const;
};

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// A block of device memory. Freed through its allocator (or a custom deleter for memory
// the tensor does not own, e.g. a memory-mapped file).
struct Storage {
  void* data = nullptr;
  size_t bytes = 0;
  Device device;
  Allocator* allocator = nullptr;
  std::function<void(void*)> deleter;  // used instead of allocator when set
  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage();
};

class Tensor {
 public:
  Tensor() = default;  // undefined tensor

  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype, Device device = Device::cpu());
  // Copies host data into a new tensor of dtype_of<T>() (converted to `dtype` if given).
  template <typename T>
  static Tensor from_vector(const std::vector<T>& v, const Shape& shape,
                            Device device = Device::cpu());
  // Wraps memory the tensor does not own; `keep_alive` is released with the storage.
  static Tensor from_blob(void* data, const Shape& shape, DType dtype,
                          std::shared_ptr<void> keep_alive = nullptr);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t offset() const { return offset_; }
  int dim() const { return int(shape_.size()); }
  int64_t size(int d) const;  // d < 0 counts from the end
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device{}; }
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  void* data_ptr() const;
  template <typename T>
  T* data() const {
    LLAMA3_CHECK(dtype_of<T>() == dtype_, "tensor is {}, accessed as {}", dtype_name(dtype_),
                 dtype_name(dtype_of<T>()));
    return static_cast<T*>(data_ptr());
  }

  bool is_contiguous() const;
  bool same_storage(const Tensor& o) const { return storage_ == o.storage_; }

  // ---- storage-level views (no autograd) ----
  Tensor view(const Shape& shape) const;  // contiguous only; one dim may be -1
  Tensor transpose(int a, int b) const;
  Tensor narrow(int dim, int64_t start, int64_t length) const;
  Tensor contiguous() const;  // self if contiguous, else a packed copy

  // ---- copies and conversions (no autograd) ----
  Tensor to(DType dtype) const;
  Tensor to(Device device) const;
  Tensor clone() const;
  void copy_(const Tensor& src);  // same shape; converts dtype; any devices
  void fill_(double value);
  void zero_() { fill_(0.0); }
  template <typename T>
  std::vector<T> to_vector() const;  // converts to T on the host
  double item() const;               // single-element tensor as double

  // ---- autograd ----
  bool requires_grad() const;
  Tensor& set_requires_grad(bool value);
  Tensor grad() const;            // accumulated gradient of a leaf (undefined if none)
  void set_grad(const Tensor& g);
  void zero_grad();               // drops the accumulated gradient
  // Backpropagates from this tensor. grad defaults to ones (for scalars).
  void backward() const;
  void backward(const Tensor& grad) const;
  Tensor detach() const;  // same storage, no autograd history
  const std::shared_ptr<AutogradMeta>& meta() const { return meta_; }
  std::shared_ptr<AutogradMeta>& mutable_meta() { return meta_; }

  std::string str() const;  // "f32[2, 3] cpu"

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_, strides_;
  int64_t offset_ = 0;
  DType dtype_ = DType::f32;
  std::shared_ptr<AutogradMeta> meta_;
};

Shape contiguous_strides(const Shape& shape);

}  // namespace llama3
