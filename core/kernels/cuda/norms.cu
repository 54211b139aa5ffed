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

#include <initializer_list>
#include <type_traits>

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

// Row-in-registers kernels, the fast path: a block of `threads` (a multiple of 32, at most 1024) owns a row at
// a time (rows blockIdx.x, + gridDim.x, ...); thread t holds the V-element vectors t, t + threads, ... (NIT of
// them) of the row in registers, so the forward reads x once and the backward reads x and dy once. V is kVec<T>
// (16-byte accesses) when the pointers are aligned and V divides d, else 1.
template <int V, int NIT>
struct RowSlots {
  int64_t nv;  // vectors per row
  __device__ bool valid(int it) const { return threadIdx.x + static_cast<int64_t>(it) * blockDim.x < nv; }
  __device__ int64_t col(int it) const { return (threadIdx.x + static_cast<int64_t>(it) * blockDim.x) * V; }
};

template <class T, int V, int NIT>
__global__ void __launch_bounds__(1024) rmsnorm_forward_rows_kernel(const T* x, const T* w, int64_t n, int64_t d,
                                                                   float eps, T* y, float* rstd) {
  __shared__ float shared[1][32];
  const RowSlots<V, NIT> slots{d / V};
  float wv[NIT][V] = {};
#pragma unroll
  for (int it = 0; it < NIT; ++it)
    if (slots.valid(it)) load_floats<V>(w + slots.col(it), wv[it]);
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* xr = x + row * d;
    float xv[NIT][V] = {};
    float ss[1] = {0.0f};
#pragma unroll
    for (int it = 0; it < NIT; ++it)
      if (slots.valid(it)) load_floats<V>(xr + slots.col(it), xv[it]);
#pragma unroll
    for (int it = 0; it < NIT; ++it)
#pragma unroll
      for (int k = 0; k < V; ++k) ss[0] += xv[it][k] * xv[it][k];
    block_sums(ss, shared);
    const float r = 1.0f / sqrtf(ss[0] / static_cast<float>(d) + eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int it = 0; it < NIT; ++it)
      if (slots.valid(it)) {
        float o[V];
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = wv[it][k] * (xv[it][k] * r);
        store_floats<V>(y + row * d + slots.col(it), o);
      }
  }
}

template <class T, int V, int NIT>
__global__ void __launch_bounds__(1024) layernorm_forward_rows_kernel(const T* x, const T* w, const T* b, int64_t n,
                                                                     int64_t d, float eps, T* y, float* mean,
                                                                     float* rstd) {
  __shared__ float shared[1][32];
  const RowSlots<V, NIT> slots{d / V};
  const float inv_d = 1.0f / static_cast<float>(d);
  float wv[NIT][V] = {}, bv[NIT][V] = {};
#pragma unroll
  for (int it = 0; it < NIT; ++it)
    if (slots.valid(it)) {
      load_floats<V>(w + slots.col(it), wv[it]);
      load_floats<V>(b + slots.col(it), bv[it]);
    }
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* xr = x + row * d;
    float xv[NIT][V] = {};
    float s[1] = {0.0f};
#pragma unroll
    for (int it = 0; it < NIT; ++it)
      if (slots.valid(it)) load_floats<V>(xr + slots.col(it), xv[it]);
#pragma unroll
    for (int it = 0; it < NIT; ++it)
#pragma unroll
      for (int k = 0; k < V; ++k) s[0] += xv[it][k];
    block_sums(s, shared);
    const float mu = s[0] * inv_d;
    float v[1] = {0.0f};  // two passes: the variance of the centred values, as the CPU
#pragma unroll
    for (int it = 0; it < NIT; ++it)
      if (slots.valid(it))
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float c = xv[it][k] - mu;
          v[0] += c * c;
        }
    block_sums(v, shared);
    const float r = 1.0f / sqrtf(v[0] * inv_d + eps);
    if (threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = r;
    }
#pragma unroll
    for (int it = 0; it < NIT; ++it)
      if (slots.valid(it)) {
        float o[V];
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = (xv[it][k] - mu) * r * wv[it][k] + bv[it][k];
        store_floats<V>(y + row * d + slots.col(it), o);
      }
  }
}

// Backward of both norms (kLayer: LayerNorm, with mean; else RMSNorm): dx of each row from the registers, and
// the block's partial column sums of dw (and db) over its rows, in row order, written to row blockIdx.x of
// pdw (pdb) [gridDim.x, d] when those are given; the caller then sums the partials in block order.
template <class T, int V, int NIT, bool kLayer>
__global__ void __launch_bounds__(1024) norm_backward_rows_kernel(const T* x, const T* w, const float* mean,
                                                                 const float* rstd, const T* dy, int64_t n,
                                                                 int64_t d, T* dx, float* pdw, float* pdb) {
  __shared__ float shared[2][32];
  const RowSlots<V, NIT> slots{d / V};
  const float inv_d = 1.0f / static_cast<float>(d);
  float wv[NIT][V] = {}, adw[NIT][V] = {}, adb[NIT][V] = {};
#pragma unroll
  for (int it = 0; it < NIT; ++it)
    if (slots.valid(it)) load_floats<V>(w + slots.col(it), wv[it]);
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    float xv[NIT][V] = {}, gv[NIT][V] = {};
#pragma unroll
    for (int it = 0; it < NIT; ++it)
      if (slots.valid(it)) {
        load_floats<V>(x + row * d + slots.col(it), xv[it]);
        load_floats<V>(dy + row * d + slots.col(it), gv[it]);
      }
    const float r = rstd[row];
    const float mu = kLayer ? mean[row] : 0.0f;
    float sums[2] = {0.0f, 0.0f};  // RMSNorm: sum dxhat * xhat; LayerNorm: sums of dxhat and dxhat * xhat
#pragma unroll
    for (int it = 0; it < NIT; ++it)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float g = gv[it][k], xx = xv[it][k];
        if constexpr (kLayer) {
          const float gh = g * wv[it][k];
          sums[0] += gh;
          sums[1] += gh * (xx - mu) * r;
          adw[it][k] += g * (xx - mu) * r;
          adb[it][k] += g;
        } else {
          sums[0] += g * wv[it][k] * xx * r;
          adw[it][k] += g * xx * r;
        }
      }
    if (dx == nullptr) continue;  // uniform over the block
    block_sums(sums, shared);
#pragma unroll
    for (int it = 0; it < NIT; ++it)
      if (slots.valid(it)) {
        float o[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float g = gv[it][k], xx = xv[it][k];
          if constexpr (kLayer) {
            const float gh = g * wv[it][k];
            o[k] = r * (gh - sums[0] * inv_d - (xx - mu) * r * (sums[1] * inv_d));
          } else {
            o[k] = r * (g * wv[it][k] - xx * r * (sums[0] * inv_d));
          }
        }
        store_floats<V>(dx + row * d + slots.col(it), o);
      }
  }
#pragma unroll
  for (int it = 0; it < NIT; ++it)
    if (slots.valid(it))
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t j = blockIdx.x * d + slots.col(it) + k;
        if (pdw != nullptr) pdw[j] = adw[it][k];
        if (kLayer && pdb != nullptr) pdb[j] = adb[it][k];
      }
}

// Row i of a [rows, d] f32 matrix of partial column sums.
struct PartialTerm {
  const float* p;
  int64_t d;
  __device__ float operator()(int64_t i, int64_t j) const { return p[i * d + j]; }
};

// The fast path's shape for rows of d elements: vector width, vectors per thread, threads per block.
struct RowPlan {
  bool ok = false;
  int v = 1, nit = 1;
  unsigned threads = 0;
};

template <class T>
RowPlan row_plan(int64_t d, std::initializer_list<const void*> ptrs) {
  RowPlan p;
  if (d == 0) return p;
  p.v = d % kVec<T> == 0 && aligned16(ptrs) ? kVec<T> : 1;
  const int64_t nv = d / p.v;
  for (int nit : {1, 2, 4})
    if (nv <= 1024LL * nit) {
      p.ok = true;
      p.nit = nit;
      p.threads = static_cast<unsigned>(((nv + nit - 1) / nit + 31) / 32 * 32);
      return p;
    }
  return p;
}

// Calls f(integral_constant V, integral_constant NIT) for the plan.
template <class T, class F>
void with_row_plan(const RowPlan& p, F&& f) {
  auto by_nit = [&](auto v) {
    switch (p.nit) {
      case 1: return f(v, std::integral_constant<int, 1>{});
      case 2: return f(v, std::integral_constant<int, 2>{});
      default: return f(v, std::integral_constant<int, 4>{});
    }
  };
  if (p.v == 1)
    by_nit(std::integral_constant<int, 1>{});
  else
    by_nit(std::integral_constant<int, kVec<T>>{});
}

// Blocks of the forward's row loop: enough to fill the device several times over.
unsigned forward_row_blocks(int64_t n) { return static_cast<unsigned>(n < 65536 ? n : 65536); }

// Blocks of the backward with partial column sums: one partial row of nbuf x d floats per block, at most 1024
// blocks and as many as the reduction workspace holds (at least 1 for d <= 4096 x 4 x 8 f32 columns).
unsigned backward_row_blocks(int64_t n, int64_t d, int nbuf) {
  int64_t b = n < 1024 ? n : 1024;
  if (nbuf > 0) {
    const int64_t fit = static_cast<int64_t>(context().reduction_workspace_bytes / (sizeof(float) * nbuf * d));
    if (b > fit) b = fit;
  }
  return static_cast<unsigned>(b);
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

// The fast backward (norm_backward_rows_kernel, then the partial sums added into dw and db in block order) when
// the row fits the registers; false (nothing queued) otherwise.
template <class T, bool kLayer>
bool fused_backward(const Tensor& x, const Tensor& w, const float* mean, const float* rstd, const Tensor& dy,
                    const Tensor& dx, const Tensor& dw, const Tensor& db, int64_t n, int64_t d) {
  const RowPlan plan = row_plan<T>(d, {x.raw(), w.raw(), dy.raw(), dx.defined() ? dx.raw() : nullptr});
  const int nbuf = (dw.defined() ? 1 : 0) + (db.defined() ? 1 : 0);
  const unsigned blocks = backward_row_blocks(n, d, nbuf);
  if (!plan.ok || blocks == 0) return false;
  float* pdw = dw.defined() ? context().reduction_workspace : nullptr;
  float* pdb = db.defined() ? context().reduction_workspace + (dw.defined() ? blocks * d : 0) : nullptr;
  with_row_plan<T>(plan, [&](auto v, auto nit) {
    norm_backward_rows_kernel<T, decltype(v)::value, decltype(nit)::value, kLayer>
        <<<blocks, plan.threads, 0, context().stream>>>(
            static_cast<const T*>(x.raw()), static_cast<const T*>(w.raw()), mean, rstd,
            static_cast<const T*>(dy.raw()), n, d, dx.defined() ? static_cast<T*>(dx.raw()) : nullptr, pdw, pdb);
    Q3VL_CUDA_LAUNCHED("norm_backward_rows_kernel");
  });
  const char* L = kLayer ? "layernorm_backward" : "rmsnorm_backward";
  if (dw.defined())
    dispatch_float_dtype(L, dw.dtype(), [&](auto g) {
      using G = decltype(g);
      column_sums_add("norm dw partial column_sums_add_kernel", blocks, d, static_cast<G*>(dw.raw()),
                      PartialTerm{pdw, d});
    });
  if (db.defined())
    dispatch_float_dtype(L, db.dtype(), [&](auto g) {
      using G = decltype(g);
      column_sums_add("norm db partial column_sums_add_kernel", blocks, d, static_cast<G*>(db.raw()),
                      PartialTerm{pdb, d});
    });
  return true;
}

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
    const RowPlan plan = row_plan<T>(d, {x.raw(), w.raw(), y.raw()});
    if (plan.ok) {
      with_row_plan<T>(plan, [&](auto v, auto nit) {
        rmsnorm_forward_rows_kernel<T, decltype(v)::value, decltype(nit)::value>
            <<<forward_row_blocks(n), plan.threads, 0, context().stream>>>(
                static_cast<const T*>(x.raw()), static_cast<const T*>(w.raw()), n, d, static_cast<float>(eps),
                static_cast<T*>(y.raw()), static_cast<float*>(rstd.raw()));
        Q3VL_CUDA_LAUNCHED("rmsnorm_forward_rows_kernel");
      });
      return;
    }
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
  require_grad(L, "dw", dw, dt, {d});
  if (n == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    const T *xp = static_cast<const T*>(x.raw()), *dyp = static_cast<const T*>(dy.raw());
    const float* rp = static_cast<const float*>(rstd.raw());
    if (fused_backward<T, false>(x, w, nullptr, rp, dy, dx, dw, Tensor{}, n, d)) return;
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
    const RowPlan plan = row_plan<T>(d, {x.raw(), w.raw(), b.raw(), y.raw()});
    if (plan.ok) {
      with_row_plan<T>(plan, [&](auto v, auto nit) {
        layernorm_forward_rows_kernel<T, decltype(v)::value, decltype(nit)::value>
            <<<forward_row_blocks(n), plan.threads, 0, context().stream>>>(
                static_cast<const T*>(x.raw()), static_cast<const T*>(w.raw()), static_cast<const T*>(b.raw()), n,
                d, static_cast<float>(eps), static_cast<T*>(y.raw()), static_cast<float*>(mean.raw()),
                static_cast<float*>(rstd.raw()));
        Q3VL_CUDA_LAUNCHED("layernorm_forward_rows_kernel");
      });
      return;
    }
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
  require_grad(L, "dw", dw, dt, {d});
  require_grad(L, "db", db, dt, {d});
  if (n == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    const T *xp = static_cast<const T*>(x.raw()), *dyp = static_cast<const T*>(dy.raw());
    const float *mp = static_cast<const float*>(mean.raw()), *rp = static_cast<const float*>(rstd.raw());
    if (fused_backward<T, true>(x, w, mp, rp, dy, dx, dw, db, n, d)) return;
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
