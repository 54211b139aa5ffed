// Rotary (rotate_half) forward and backward on the device: one thread per (row, head, pair (j, j + D/2)),
// reading the pair before writing it, so y may alias x as on the CPU. x/y are f32 or bf16; the cos/sin tables
// [N, D] are accepted in x's dtype or in f32 (the more accurate choice for bf16 activations: the tables are
// made on the host in f32 and uploaded per batch).
#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/layers_impl.h"

namespace q3vl::cuda {

namespace {

//   forward:  y[j] = a cos[j] - b sin[j],          y[j + D/2] = b cos[j + D/2] + a sin[j + D/2]
//   backward: y[j] = a cos[j] + b sin[j + D/2],    y[j + D/2] = b cos[j + D/2] - a sin[j]
// with (a, b) = (x[j], x[j + D/2]) — the CPU's formulas (rotary.cpp).
template <class T, class C, bool kTranspose>
__global__ void rotary_kernel(const T* x, const C* cos, const C* sin, int64_t n, int64_t heads, int64_t d, T* y) {
  const int64_t half = d / 2, total = n * heads * half;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = k % half, row_head = k / half, i = row_head / heads;
    const T* xr = x + row_head * d;
    T* yr = y + row_head * d;
    const C* c = cos + i * d;
    const C* s = sin + i * d;
    const float a = to_float(xr[j]), b = to_float(xr[j + half]);
    if constexpr (!kTranspose) {
      yr[j] = from_float<T>(a * to_float(c[j]) - b * to_float(s[j]));
      yr[j + half] = from_float<T>(b * to_float(c[j + half]) + a * to_float(s[j + half]));
    } else {
      yr[j] = from_float<T>(a * to_float(c[j]) + b * to_float(s[j + half]));
      yr[j + half] = from_float<T>(b * to_float(c[j + half]) - a * to_float(s[j]));
    }
  }
}

void rotate(const char* layer, const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& y,
            bool transpose) {
  const char* xn = transpose ? "dy" : "x";
  require_float_dtype(layer, xn, x);
  const DType dt = x.dtype();
  require_device(layer, xn, x, dt, {-1, -1, -1});
  const int64_t n = x.size(0), heads = x.size(1), d = x.size(2);
  Q3VL_CHECK(d % 2 == 0, layer, ": head_dim must be even, got ", d);
  Q3VL_CHECK(cos.defined() && (cos.dtype() == dt || cos.dtype() == DType::f32), layer, ": cos has dtype ",
             dtype_name(cos.dtype()), dt == DType::f32 ? ", expected f32" : ", expected f32 or bf16");
  const DType ct = cos.dtype();
  require_device(layer, "cos", cos, ct, {n, d});
  require_device(layer, "sin", sin, ct, {n, d});
  require_device(layer, transpose ? "dx" : "y", y, dt, {n, heads, d});
  const int64_t total = n * heads * (d / 2);
  if (total == 0) return;
  dispatch_float_dtype(layer, dt, [&](auto t) {
    using T = decltype(t);
    dispatch_float_dtype(layer, ct, [&](auto c) {
      using C = decltype(c);
      const T* xp = static_cast<const T*>(x.raw());
      const C *cp = static_cast<const C*>(cos.raw()), *sp = static_cast<const C*>(sin.raw());
      T* yp = static_cast<T*>(y.raw());
      if (transpose)
        rotary_kernel<T, C, true><<<blocks_for(total), kThreads, 0, context().stream>>>(xp, cp, sp, n, heads, d, yp);
      else
        rotary_kernel<T, C, false><<<blocks_for(total), kThreads, 0, context().stream>>>(xp, cp, sp, n, heads, d, yp);
      Q3VL_CUDA_LAUNCHED("rotary_kernel");
    });
  });
}

}  // namespace

void CudaLayersImpl::rotary_forward(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& y) const {
  rotate("rotary_forward", x, cos, sin, y, false);
}

void CudaLayersImpl::rotary_backward(const Tensor& dy, const Tensor& cos, const Tensor& sin, const Tensor& dx) const {
  rotate("rotary_backward", dy, cos, sin, dx, true);
}

}  // namespace q3vl::cuda
