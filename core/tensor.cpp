// Tensor views: shape arithmetic, sub-views and element-wise fill/copy.
#include "core/tensor.h"

#include <cstring>
#include <sstream>

#include "core/arena.h"
#include "core/device.h"

namespace q3vl {

Shape::Shape(std::initializer_list<int64_t> d) {
  Q3VL_CHECK(d.size() <= kMaxDims, "shape with ", d.size(), " dims exceeds ", kMaxDims);
  for (int64_t v : d) dims[ndim++] = v;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= dims[i];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (ndim != o.ndim) return false;
  for (int i = 0; i < ndim; ++i)
    if (dims[i] != o.dims[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? "," : "") << dims[i];
  os << "]";
  return os.str();
}

Tensor::Tensor(void* data, DType dtype, Shape shape, Device device)
    : data_(data), dtype_(dtype), device_(device), shape_(shape) {
  int64_t s = 1;
  for (int i = shape_.ndim - 1; i >= 0; --i) {
    Q3VL_CHECK(shape_.dims[i] >= 0, "negative dimension in shape ", shape_.str());
    strides_[i] = s;
    s *= shape_.dims[i];
  }
}

Tensor Tensor::empty(Arena& arena, Shape shape, DType dtype) {
  const size_t bytes = static_cast<size_t>(shape.numel()) * dtype_size(dtype);
  return Tensor(arena.allocate(bytes), dtype, shape, arena.device());
}

Tensor Tensor::zeros(Arena& arena, Shape shape, DType dtype) {
  Tensor t = empty(arena, shape, dtype);
  if (t.device() == Device::cuda)
    device_zero(t.raw(), t.nbytes());
  else
    std::memset(t.raw(), 0, t.nbytes());
  return t;
}

int64_t Tensor::size(int d) const {
  const int i = d < 0 ? d + shape_.ndim : d;
  Q3VL_CHECK(i >= 0 && i < shape_.ndim, "dimension ", d, " out of range for ", str());
  return shape_.dims[i];
}

int64_t Tensor::stride(int d) const {
  const int i = d < 0 ? d + shape_.ndim : d;
  Q3VL_CHECK(i >= 0 && i < shape_.ndim, "dimension ", d, " out of range for ", str());
  return strides_[i];
}

bool Tensor::is_contiguous() const {
  int64_t s = 1;
  for (int i = shape_.ndim - 1; i >= 0; --i) {
    if (shape_.dims[i] != 1 && strides_[i] != s) return false;
    s *= shape_.dims[i];
  }
  return true;
}

Tensor Tensor::view(Shape shape) const {
  Q3VL_CHECK(is_contiguous(), "view of non-contiguous tensor ", str());
  Q3VL_CHECK(shape.numel() == numel(), "view of ", str(), " as ", shape.str(), " changes the element count");
  return Tensor(data_, dtype_, shape, device_);
}

Tensor Tensor::narrow(int dim, int64_t start, int64_t len) const {
  const int d = dim < 0 ? dim + shape_.ndim : dim;
  Q3VL_CHECK(d >= 0 && d < shape_.ndim, "narrow: dimension ", dim, " out of range for ", str());
  Q3VL_CHECK(start >= 0 && len >= 0 && start + len <= shape_.dims[d], "narrow: range [", start, ",",
             start + len, ") out of bounds for dimension ", d, " of ", str());
  Tensor t = *this;
  t.shape_.dims[d] = len;
  t.data_ = static_cast<char*>(data_) + start * strides_[d] * static_cast<int64_t>(dtype_size(dtype_));
  return t;
}

Tensor Tensor::operator[](int64_t i) const {
  Q3VL_CHECK(shape_.ndim >= 1, "indexing a 0-d tensor");
  Tensor t = narrow(0, i, 1);
  for (int k = 1; k < shape_.ndim; ++k) {
    t.shape_.dims[k - 1] = shape_.dims[k];
    t.strides_[k - 1] = strides_[k];
  }
  t.shape_.ndim = shape_.ndim - 1;
  return t;
}

std::string Tensor::str() const {
  std::string s = std::string(dtype_name(dtype_)) + shape_.str();
  if (device_ != Device::cpu) s += "@" + std::string(device_name(device_));
  return s;
}

void fill(const Tensor& t, double value) {
  Q3VL_CHECK(t.is_contiguous(), "fill: tensor ", t.str(), " is not contiguous");
  Q3VL_CHECK(t.device() == Device::cpu, "fill: tensor ", t.str(), " is not in host memory (fill a host tensor and copy it)");
  const int64_t n = t.numel();
  switch (t.dtype()) {
    case DType::f32: { float* p = t.data<float>(); for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(value); break; }
    case DType::f64: { double* p = t.data<double>(); for (int64_t i = 0; i < n; ++i) p[i] = value; break; }
    case DType::i32: { int32_t* p = t.data<int32_t>(); for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int32_t>(value); break; }
    case DType::i64: { int64_t* p = t.data<int64_t>(); for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int64_t>(value); break; }
    default: Q3VL_FAIL("fill: unsupported dtype for ", t.str());
  }
}

void copy(const Tensor& dst, const Tensor& src) {
  Q3VL_CHECK(dst.dtype() == src.dtype() && dst.shape() == src.shape(), "copy: ", src.str(), " into ", dst.str());
  Q3VL_CHECK(dst.is_contiguous() && src.is_contiguous(), "copy: non-contiguous ", src.str(), " -> ", dst.str());
  if (dst.nbytes() == 0) return;
  if (dst.device() == Device::cpu && src.device() == Device::cpu)
    std::memcpy(dst.raw(), src.raw(), dst.nbytes());
  else
    copy_bytes(dst.raw(), dst.device(), src.raw(), src.device(), dst.nbytes());
}

}  // namespace q3vl
