// GELU (tanh and erf) and SwiGLU on the device, forward and backward: element-wise grid-stride kernels in fp32
// with the CPU's formulas (f32 or bf16 storage), 16-byte accesses where the alignment allows. Each thread reads an element before writing the same index,
// so outputs may alias inputs as on the CPU (y = x for GELU, dx = dy for its backward).
#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/layers_impl.h"
#include "core/kernels/cuda/reductions.cuh"

#include <type_traits>

namespace q3vl::cuda {

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;  // 1/sqrt(2 pi)
constexpr float kTanhCubic = 0.044715f;

__device__ float gelu_value(bool erf_kind, float x) {
  if (erf_kind) return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kTanhCubic * x * x * x)));
}

__device__ float gelu_grad(bool erf_kind, float x) {
  if (erf_kind) {
    const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
    const float pdf = expf(-0.5f * x * x) * kInvSqrt2Pi;
    return cdf + x * pdf;
  }
  const float t = tanhf(kSqrt2OverPi * (x + kTanhCubic * x * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x * x);
}

__device__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The kernels take V elements per access (vector i covers elements [i V, i V + V)): V = kVec<T>, 16-byte
// accesses, when the pointers are aligned and V divides the row; else V = 1.
template <class T, int V>
__global__ void gelu_forward_kernel(bool erf_kind, const T* x, int64_t nvec, T* y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[V];
    load_floats<V>(x + i * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = gelu_value(erf_kind, v[k]);
    store_floats<V>(y + i * V, v);
  }
}

template <class T, int V>
__global__ void gelu_backward_kernel(bool erf_kind, const T* x, const T* dy, int64_t nvec, T* dx) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[V], g[V];
    load_floats<V>(x + i * V, v);
    load_floats<V>(dy + i * V, g);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = g[k] * gelu_grad(erf_kind, v[k]);
    store_floats<V>(dx + i * V, g);
  }
}

// Vector k of the [N, I] output: row k / (I / V), gate columns from V (k % (I / V)), up columns I further, of [N, 2I].
template <class T, int V>
__global__ void swiglu_forward_kernel(const T* gate_up, int64_t n, int64_t inter, T* y) {
  const int64_t per_row = inter / V, total = n * per_row;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k / per_row, j = (k % per_row) * V;
    float g[V], u[V];
    load_floats<V>(gate_up + i * 2 * inter + j, g);
    load_floats<V>(gate_up + i * 2 * inter + inter + j, u);
#pragma unroll
    for (int q = 0; q < V; ++q) u[q] = g[q] * sigmoid(g[q]) * u[q];
    store_floats<V>(y + k * V, u);
  }
}

template <class T, int V>
__global__ void swiglu_backward_kernel(const T* gate_up, const T* dy, int64_t n, int64_t inter, T* dgate_up) {
  const int64_t per_row = inter / V, total = n * per_row;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k / per_row, j = (k % per_row) * V;
    const int64_t gi = i * 2 * inter + j, ui = gi + inter;
    float g[V], u[V], d[V], dg[V], du[V];
    load_floats<V>(gate_up + gi, g);
    load_floats<V>(gate_up + ui, u);
    load_floats<V>(dy + k * V, d);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const float s = sigmoid(g[q]);
      du[q] = d[q] * g[q] * s;
      dg[q] = d[q] * u[q] * s * (1.0f + g[q] * (1.0f - s));
    }
    store_floats<V>(dgate_up + ui, du);
    store_floats<V>(dgate_up + gi, dg);
  }
}

// Calls f(integral_constant V): kVec<T> when `vectorised`, else 1.
template <class T, class F>
void with_vec(bool vectorised, F&& f) {
  if (vectorised)
    f(std::integral_constant<int, kVec<T>>{});
  else
    f(std::integral_constant<int, 1>{});
}

// Same dtype and shape as `like`, in device memory, contiguous (element-wise layers take any shape).
void require_like(const char* layer, const char* name, const Tensor& t, const Tensor& like) {
  Q3VL_CHECK(t.defined(), layer, ": ", name, " is missing");
  Q3VL_CHECK(t.device() == Device::cuda, layer, ": ", name, " ", t.str(),
             " is in host memory, but the layer runs on the CUDA device (its other tensors are there)");
  Q3VL_CHECK(t.dtype() == like.dtype() && t.shape() == like.shape(), layer, ": ", name, " is ", t.str(),
             ", expected ", like.str());
  Q3VL_CHECK(t.is_contiguous(), layer, ": ", name, " ", t.str(), " is not contiguous");
}

// gate_up [N, 2I] on the device; returns I.
int64_t swiglu_inter(const char* layer, const Tensor& gate_up) {
  require_float_dtype(layer, "gate_up", gate_up);
  require_device(layer, "gate_up", gate_up, gate_up.dtype(), {-1, -1});
  Q3VL_CHECK(gate_up.size(1) % 2 == 0, layer, ": gate_up has shape ", gate_up.shape().str(),
             ", expected an even last dimension [gate | up]");
  return gate_up.size(1) / 2;
}

}  // namespace

void CudaLayersImpl::gelu_forward(Gelu kind, const Tensor& x, const Tensor& y) const {
  const char* L = "gelu_forward";
  require_float_dtype(L, "x", x);
  require_like(L, "x", x, x);
  require_like(L, "y", y, x);
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float_dtype(L, x.dtype(), [&](auto t) {
    using T = decltype(t);
    with_vec<T>(n % kVec<T> == 0 && aligned16({x.raw(), y.raw()}), [&](auto v) {
      constexpr int V = decltype(v)::value;
      gelu_forward_kernel<T, V><<<blocks_for(n / V), kThreads, 0, context().stream>>>(
          kind == Gelu::erf, static_cast<const T*>(x.raw()), n / V, static_cast<T*>(y.raw()));
      Q3VL_CUDA_LAUNCHED("gelu_forward_kernel");
    });
  });
}

void CudaLayersImpl::gelu_backward(Gelu kind, const Tensor& x, const Tensor& dy, const Tensor& dx) const {
  const char* L = "gelu_backward";
  require_float_dtype(L, "x", x);
  require_like(L, "x", x, x);
  require_like(L, "dy", dy, x);
  require_like(L, "dx", dx, x);
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float_dtype(L, x.dtype(), [&](auto t) {
    using T = decltype(t);
    with_vec<T>(n % kVec<T> == 0 && aligned16({x.raw(), dy.raw(), dx.raw()}), [&](auto v) {
      constexpr int V = decltype(v)::value;
      gelu_backward_kernel<T, V><<<blocks_for(n / V), kThreads, 0, context().stream>>>(
          kind == Gelu::erf, static_cast<const T*>(x.raw()), static_cast<const T*>(dy.raw()), n / V,
          static_cast<T*>(dx.raw()));
      Q3VL_CUDA_LAUNCHED("gelu_backward_kernel");
    });
  });
}

void CudaLayersImpl::swiglu_forward(const Tensor& gate_up, const Tensor& y) const {
  const char* L = "swiglu_forward";
  const int64_t inter = swiglu_inter(L, gate_up);
  const DType dt = gate_up.dtype();
  const int64_t n = gate_up.size(0);
  require_device(L, "y", y, dt, {n, inter});
  if (n * inter == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    with_vec<T>(inter % kVec<T> == 0 && aligned16({gate_up.raw(), y.raw()}), [&](auto v) {
      constexpr int V = decltype(v)::value;
      swiglu_forward_kernel<T, V><<<blocks_for(n * inter / V), kThreads, 0, context().stream>>>(
          static_cast<const T*>(gate_up.raw()), n, inter, static_cast<T*>(y.raw()));
      Q3VL_CUDA_LAUNCHED("swiglu_forward_kernel");
    });
  });
}

void CudaLayersImpl::swiglu_backward(const Tensor& gate_up, const Tensor& dy, const Tensor& dgate_up) const {
  const char* L = "swiglu_backward";
  const int64_t inter = swiglu_inter(L, gate_up);
  const DType dt = gate_up.dtype();
  const int64_t n = gate_up.size(0);
  require_device(L, "dy", dy, dt, {n, inter});
  require_device(L, "dgate_up", dgate_up, dt, {n, 2 * inter});
  if (n * inter == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    with_vec<T>(inter % kVec<T> == 0 && aligned16({gate_up.raw(), dy.raw(), dgate_up.raw()}), [&](auto v) {
      constexpr int V = decltype(v)::value;
      swiglu_backward_kernel<T, V><<<blocks_for(n * inter / V), kThreads, 0, context().stream>>>(
          static_cast<const T*>(gate_up.raw()), static_cast<const T*>(dy.raw()), n, inter,
          static_cast<T*>(dgate_up.raw()));
      Q3VL_CUDA_LAUNCHED("swiglu_backward_kernel");
    });
  });
}

}  // namespace q3vl::cuda
