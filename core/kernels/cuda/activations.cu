// GELU (tanh and erf) and SwiGLU on the device, forward and backward: element-wise grid-stride kernels in fp32
// with the CPU's formulas (f32 or bf16 storage). Each thread reads an element before writing the same index,
// so outputs may alias inputs as on the CPU (y = x for GELU, dx = dy for its backward).
#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/layers_impl.h"

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

template <class T>
__global__ void gelu_forward_kernel(bool erf_kind, const T* x, int64_t n, T* y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = from_float<T>(gelu_value(erf_kind, to_float(x[i])));
}

template <class T>
__global__ void gelu_backward_kernel(bool erf_kind, const T* x, const T* dy, int64_t n, T* dx) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dx[i] = from_float<T>(to_float(dy[i]) * gelu_grad(erf_kind, to_float(x[i])));
}

// Element k of the [N, I] output: row k / I, gate column k % I, up column I + k % I of [N, 2I].
template <class T>
__global__ void swiglu_forward_kernel(const T* gate_up, int64_t n, int64_t inter, T* y) {
  const int64_t total = n * inter;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k / inter, j = k % inter;
    const float g = to_float(gate_up[i * 2 * inter + j]), u = to_float(gate_up[i * 2 * inter + inter + j]);
    y[k] = from_float<T>(g * sigmoid(g) * u);
  }
}

template <class T>
__global__ void swiglu_backward_kernel(const T* gate_up, const T* dy, int64_t n, int64_t inter, T* dgate_up) {
  const int64_t total = n * inter;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k / inter, j = k % inter;
    const int64_t gi = i * 2 * inter + j, ui = gi + inter;
    const float g = to_float(gate_up[gi]), u = to_float(gate_up[ui]);
    const float s = sigmoid(g), d = to_float(dy[k]);
    dgate_up[ui] = from_float<T>(d * g * s);
    dgate_up[gi] = from_float<T>(d * u * s * (1.0f + g * (1.0f - s)));
  }
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
    gelu_forward_kernel<T><<<blocks_for(n), kThreads, 0, context().stream>>>(
        kind == Gelu::erf, static_cast<const T*>(x.raw()), n, static_cast<T*>(y.raw()));
    Q3VL_CUDA_LAUNCHED("gelu_forward_kernel");
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
    gelu_backward_kernel<T><<<blocks_for(n), kThreads, 0, context().stream>>>(
        kind == Gelu::erf, static_cast<const T*>(x.raw()), static_cast<const T*>(dy.raw()), n,
        static_cast<T*>(dx.raw()));
    Q3VL_CUDA_LAUNCHED("gelu_backward_kernel");
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
    swiglu_forward_kernel<T><<<blocks_for(n * inter), kThreads, 0, context().stream>>>(
        static_cast<const T*>(gate_up.raw()), n, inter, static_cast<T*>(y.raw()));
    Q3VL_CUDA_LAUNCHED("swiglu_forward_kernel");
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
    swiglu_backward_kernel<T><<<blocks_for(n * inter), kThreads, 0, context().stream>>>(
        static_cast<const T*>(gate_up.raw()), static_cast<const T*>(dy.raw()), n, inter,
        static_cast<T*>(dgate_up.raw()));
    Q3VL_CUDA_LAUNCHED("swiglu_backward_kernel");
  });
}

}  // namespace q3vl::cuda
