// Tensor: a non-owning view (data pointer, shape, strides in elements, dtype, device) over memory owned
// by an Arena or by a caller. Layers take tensors, check dtype and shape at their edge, and compute on
// contiguous data.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/check.h"
#include "core/dtype.h"

namespace q3vl {

class Arena;

constexpr int kMaxDims = 6;

struct Shape {
  std::array<int64_t, kMaxDims> dims{};
  int ndim = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> d);
  int64_t operator[](int i) const { return dims[i]; }
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  std::string str() const;  // "[2,3]"
};

class Tensor {
 public:
  Tensor() = default;
  // A contiguous view over `data`.
  Tensor(void* data, DType dtype, Shape shape, Device device = Device::cpu);

  static Tensor empty(Arena& arena, Shape shape, DType dtype);
  static Tensor zeros(Arena& arena, Shape shape, DType dtype);

  bool defined() const { return data_ != nullptr || shape_.numel() == 0; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int ndim() const { return shape_.ndim; }
  const Shape& shape() const { return shape_; }
  int64_t size(int d) const;    // negative d counts from the end
  int64_t stride(int d) const;  // in elements
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;
  void* raw() const { return data_; }
  // The typed pointer of a device tensor, for the CUDA backend's kernels (dtype checked, device memory only).
  template <class T>
  T* device_data(DType dtype) const {
    Q3VL_CHECK(dtype_ == dtype, "tensor ", str(), " accessed as ", dtype_name(dtype));
    Q3VL_CHECK(device_ == Device::cuda, "tensor ", str(), " is not in device memory");
    return static_cast<T*>(data_);
  }

  template <class T>
  T* data() const {
    Q3VL_CHECK(dtype_of<T>() == dtype_, "tensor ", str(), " accessed as ", dtype_name(dtype_of<T>()));
    Q3VL_CHECK(device_ == Device::cpu, "tensor ", str(), " is not in host memory");
    return static_cast<T*>(data_);
  }

  Tensor view(Shape shape) const;                             // same elements, new contiguous shape
  Tensor narrow(int dim, int64_t start, int64_t len) const;  // sub-range of one dimension
  Tensor operator[](int64_t i) const;                         // drops the first dimension

  std::string str() const;  // "f32[2,3]"

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
  Shape shape_;
  std::array<int64_t, kMaxDims> strides_{};
};

// fill: every element of a contiguous host tensor. copy: same dtype and shape, contiguous, between any two of
// host and device memory.
void fill(const Tensor& t, double value);
void copy(const Tensor& dst, const Tensor& src);

}  // namespace q3vl
