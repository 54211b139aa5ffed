// Edge checks every layer runs before any kernel: dtype, shape and contiguity of each tensor argument,
// with errors naming the layer, the argument and both shapes. Also the float-type dispatch (f32 for
// training, f64 for finite-difference tests).
#pragma once

#include <initializer_list>
#include <string>

#include "core/tensor.h"

namespace q3vl {

// -1 in `expected` matches any size.
void require_shape(const char* layer, const char* name, const Tensor& t, std::initializer_list<int64_t> expected);
void require_dtype(const char* layer, const char* name, const Tensor& t, DType dtype);
// Shape check plus dtype equal to `dtype` plus contiguous host memory: the usual argument contract.
void require(const char* layer, const char* name, const Tensor& t, DType dtype, std::initializer_list<int64_t> expected);
// `require` for a composite layer's tensor, which lives where its input lives: host memory (exactly `require`)
// or the CUDA device, where the composite calls the device layers unchanged.
void require_on(Device device, const char* layer, const char* name, const Tensor& t, DType dtype,
                std::initializer_list<int64_t> expected);

template <class F>
decltype(auto) dispatch_float(const char* layer, DType dt, F&& f) {
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    default: Q3VL_FAIL(layer, ": unsupported dtype ", dtype_name(dt), " (expected f32 or f64)");
  }
}

}  // namespace q3vl
