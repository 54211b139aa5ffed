// GELU (tanh and erf), SwiGLU forward/backward, element-wise and parallel over elements/rows (device tensors
// go to the CUDA backend).
#include "core/layers/activations.h"

#include <cmath>
#include <numbers>

#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"

namespace q3vl {

namespace {

// Formulas in the element type T, as PyTorch evaluates them for that dtype.
template <class T>
T gelu_value(Gelu kind, T x) {
  if (kind == Gelu::erf) return T(0.5) * x * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
  const T c = T(std::numbers::sqrt2 * std::numbers::inv_sqrtpi);  // sqrt(2/pi)
  return T(0.5) * x * (T(1) + std::tanh(c * (x + T(0.044715) * x * x * x)));
}

template <class T>
T gelu_grad(Gelu kind, T x) {
  if (kind == Gelu::erf) {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
    const T pdf = std::exp(T(-0.5) * x * x) * T(std::numbers::inv_sqrtpi / std::numbers::sqrt2);
    return cdf + x * pdf;
  }
  const T c = T(std::numbers::sqrt2 * std::numbers::inv_sqrtpi);
  const T t = std::tanh(c * (x + T(0.044715) * x * x * x));
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * c * (T(1) + T(3 * 0.044715) * x * x);
}

template <class T>
T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

void require_same(const char* layer, const char* name, const Tensor& t, const Tensor& like) {
  Q3VL_CHECK(t.dtype() == like.dtype() && t.shape() == like.shape(), layer, ": ", name, " is ", t.str(),
             ", expected ", like.str());
  Q3VL_CHECK(t.is_contiguous() && t.device() == Device::cpu, layer, ": ", name, " must be contiguous host memory");
}

}  // namespace

void gelu_forward(Gelu kind, const Tensor& x, const Tensor& y) {
  if (on_cuda({&x, &y})) return cuda_layers().gelu_forward(kind, x, y);
  const char* L = "gelu_forward";
  require_same(L, "x", x, x);
  require_same(L, "y", y, x);
  dispatch_float(L, x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) yp[i] = gelu_value(kind, xp[i]);
  });
}

void gelu_backward(Gelu kind, const Tensor& x, const Tensor& dy, const Tensor& dx) {
  if (on_cuda({&x, &dy, &dx})) return cuda_layers().gelu_backward(kind, x, dy, dx);
  const char* L = "gelu_backward";
  require_same(L, "x", x, x);
  require_same(L, "dy", dy, x);
  require_same(L, "dx", dx, x);
  dispatch_float(L, x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data<T>(), *dyp = dy.data<T>();
    T* dxp = dx.data<T>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) dxp[i] = dyp[i] * gelu_grad(kind, xp[i]);
  });
}

void swiglu_forward(const Tensor& gate_up, const Tensor& y) {
  if (on_cuda({&gate_up, &y})) return cuda_layers().swiglu_forward(gate_up, y);
  const char* L = "swiglu_forward";
  const DType dt = gate_up.dtype();
  require(L, "gate_up", gate_up, dt, {-1, -1});
  Q3VL_CHECK(gate_up.size(1) % 2 == 0, L, ": gate_up has shape ", gate_up.shape().str(), ", expected an even last dimension [gate | up]");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  require(L, "y", y, dt, {n, inter});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T* gu = gate_up.data<T>();
    T* yp = y.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* g = gu + i * 2 * inter;
      const T* u = g + inter;
      for (int64_t j = 0; j < inter; ++j) yp[i * inter + j] = g[j] * sigmoid(g[j]) * u[j];
    }
  });
}

void swiglu_backward(const Tensor& gate_up, const Tensor& dy, const Tensor& dgate_up) {
  if (on_cuda({&gate_up, &dy, &dgate_up})) return cuda_layers().swiglu_backward(gate_up, dy, dgate_up);
  const char* L = "swiglu_backward";
  const DType dt = gate_up.dtype();
  require(L, "gate_up", gate_up, dt, {-1, -1});
  Q3VL_CHECK(gate_up.size(1) % 2 == 0, L, ": gate_up has shape ", gate_up.shape().str(), ", expected an even last dimension [gate | up]");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  require(L, "dy", dy, dt, {n, inter});
  require(L, "dgate_up", dgate_up, dt, {n, 2 * inter});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *gu = gate_up.data<T>(), *dyp = dy.data<T>();
    T* dgu = dgate_up.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* g = gu + i * 2 * inter;
      const T* u = g + inter;
      T* dg = dgu + i * 2 * inter;
      T* du = dg + inter;
      for (int64_t j = 0; j < inter; ++j) {
        const T s = sigmoid(g[j]);
        const T d = dyp[i * inter + j];
        du[j] = d * g[j] * s;
        dg[j] = d * u[j] * s * (T(1) + g[j] * (T(1) - s));
      }
    }
  });
}

}  // namespace q3vl
