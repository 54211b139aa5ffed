// Edge checks of the CUDA layers, the device twins of core/layer_checks.h: every tensor argument defined, in
// device memory, contiguous, of an accepted dtype and shape, with errors naming the layer, the argument, its
// shape and device and what was expected, before any kernel is queued.
#pragma once

#include <initializer_list>
#include <string>

#include "core/layer_checks.h"
#include "core/tensor.h"

namespace q3vl::cuda {

// Device, contiguity, dtype and shape (-1 matches any size).
inline void require_device(const char* layer, const char* name, const Tensor& t, DType dtype,
                           std::initializer_list<int64_t> shape) {
  Q3VL_CHECK(t.defined(), layer, ": ", name, " is missing");
  Q3VL_CHECK(t.device() == Device::cuda, layer, ": ", name, " ", t.str(),
             " is in host memory, but the layer runs on the CUDA device (its other tensors are there)");
  require_dtype(layer, name, t, dtype);
  require_shape(layer, name, t, shape);
  Q3VL_CHECK(t.is_contiguous(), layer, ": ", name, " ", t.str(), " is not contiguous");
}

// The activation dtypes the CUDA layers compute in: f32 (checking mode) and bf16.
inline void require_float_dtype(const char* layer, const char* name, const Tensor& t) {
  Q3VL_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16, layer, ": ", name, " has dtype ",
             dtype_name(t.dtype()), "; the CUDA layers take f32 or bf16");
}

// Parameter gradients: f32, or the weight's own dtype.
inline void require_grad_dtype(const char* layer, const char* name, const Tensor& grad, DType weight_dtype) {
  Q3VL_CHECK(grad.dtype() == DType::f32 || grad.dtype() == weight_dtype, layer, ": ", name, " has dtype ",
             dtype_name(grad.dtype()), ", expected f32",
             weight_dtype == DType::f32 ? std::string() : " or " + std::string(dtype_name(weight_dtype)));
}

// An optional parameter gradient: when defined, f32 or the weight's dtype, on the device, of `shape`.
inline void require_grad(const char* layer, const char* name, const Tensor& grad, DType weight_dtype,
                         std::initializer_list<int64_t> shape) {
  if (!grad.defined()) return;
  require_grad_dtype(layer, name, grad, weight_dtype);
  require_device(layer, name, grad, grad.dtype(), shape);
}

}  // namespace q3vl::cuda
