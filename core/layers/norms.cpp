// RMSNorm and LayerNorm forward/backward. Row statistics accumulate in double: for fp32 data this is at
// least as accurate as PyTorch's fp32 reduction, and it keeps f64 test runs exact. Device tensors go to the
// CUDA backend (statistics f32 there).
#include "core/layers/norms.h"

#include <cmath>

#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"
#include "core/layers/column_sums.h"

namespace q3vl {

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y, const Tensor& rstd) {
  if (on_cuda({&x, &w, &y, &rstd})) return cuda_layers().rmsnorm_forward(x, w, eps, y, rstd);
  const char* L = "rmsnorm_forward";
  const DType dt = x.dtype();
  require(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), d = x.size(1);
  require(L, "w", w, dt, {d});
  require(L, "y", y, dt, {n, d});
  require(L, "rstd", rstd, dt, {n});
  Q3VL_CHECK(eps > 0, L, ": eps must be positive, got ", eps);
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data<T>(), *wp = w.data<T>();
    T *yp = y.data<T>(), *rp = rstd.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* xr = xp + i * d;
      double ss = 0;
      for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      const T r = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
      rp[i] = r;
      for (int64_t j = 0; j < d; ++j) yp[i * d + j] = wp[j] * (xr[j] * r);
    }
  });
}

void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor& dx,
                      const Tensor& dw) {
  if (on_cuda({&x, &w, &rstd, &dy, &dx, &dw})) return cuda_layers().rmsnorm_backward(x, w, rstd, dy, dx, dw);
  const char* L = "rmsnorm_backward";
  const DType dt = x.dtype();
  require(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), d = x.size(1);
  require(L, "w", w, dt, {d});
  require(L, "rstd", rstd, dt, {n});
  require(L, "dy", dy, dt, {n, d});
  if (dx.defined()) require(L, "dx", dx, dt, {n, d});
  if (dw.defined()) require(L, "dw", dw, dt, {d});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data<T>(), *wp = w.data<T>(), *rp = rstd.data<T>(), *dyp = dy.data<T>();
    if (dx.defined()) {
      T* dxp = dx.data<T>();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const T* xr = xp + i * d;
        const T* g = dyp + i * d;
        const double r = rp[i];
        double dot = 0;  // sum_j dxhat_j * xhat_j
        for (int64_t j = 0; j < d; ++j) dot += static_cast<double>(g[j]) * wp[j] * xr[j] * r;
        const double m = dot / static_cast<double>(d);
        for (int64_t j = 0; j < d; ++j)
          dxp[i * d + j] = static_cast<T>(r * (static_cast<double>(g[j]) * wp[j] - xr[j] * r * m));
      }
    }
    if (dw.defined())
      detail::accumulate_columns(n, d, dw.data<T>(), [&](int64_t i, int64_t j) { return dyp[i * d + j] * xp[i * d + j] * rp[i]; });
  });
}

void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, const Tensor& y,
                       const Tensor& mean, const Tensor& rstd) {
  if (on_cuda({&x, &w, &b, &y, &mean, &rstd})) return cuda_layers().layernorm_forward(x, w, b, eps, y, mean, rstd);
  const char* L = "layernorm_forward";
  const DType dt = x.dtype();
  require(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), d = x.size(1);
  require(L, "w", w, dt, {d});
  require(L, "b", b, dt, {d});
  require(L, "y", y, dt, {n, d});
  require(L, "mean", mean, dt, {n});
  require(L, "rstd", rstd, dt, {n});
  Q3VL_CHECK(eps > 0, L, ": eps must be positive, got ", eps);
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data<T>(), *wp = w.data<T>(), *bp = b.data<T>();
    T *yp = y.data<T>(), *mp = mean.data<T>(), *rp = rstd.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* xr = xp + i * d;
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += xr[j];
      const double mu = s / static_cast<double>(d);
      double v = 0;
      for (int64_t j = 0; j < d; ++j) v += (xr[j] - mu) * (xr[j] - mu);
      const double r = 1.0 / std::sqrt(v / static_cast<double>(d) + eps);
      mp[i] = static_cast<T>(mu);
      rp[i] = static_cast<T>(r);
      for (int64_t j = 0; j < d; ++j) yp[i * d + j] = static_cast<T>((xr[j] - mu) * r * wp[j] + bp[j]);
    }
  });
}

void layernorm_backward(const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd, const Tensor& dy,
                        const Tensor& dx, const Tensor& dw, const Tensor& db) {
  if (on_cuda({&x, &w, &mean, &rstd, &dy, &dx, &dw, &db}))
    return cuda_layers().layernorm_backward(x, w, mean, rstd, dy, dx, dw, db);
  const char* L = "layernorm_backward";
  const DType dt = x.dtype();
  require(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), d = x.size(1);
  require(L, "w", w, dt, {d});
  require(L, "mean", mean, dt, {n});
  require(L, "rstd", rstd, dt, {n});
  require(L, "dy", dy, dt, {n, d});
  if (dx.defined()) require(L, "dx", dx, dt, {n, d});
  if (dw.defined()) require(L, "dw", dw, dt, {d});
  if (db.defined()) require(L, "db", db, dt, {d});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data<T>(), *wp = w.data<T>(), *mp = mean.data<T>(), *rp = rstd.data<T>(), *dyp = dy.data<T>();
    if (dx.defined()) {
      T* dxp = dx.data<T>();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const T* xr = xp + i * d;
        const T* g = dyp + i * d;
        const double mu = mp[i], r = rp[i];
        double sg = 0, sgx = 0;  // sums of dxhat and dxhat * xhat
        for (int64_t j = 0; j < d; ++j) {
          const double gh = static_cast<double>(g[j]) * wp[j];
          sg += gh;
          sgx += gh * (xr[j] - mu) * r;
        }
        const double inv_d = 1.0 / static_cast<double>(d);
        for (int64_t j = 0; j < d; ++j) {
          const double gh = static_cast<double>(g[j]) * wp[j];
          dxp[i * d + j] = static_cast<T>(r * (gh - sg * inv_d - (xr[j] - mu) * r * sgx * inv_d));
        }
      }
    }
    if (dw.defined())
      detail::accumulate_columns(n, d, dw.data<T>(), [&](int64_t i, int64_t j) { return dyp[i * d + j] * (xp[i * d + j] - mp[i]) * rp[i]; });
    if (db.defined()) detail::accumulate_columns(n, d, db.data<T>(), [&](int64_t i, int64_t j) { return dyp[i * d + j]; });
  });
}

}  // namespace q3vl
