// RMSNorm and LayerNorm on the device, forward and backward. One block per row: row statistics and the
// backward's row dot products are fp32 block sums in a fixed order; the weight and bias gradients are column
// sums over rows in a fixed order (reductions.cuh), added into dw/db (f32 or the weight's dtype). x, w, b, y,
// dy, dx are f32 or bf16 (one dtype); the saved statistics mean/rstd are f32 whatever x's dtype.
#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/layers_impl.h"
#include "core/kernels/cuda/reductions.cuh"

namespace q3vl::cuda {

namespace {

template <class T>
__global__ void rmsnorm_forward_kernel(const T* x, const T* w, int64_t d, float eps, T* y, float* rstd) {
  __shared__ float shared[kWarps];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const float v = to_float(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, shared);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < d; j += kThreads)
    y[row * d + j] = from_float<T>(to_float(w[j]) * (to_float(xr[j]) * r));
}

template <class T>
__global__ void rmsnorm_backward_kernel(const T* x, const T* w, const float* rstd, const T* dy, int64_t d, T* dx) {
  __shared__ float shared[kWarps];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  const T* g = dy + row * d;
  const float r = rstd[row];
  float dot = 0.0f;  // sum_j dxhat_j * xhat_j
  for (int64_t j = threadIdx.x; j < d; j += kThreads) dot += to_float(g[j]) * to_float(w[j]) * to_float(xr[j]) * r;
  const float m = block_sum(dot, shared) / static_cast<float>(d);
  for (int64_t j = threadIdx.x; j < d; j += kThreads)
    dx[row * d + j] = from_float<T>(r * (to_float(g[j]) * to_float(w[j]) - to_float(xr[j]) * r * m));
}

template <class T>
__global__ void layernorm_forward_kernel(const T* x, const T* w, const T* b, int64_t d, float eps, T* y,
                                         float* mean, float* rstd) {
  __shared__ float shared[kWarps];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  const float inv_d = 1.0f / static_cast<float>(d);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) s += to_float(xr[j]);
  const float mu = block_sum(s, shared) * inv_d;
  float v = 0.0f;  // two passes: the variance of the centred values, as the CPU
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const float c = to_float(xr[j]) - mu;
    v += c * c;
  }
  const float r = 1.0f / sqrtf(block_sum(v, shared) * inv_d + eps);
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = r;
  }
  for (int64_t j = threadIdx.x; j < d; j += kThreads)
    y[row * d + j] = from_float<T>((to_float(xr[j]) - mu) * r * to_float(w[j]) + to_float(b[j]));
}

template <class T>
__global__ void layernorm_backward_kernel(const T* x, const T* w, const float* mean, const float* rstd, const T* dy,
                                          int64_t d, T* dx) {
  __shared__ float shared[kWarps];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  const T* g = dy + row * d;
  const float mu = mean[row], r = rstd[row];
  float sg = 0.0f, sgx = 0.0f;  // sums of dxhat and dxhat * xhat
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const float gh = to_float(g[j]) * to_float(w[j]);
    sg += gh;
    sgx += gh * (to_float(xr[j]) - mu) * r;
  }
  const float inv_d = 1.0f / static_cast<float>(d);
  sg = block_sum(sg, shared) * inv_d;
  sgx = block_sum(sgx, shared) * inv_d;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const float gh = to_float(g[j]) * to_float(w[j]);
    dx[row * d + j] = from_float<T>(r * (gh - sg - (to_float(xr[j]) - mu) * r * sgx));
  }
}

// Column-sum terms of the parameter gradients.
template <class T>
struct RmsDwTerm {  // dy * xhat
  const T *dy, *x;
  const float* rstd;
  int64_t d;
  __device__ float operator()(int64_t i, int64_t j) const { return to_float(dy[i * d + j]) * to_float(x[i * d + j]) * rstd[i]; }
};

template <class T>
struct LayerDwTerm {  // dy * xhat
  const T *dy, *x;
  const float *mean, *rstd;
  int64_t d;
  __device__ float operator()(int64_t i, int64_t j) const {
    return to_float(dy[i * d + j]) * (to_float(x[i * d + j]) - mean[i]) * rstd[i];
  }
};

template <class T>
struct DbTerm {  // dy
  const T* dy;
  int64_t d;
  __device__ float operator()(int64_t i, int64_t j) const { return to_float(dy[i * d + j]); }
};

// One block per row: the grid's x dimension holds up to 2^31 - 1 rows.
unsigned row_blocks(const char* layer, int64_t n) {
  Q3VL_CHECK(n < (int64_t{1} << 31), layer, ": ", n, " rows exceed the grid");
  return static_cast<unsigned>(n);
}

void check_eps(const char* layer, double eps) { Q3VL_CHECK(eps > 0, layer, ": eps must be positive, got ", eps); }

}  // namespace

void CudaLayersImpl::rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                                     const Tensor& rstd) const {
  const char* L = "rmsnorm_forward";
  require_float_dtype(L, "x", x);
  const DType dt = x.dtype();
  require_device(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), d = x.size(1);
  require_device(L, "w", w, dt, {d});
  require_device(L, "y", y, dt, {n, d});
  require_device(L, "rstd", rstd, DType::f32, {n});
  check_eps(L, eps);
  if (n == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    rmsnorm_forward_kernel<T><<<row_blocks(L, n), kThreads, 0, context().stream>>>(
        static_cast<const T*>(x.raw()), static_cast<const T*>(w.raw()), d, static_cast<float>(eps),
        static_cast<T*>(y.raw()), static_cast<float*>(rstd.raw()));
    Q3VL_CUDA_LAUNCHED("rmsnorm_forward_kernel");
  });
}

void CudaLayersImpl::rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                                      const Tensor& dx, const Tensor& dw) const {
  const char* L = "rmsnorm_backward";
  require_float_dtype(L, "x", x);
  const DType dt = x.dtype();
  require_device(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), d = x.size(1);
  require_device(L, "w", w, dt, {d});
  require_device(L, "rstd", rstd, DType::f32, {n});
  require_device(L, "dy", dy, dt, {n, d});
  if (dx.defined()) require_device(L, "dx", dx, dt, {n, d});
  if (dw.defined()) {
    require_grad_dtype(L, "dw", dw, dt);
    require_device(L, "dw", dw, dw.dtype(), {d});
  }
  if (n == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    const T *xp = static_cast<const T*>(x.raw()), *dyp = static_cast<const T*>(dy.raw());
    const float* rp = static_cast<const float*>(rstd.raw());
    if (dx.defined()) {
      rmsnorm_backward_kernel<T><<<row_blocks(L, n), kThreads, 0, context().stream>>>(
          xp, static_cast<const T*>(w.raw()), rp, dyp, d, static_cast<T*>(dx.raw()));
      Q3VL_CUDA_LAUNCHED("rmsnorm_backward_kernel");
    }
    if (dw.defined())
      dispatch_float_dtype(L, dw.dtype(), [&](auto g) {
        using G = decltype(g);
        column_sums_add("rmsnorm dw column_sums_add_kernel", n, d, static_cast<G*>(dw.raw()),
                        RmsDwTerm<T>{dyp, xp, rp, d});
      });
  });
}

void CudaLayersImpl::layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps,
                                       const Tensor& y, const Tensor& mean, const Tensor& rstd) const {
  const char* L = "layernorm_forward";
  require_float_dtype(L, "x", x);
  const DType dt = x.dtype();
  require_device(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), d = x.size(1);
  require_device(L, "w", w, dt, {d});
  require_device(L, "b", b, dt, {d});
  require_device(L, "y", y, dt, {n, d});
  require_device(L, "mean", mean, DType::f32, {n});
  require_device(L, "rstd", rstd, DType::f32, {n});
  check_eps(L, eps);
  if (n == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    layernorm_forward_kernel<T><<<row_blocks(L, n), kThreads, 0, context().stream>>>(
        static_cast<const T*>(x.raw()), static_cast<const T*>(w.raw()), static_cast<const T*>(b.raw()), d,
        static_cast<float>(eps), static_cast<T*>(y.raw()), static_cast<float*>(mean.raw()),
        static_cast<float*>(rstd.raw()));
    Q3VL_CUDA_LAUNCHED("layernorm_forward_kernel");
  });
}

void CudaLayersImpl::layernorm_backward(const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                                        const Tensor& dy, const Tensor& dx, const Tensor& dw,
                                        const Tensor& db) const {
  const char* L = "layernorm_backward";
  require_float_dtype(L, "x", x);
  const DType dt = x.dtype();
  require_device(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), d = x.size(1);
  require_device(L, "w", w, dt, {d});
  require_device(L, "mean", mean, DType::f32, {n});
  require_device(L, "rstd", rstd, DType::f32, {n});
  require_device(L, "dy", dy, dt, {n, d});
  if (dx.defined()) require_device(L, "dx", dx, dt, {n, d});
  if (dw.defined()) {
    require_grad_dtype(L, "dw", dw, dt);
    require_device(L, "dw", dw, dw.dtype(), {d});
  }
  if (db.defined()) {
    require_grad_dtype(L, "db", db, dt);
    require_device(L, "db", db, db.dtype(), {d});
  }
  if (n == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    const T *xp = static_cast<const T*>(x.raw()), *dyp = static_cast<const T*>(dy.raw());
    const float *mp = static_cast<const float*>(mean.raw()), *rp = static_cast<const float*>(rstd.raw());
    if (dx.defined()) {
      layernorm_backward_kernel<T><<<row_blocks(L, n), kThreads, 0, context().stream>>>(
          xp, static_cast<const T*>(w.raw()), mp, rp, dyp, d, static_cast<T*>(dx.raw()));
      Q3VL_CUDA_LAUNCHED("layernorm_backward_kernel");
    }
    if (dw.defined())
      dispatch_float_dtype(L, dw.dtype(), [&](auto g) {
        using G = decltype(g);
        column_sums_add("layernorm dw column_sums_add_kernel", n, d, static_cast<G*>(dw.raw()),
                        LayerDwTerm<T>{dyp, xp, mp, rp, d});
      });
    if (db.defined())
      dispatch_float_dtype(L, db.dtype(), [&](auto g) {
        using G = decltype(g);
        column_sums_add("layernorm db column_sums_add_kernel", n, d, static_cast<G*>(db.raw()), DbTerm<T>{dyp, d});
      });
  });
}

}  // namespace q3vl::cuda
