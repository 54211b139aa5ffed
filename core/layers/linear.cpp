// Linear forward/backward on the CPU GEMM (device tensors go to the CUDA backend).
#include "core/layers/linear.h"

#include "core/kernels/cpu/gemm.h"
#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"

namespace q3vl {

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y) {
  if (on_cuda({&x, &w, &b, &y})) return cuda_layers().linear_forward(x, w, b, y);
  const char* L = "linear_forward";
  const DType dt = w.dtype();
  require(L, "w", w, dt, {-1, -1});
  const int64_t out = w.size(0), in = w.size(1);
  require(L, "x", x, dt, {-1, in});
  const int64_t n = x.size(0);
  require(L, "y", y, dt, {n, out});
  if (b.defined()) require(L, "b", b, dt, {out});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    T* yp = y.data<T>();
    if (b.defined()) {
      const T* bp = b.data<T>();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < out; ++j) yp[i * out + j] = bp[j];
    }
    cpu::gemm<T>(false, true, n, out, in, T(1), x.data<T>(), in, w.data<T>(), in, b.defined() ? T(1) : T(0), yp, out);
  });
}

void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx, const Tensor& dw,
                     const Tensor& db) {
  if (on_cuda({&x, &w, &dy, &dx, &dw, &db})) return cuda_layers().linear_backward(x, w, dy, dx, dw, db);
  const char* L = "linear_backward";
  const DType dt = w.dtype();
  require(L, "w", w, dt, {-1, -1});
  const int64_t out = w.size(0), in = w.size(1);
  require(L, "x", x, dt, {-1, in});
  const int64_t n = x.size(0);
  require(L, "dy", dy, dt, {n, out});
  require(L, "dw", dw, dt, {out, in});
  if (dx.defined()) require(L, "dx", dx, dt, {n, in});
  if (db.defined()) require(L, "db", db, dt, {out});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = dy.data<T>();
    if (dx.defined()) cpu::gemm<T>(false, false, n, in, out, T(1), dyp, out, w.data<T>(), in, T(0), dx.data<T>(), in);
    cpu::gemm<T>(true, false, out, in, n, T(1), dyp, out, x.data<T>(), in, T(1), dw.data<T>(), in);
    if (db.defined()) {
      T* dbp = db.data<T>();
      // Column sums, parallel over columns so the summation order is fixed.
#pragma omp parallel for schedule(static)
      for (int64_t j = 0; j < out; ++j) {
        T s = 0;
        for (int64_t i = 0; i < n; ++i) s += dyp[i * out + j];
        dbp[j] += s;
      }
    }
  });
}

}  // namespace q3vl
