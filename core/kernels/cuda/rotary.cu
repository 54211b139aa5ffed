// Rotary (rotate_half) forward and backward on the device: one thread per (row, pair vector, head group),
// reading each pair before writing it, so y may alias x as on the CPU. x/y are f32 or bf16; the cos/sin tables
// [N, D] are accepted in x's dtype or in f32 (the more accurate choice for bf16 activations: the tables are
// made on the host in f32 and uploaded per batch).
#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/layers_impl.h"
#include "core/kernels/cuda/reductions.cuh"

#include <type_traits>

namespace q3vl::cuda {

namespace {

//   forward:  y[j] = a cos[j] - b sin[j],          y[j + D/2] = b cos[j + D/2] + a sin[j + D/2]
//   backward: y[j] = a cos[j] + b sin[j + D/2],    y[j + D/2] = b cos[j + D/2] - a sin[j]
// with (a, b) = (x[j], x[j + D/2]) — the CPU's formulas (rotary.cpp).
//
// A thread owns V pairs (j .. j + V, and D/2 further) of one token for kHeadsPerThread heads: it reads the
// token's cos/sin there once and applies them to each head. V = kVec<T> (16-byte accesses) when the pointers
// are aligned and V divides D/2, else 1. Consecutive threads take consecutive pair vectors, then head groups.
constexpr int kHeadsPerThread = 4;

template <class T, class C, int V, bool kTranspose>
__global__ void rotary_kernel(const T* x, const C* cos, const C* sin, int64_t n, int64_t heads, int64_t d, T* y) {
  const int64_t half = d / 2, per_head = half / V, groups = (heads + kHeadsPerThread - 1) / kHeadsPerThread;
  const int64_t total = n * groups * per_head;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = (k % per_head) * V, group = (k / per_head) % groups, i = k / (per_head * groups);
    float c0[V], c1[V], s0[V], s1[V];  // cos, sin at j and j + D/2
    load_floats<V>(cos + i * d + j, c0);
    load_floats<V>(cos + i * d + j + half, c1);
    load_floats<V>(sin + i * d + j, s0);
    load_floats<V>(sin + i * d + j + half, s1);
#pragma unroll
    for (int q = 0; q < kHeadsPerThread; ++q) {
      const int64_t h = group * kHeadsPerThread + q;
      if (h >= heads) break;
      const int64_t base = (i * heads + h) * d + j;
      float a[V], b[V], ya[V], yb[V];
      load_floats<V>(x + base, a);
      load_floats<V>(x + base + half, b);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if constexpr (!kTranspose) {
          ya[e] = a[e] * c0[e] - b[e] * s0[e];
          yb[e] = b[e] * c1[e] + a[e] * s1[e];
        } else {
          ya[e] = a[e] * c0[e] + b[e] * s1[e];
          yb[e] = b[e] * c1[e] - a[e] * s0[e];
        }
      }
      store_floats<V>(y + base, ya);
      store_floats<V>(y + base + half, yb);
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
  if (n * heads * (d / 2) == 0) return;
  dispatch_float_dtype(layer, dt, [&](auto t) {
    using T = decltype(t);
    dispatch_float_dtype(layer, ct, [&](auto c) {
      using C = decltype(c);
      const T* xp = static_cast<const T*>(x.raw());
      const C *cp = static_cast<const C*>(cos.raw()), *sp = static_cast<const C*>(sin.raw());
      T* yp = static_cast<T*>(y.raw());
      auto launch = [&](auto v) {
        constexpr int V = decltype(v)::value;
        const int64_t threads = n * ((heads + kHeadsPerThread - 1) / kHeadsPerThread) * (d / 2 / V);
        if (transpose)
          rotary_kernel<T, C, V, true><<<blocks_for(threads), kThreads, 0, context().stream>>>(xp, cp, sp, n, heads,
                                                                                             d, yp);
        else
          rotary_kernel<T, C, V, false><<<blocks_for(threads), kThreads, 0, context().stream>>>(xp, cp, sp, n,
                                                                                              heads, d, yp);
        Q3VL_CUDA_LAUNCHED("rotary_kernel");
      };
      if ((d / 2) % kVec<T> == 0 && aligned16({xp, cp, sp, yp}))
        launch(std::integral_constant<int, kVec<T>>{});
      else
        launch(std::integral_constant<int, 1>{});
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
