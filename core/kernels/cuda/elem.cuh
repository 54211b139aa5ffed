// Device-side element helpers shared by the CUDA kernels: loads and stores of f32 / bf16 values as float
// (all arithmetic is fp32; bf16 is storage), and the host-side dispatch from a DType to the element type.
#pragma once

#include <cuda_bf16.h>

#include "core/check.h"
#include "core/dtype.h"

namespace q3vl::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(T{}) with T = float or __nv_bfloat16 for the tensor dtype; other dtypes are an error naming the layer.
template <class F>
decltype(auto) dispatch_float_dtype(const char* layer, DType dt, F&& f) {
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::bf16: return f(__nv_bfloat16{});
    default: Q3VL_FAIL(layer, ": unsupported dtype ", dtype_name(dt), " on the CUDA device (expected f32 or bf16)");
  }
}

}  // namespace q3vl::cuda
