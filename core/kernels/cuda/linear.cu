// Linear layer on the device: y = x W^T (+ b in the GEMM epilogue); backward dx = dy W, dW += dy^T x through
// the same cuBLASLt GEMM, db += column sums of dy in a fixed row order (deterministic, fp32 sums).
#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/gemm.h"
#include "core/kernels/cuda/layers_impl.h"

namespace q3vl::cuda {

namespace {

// db[j] += sum over rows of dy[i, j]; one thread per column, rows in order.
template <class T, class G>
__global__ void column_sums_add(const T* dy, int64_t rows, int64_t cols, G* db) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int64_t i = 0; i < rows; ++i) s += to_float(dy[i * cols + j]);
    db[j] = from_float<G>(to_float(db[j]) + s);
  }
}

}  // namespace

void CudaLayersImpl::linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y) const {
  const char* L = "linear_forward";
  require_float_dtype(L, "x", x);
  const DType dt = x.dtype();
  require_device(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), in = x.size(1);
  require_device(L, "w", w, dt, {-1, in});
  const int64_t out = w.size(0);
  if (b.defined()) require_device(L, "b", b, dt, {out});
  require_device(L, "y", y, dt, {n, out});
  gemm(false, true, n, out, in, 1.0f, x.raw(), in, w.raw(), in, 0.0f, y.raw(), out, dt, dt,
       b.defined() ? b.raw() : nullptr);
}

void CudaLayersImpl::linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                                     const Tensor& dw, const Tensor& db) const {
  const char* L = "linear_backward";
  require_float_dtype(L, "x", x);
  const DType dt = x.dtype();
  require_device(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), in = x.size(1);
  require_device(L, "w", w, dt, {-1, in});
  const int64_t out = w.size(0);
  require_device(L, "dy", dy, dt, {n, out});
  if (dx.defined()) require_device(L, "dx", dx, dt, {n, in});
  require_grad(L, "dw", dw, dt, {out, in});
  require_grad(L, "db", db, dt, {out});
  if (dx.defined()) gemm(false, false, n, in, out, 1.0f, dy.raw(), out, w.raw(), in, 0.0f, dx.raw(), in, dt, dt);
  if (dw.defined()) gemm(true, false, out, in, n, 1.0f, dy.raw(), out, x.raw(), in, 1.0f, dw.raw(), in, dt, dw.dtype());
  if (db.defined() && out > 0) {
    dispatch_float_dtype(L, dt, [&](auto t) {
      using T = decltype(t);
      dispatch_float_dtype(L, db.dtype(), [&](auto g) {
        using G = decltype(g);
        column_sums_add<T, G><<<blocks_for(out), kThreads, 0, context().stream>>>(
            static_cast<const T*>(dy.raw()), n, out, static_cast<G*>(db.raw()));
        Q3VL_CUDA_LAUNCHED("column_sums_add");
      });
    });
  }
}

}  // namespace q3vl::cuda
