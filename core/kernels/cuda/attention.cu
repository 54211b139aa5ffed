// Reference attention on the device (varlen documents by cu_seqlens, GQA, causal or not, any head_dim up to
// 256): simple and right, not fast; part 2 replaces it with tiled tensor-core kernels. One warp owns one
// (row, head) pair and streams over the rows of that row's document it may attend to, one at a time; each lane
// holds the head_dim elements lane, lane + 32, ... in registers, and dot products are reduced across the warp
// with an xor butterfly (every lane gets the same bits). All arithmetic is fp32; lse is f32.
//
// Forward: a warp per (query row, q head) with an online softmax, writing out and lse.
// Backward, deterministic without atomics: a warp per (query row, q head) recomputes P from lse and writes dq
// and delta = rowsum(dout * out) into scratch; then a warp per (key row, kv head) sums dk and dv over the q
// heads of its group (in head order) and the query rows that see the key (in row order).
//
// The document of a row is found by binary search in cu_seqlens on the device. Its contents are not read on
// the host (that would need a synchronisation): the batch plan that built them checked them.
#include <cmath>
#include <type_traits>

#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/layers_impl.h"

namespace q3vl::cuda {

namespace {

constexpr int kWarps = 4;             // warps per block: consecutive rows of one head share cached k/v rows
constexpr int kMaxHeadDim = 8 * 32;   // 8 registers per lane and vector

// The document b (cu[b] <= row < cu[b + 1]) of a row, among `docs` documents.
__device__ int64_t document_of(const int64_t* cu, int64_t docs, int64_t row) {
  int64_t lo = 0, hi = docs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= row) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The lane's elements lane + 32 t (t < P) of a head_dim-long row, 0 past its end.
template <int P, class T>
__device__ __forceinline__ void load_row(const T* __restrict__ p, int d, int lane, float (&r)[P]) {
#pragma unroll
  for (int t = 0; t < P; ++t) {
    const int c = lane + 32 * t;
    r[t] = c < d ? to_float(p[c]) : 0.0f;
  }
}

template <int P, class T>
__device__ __forceinline__ float warp_dot(const float (&a)[P], const T* __restrict__ b, int d, int lane) {
  float s = 0.0f;
#pragma unroll
  for (int t = 0; t < P; ++t) {
    const int c = lane + 32 * t;
    if (c < d) s += a[t] * to_float(b[c]);
  }
  return warp_sum(s);
}

template <int P, class T>
__device__ __forceinline__ void store_row(T* __restrict__ p, int d, int lane, const float (&r)[P], float factor) {
#pragma unroll
  for (int t = 0; t < P; ++t) {
    const int c = lane + 32 * t;
    if (c < d) p[c] = from_float<T>(r[t] * factor);
  }
}

struct Geometry {
  int64_t n, hq, hkv, d, docs;
};

template <int P, class T>
__global__ void __launch_bounds__(kWarps * 32)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const int64_t* __restrict__ cu, Geometry g, bool causal, float scale, T* __restrict__ out,
                   float* __restrict__ lse) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t h = blockIdx.y;
  if (row >= g.n) return;  // whole warps only
  const int d = static_cast<int>(g.d);
  const int64_t kv = h / (g.hq / g.hkv);
  const int64_t b = document_of(cu, g.docs, row);
  const int64_t j0 = cu[b], j1 = causal ? row + 1 : cu[b + 1];
  float qr[P], acc[P];
  load_row<P>(q + (row * g.hq + h) * g.d, d, lane, qr);
#pragma unroll
  for (int t = 0; t < P; ++t) acc[t] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    const T* vr = v + (j * g.hkv + kv) * g.d;
    const float s = warp_dot<P>(qr, k + (j * g.hkv + kv) * g.d, d, lane) * scale;
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new);  // 0 on the first key (m = -inf)
    const float p = expf(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int t = 0; t < P; ++t) {
      const int c = lane + 32 * t;
      if (c < d) acc[t] = acc[t] * correction + p * to_float(vr[c]);
    }
    m = m_new;
  }
  store_row<P>(out + (row * g.hq + h) * g.d, d, lane, acc, 1.0f / l);
  if (lane == 0) lse[h * g.n + row] = m + logf(l);
}

// dq of one (query row, q head) and its delta, from P recomputed with lse.
template <int P, class T>
__global__ void __launch_bounds__(kWarps * 32)
    backward_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ out, const float* __restrict__ lse, const T* __restrict__ dout,
                       const int64_t* __restrict__ cu, Geometry g, bool causal, float scale, T* __restrict__ dq,
                       float* __restrict__ delta) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t h = blockIdx.y;
  if (row >= g.n) return;
  const int d = static_cast<int>(g.d);
  const int64_t kv = h / (g.hq / g.hkv);
  const int64_t b = document_of(cu, g.docs, row);
  const int64_t j0 = cu[b], j1 = causal ? row + 1 : cu[b + 1];
  const int64_t at = (row * g.hq + h) * g.d;
  float qr[P], dor[P], acc[P];
  load_row<P>(q + at, d, lane, qr);
  load_row<P>(dout + at, d, lane, dor);
  // delta = rowsum(dout * out) = rowsum(P * dP): the shift of the softmax gradient.
  const float dl = warp_dot<P>(dor, out + at, d, lane);
  const float row_lse = lse[h * g.n + row];
#pragma unroll
  for (int t = 0; t < P; ++t) acc[t] = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    const T* kr = k + (j * g.hkv + kv) * g.d;
    const float p = expf(warp_dot<P>(qr, kr, d, lane) * scale - row_lse);
    const float ds = p * (warp_dot<P>(dor, v + (j * g.hkv + kv) * g.d, d, lane) - dl);
#pragma unroll
    for (int t = 0; t < P; ++t) {
      const int c = lane + 32 * t;
      if (c < d) acc[t] += ds * to_float(kr[c]);
    }
  }
  store_row<P>(dq + at, d, lane, acc, scale);
  if (lane == 0) delta[h * g.n + row] = dl;
}

// dk and dv of one (key row, kv head): over the q heads of the group, then the query rows that see the key.
template <int P, class T>
__global__ void __launch_bounds__(kWarps * 32)
    backward_dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const float* __restrict__ lse, const T* __restrict__ dout, const float* __restrict__ delta,
                        const int64_t* __restrict__ cu, Geometry g, bool causal, float scale, T* __restrict__ dk,
                        T* __restrict__ dv) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t kv = blockIdx.y;
  if (row >= g.n) return;
  const int d = static_cast<int>(g.d);
  const int64_t group = g.hq / g.hkv;
  const int64_t b = document_of(cu, g.docs, row);
  const int64_t i0 = causal ? row : cu[b], i1 = cu[b + 1];
  const int64_t at = (row * g.hkv + kv) * g.d;
  float kr[P], vr[P], dk_acc[P], dv_acc[P];
  load_row<P>(k + at, d, lane, kr);
  load_row<P>(v + at, d, lane, vr);
#pragma unroll
  for (int t = 0; t < P; ++t) dk_acc[t] = dv_acc[t] = 0.0f;
  for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
    for (int64_t i = i0; i < i1; ++i) {
      float qi[P], doi[P];
      load_row<P>(q + (i * g.hq + h) * g.d, d, lane, qi);
      load_row<P>(dout + (i * g.hq + h) * g.d, d, lane, doi);
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int t = 0; t < P; ++t) {
        s += qi[t] * kr[t];
        dp += doi[t] * vr[t];
      }
      const float p = expf(warp_sum(s) * scale - lse[h * g.n + i]);
      const float ds = p * (warp_sum(dp) - delta[h * g.n + i]);
#pragma unroll
      for (int t = 0; t < P; ++t) {
        dv_acc[t] += p * doi[t];
        dk_acc[t] += ds * qi[t];
      }
    }
  }
  store_row<P>(dk + at, d, lane, dk_acc, scale);
  store_row<P>(dv + at, d, lane, dv_acc, 1.0f);
}

// Calls f(std::integral_constant<int, P>) with P = ceil(head_dim / 32) registers per lane.
template <class F>
void dispatch_per_lane(int64_t d, F&& f) {
  switch ((d + 31) / 32) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: Q3VL_FAIL("attention: head_dim ", d, " is outside the kernels' range");
  }
}

Geometry check_qkv(const char* layer, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                   double scale) {
  require_float_dtype(layer, "q", q);
  const DType dt = q.dtype();
  require_device(layer, "q", q, dt, {-1, -1, -1});
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  require_device(layer, "k", k, dt, {n, -1, d});
  const int64_t hkv = k.size(1);
  require_device(layer, "v", v, dt, {n, hkv, d});
  Q3VL_CHECK(n > 0, layer, ": q ", q.str(), " has no tokens");
  Q3VL_CHECK(hq > 0 && hkv > 0 && d > 0, layer, ": heads and head_dim must be positive, got q ", q.str(), ", k ",
             k.str());
  Q3VL_CHECK(hq % hkv == 0, layer, ": q heads (", hq, ") must be a multiple of kv heads (", hkv, ")");
  Q3VL_CHECK(hq <= 65535 && hkv <= 65535, layer, ": ", hq, " q heads exceed the grid's 65535");
  Q3VL_CHECK(d <= kMaxHeadDim, layer, ": head_dim ", d, " exceeds the CUDA reference kernels' ", kMaxHeadDim);
  Q3VL_CHECK(std::isfinite(scale) && scale > 0, layer, ": scale must be positive and finite, got ", scale);
  require_device(layer, "cu_seqlens", cu_seqlens, DType::i64, {-1});
  Q3VL_CHECK(cu_seqlens.size(0) >= 2, layer, ": cu_seqlens needs at least 2 entries, got ", cu_seqlens.size(0));
  return {n, hq, hkv, d, cu_seqlens.size(0) - 1};
}

dim3 grid_for(int64_t rows, int64_t heads) {
  return dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps), static_cast<unsigned>(heads));
}

}  // namespace

void CudaLayersImpl::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                       bool causal, double scale, const Tensor& out, const Tensor& lse) const {
  const char* L = "attention_forward";
  const Geometry g = check_qkv(L, q, k, v, cu_seqlens, scale);
  const DType dt = q.dtype();
  require_device(L, "out", out, dt, {g.n, g.hq, g.d});
  require_device(L, "lse", lse, DType::f32, {g.hq, g.n});
  dispatch_float_dtype(L, dt, [&](auto tag) {
    using T = decltype(tag);
    dispatch_per_lane(g.d, [&](auto per_lane) {
      constexpr int P = decltype(per_lane)::value;
      forward_kernel<P, T><<<grid_for(g.n, g.hq), kWarps * 32, 0, context().stream>>>(
          static_cast<const T*>(q.raw()), static_cast<const T*>(k.raw()), static_cast<const T*>(v.raw()),
          cu_seqlens.device_data<const int64_t>(DType::i64), g, causal, static_cast<float>(scale),
          static_cast<T*>(out.raw()), lse.device_data<float>(DType::f32));
      Q3VL_CUDA_LAUNCHED("attention forward_kernel");
    });
  });
}

void CudaLayersImpl::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                        const Tensor& lse, const Tensor& dout, const Tensor& cu_seqlens, bool causal,
                                        double scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                        Arena& scratch) const {
  const char* L = "attention_backward";
  const Geometry g = check_qkv(L, q, k, v, cu_seqlens, scale);
  const DType dt = q.dtype();
  require_device(L, "out", out, dt, {g.n, g.hq, g.d});
  require_device(L, "lse", lse, DType::f32, {g.hq, g.n});
  require_device(L, "dout", dout, dt, {g.n, g.hq, g.d});
  require_device(L, "dq", dq, dt, {g.n, g.hq, g.d});
  require_device(L, "dk", dk, dt, {g.n, g.hkv, g.d});
  require_device(L, "dv", dv, dt, {g.n, g.hkv, g.d});
  Q3VL_CHECK(scratch.device() == Device::cuda, L, ": scratch arena '", scratch.name(),
             "' is in host memory, but the layer runs on the CUDA device");
  const size_t mark = scratch.mark();
  auto* delta = static_cast<float*>(scratch.allocate(static_cast<size_t>(g.hq * g.n) * sizeof(float)));
  const int64_t* cu = cu_seqlens.device_data<const int64_t>(DType::i64);
  const float* lp = lse.device_data<const float>(DType::f32);
  dispatch_float_dtype(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *qp = static_cast<const T*>(q.raw()), *kp = static_cast<const T*>(k.raw()),
            *vp = static_cast<const T*>(v.raw()), *dop = static_cast<const T*>(dout.raw());
    dispatch_per_lane(g.d, [&](auto per_lane) {
      constexpr int P = decltype(per_lane)::value;
      backward_dq_kernel<P, T><<<grid_for(g.n, g.hq), kWarps * 32, 0, context().stream>>>(
          qp, kp, vp, static_cast<const T*>(out.raw()), lp, dop, cu, g, causal, static_cast<float>(scale),
          static_cast<T*>(dq.raw()), delta);
      Q3VL_CUDA_LAUNCHED("attention backward_dq_kernel");
      backward_dkv_kernel<P, T><<<grid_for(g.n, g.hkv), kWarps * 32, 0, context().stream>>>(
          qp, kp, vp, lp, dop, delta, cu, g, causal, static_cast<float>(scale), static_cast<T*>(dk.raw()),
          static_cast<T*>(dv.raw()));
      Q3VL_CUDA_LAUNCHED("attention backward_dkv_kernel");
    });
  });
  // The kernels are queued on the stream: later users of this scratch memory queue behind them.
  scratch.release(mark);
}

}  // namespace q3vl::cuda
