// Token embedding on the device: a gather of table rows, and its backward as deterministic keyed row sums
// (reductions.cuh: each touched row of dtable has one owning block that adds its tokens' dy rows in token
// order, no atomics, no scratch memory).
//
// Ids are validated on the host (the batch plan checks them against the vocabulary before upload): the device
// cannot report a bad id without a host synchronisation. So nothing here reads out of bounds either way: the
// forward writes a NaN row for an id outside the table (caught by the step's finiteness check, never a
// plausible value), and the backward skips such ids, as embedding_backward_rows skips ids outside its slice.
#include <cmath>

#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/layers_impl.h"
#include "core/kernels/cuda/reductions.cuh"

namespace q3vl::cuda {

namespace {

template <class T>
__global__ void embedding_gather_kernel(const int64_t* ids, const T* table, int64_t vocab, int64_t n, int64_t h,
                                        T* y) {
  const int64_t total = n * h;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t id = ids[k / h];
    y[k] = id >= 0 && id < vocab ? table[id * h + k % h] : from_float<T>(NAN);
  }
}

}  // namespace

void CudaLayersImpl::embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& y) const {
  const char* L = "embedding_forward";
  require_float_dtype(L, "table", table);
  const DType dt = table.dtype();
  require_device(L, "table", table, dt, {-1, -1});
  const int64_t vocab = table.size(0), h = table.size(1);
  require_device(L, "ids", ids, DType::i64, {-1});
  const int64_t n = ids.size(0);
  require_device(L, "y", y, dt, {n, h});
  if (n * h == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    embedding_gather_kernel<T><<<blocks_for(n * h), kThreads, 0, context().stream>>>(
        static_cast<const int64_t*>(ids.raw()), static_cast<const T*>(table.raw()), vocab, n, h,
        static_cast<T*>(y.raw()));
    Q3VL_CUDA_LAUNCHED("embedding_gather_kernel");
  });
}

void CudaLayersImpl::embedding_backward_rows(const Tensor& ids, const Tensor& dy, int64_t row_begin,
                                             const Tensor& dtable) const {
  const char* L = "embedding_backward_rows";
  require_float_dtype(L, "dy", dy);
  const DType dt = dy.dtype();
  require_device(L, "ids", ids, DType::i64, {-1});
  const int64_t n = ids.size(0);
  require_device(L, "dy", dy, dt, {n, -1});
  const int64_t h = dy.size(1);
  Q3VL_CHECK(dtable.defined(), L, ": dtable is missing");
  require_grad_dtype(L, "dtable", dtable, dt);
  require_device(L, "dtable", dtable, dtable.dtype(), {-1, h});
  const int64_t rows = dtable.size(0);
  Q3VL_CHECK(n < (int64_t{1} << 31) && rows < (int64_t{1} << 31), L, ": ", n, " tokens or ", rows,
             " table rows exceed the grid");
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    dispatch_float_dtype(L, dtable.dtype(), [&](auto g) {
      using G = decltype(g);
      keyed_row_sums<T, float, G>(static_cast<const int64_t*>(ids.raw()), n, 1, nullptr,
                                  static_cast<const T*>(dy.raw()), row_begin, rows, h,
                                  static_cast<G*>(dtable.raw()));
    });
  });
}

}  // namespace q3vl::cuda
