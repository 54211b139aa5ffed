// The vision tower's bilinearly resampled position embedding on the device. Forward: each patch's row is the
// weighted sum of its four table rows, in corner order c = 0..3 as the CPU. Backward: dtable[idx[p, c]] +=
// weight[p, c] * dy[p] as deterministic keyed row sums over the (patch, corner) entries (reductions.cuh): each
// touched table row has one owning block that adds its terms in patch-then-corner order, the CPU's order.
//
// table/dy/y are f32 or bf16; weight is f32 (as vision_pos_embed_plan makes it; the accurate choice under bf16)
// or the table's dtype; dtable is f32 or dy's dtype. The corner indices are validated on the host where the
// plan is made: the device reports nothing without a host synchronisation, so an index outside the table
// yields a NaN row in the forward and is skipped in the backward, never an out-of-bounds access.
#include <cmath>

#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/layers_impl.h"
#include "core/kernels/cuda/reductions.cuh"

namespace q3vl::cuda {

namespace {

template <class T, class W>
__global__ void pos_embed_gather_kernel(const T* table, int64_t rows, const int64_t* idx, const W* weight,
                                        int64_t patches, int64_t dim, T* y) {
  const int64_t total = patches * dim;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = k / dim, j = k % dim;
    float acc = 0.0f;
    for (int c = 0; c < 4; ++c) {
      const int64_t r = idx[4 * p + c];
      const float v = r >= 0 && r < rows ? to_float(table[r * dim + j]) : NAN;
      acc = c == 0 ? to_float(weight[4 * p]) * v : acc + to_float(weight[4 * p + c]) * v;
    }
    y[k] = from_float<T>(acc);
  }
}

// Calls f(W{}) for the weight dtype: f32, or the activations' dtype dt.
template <class F>
void dispatch_weight(const char* layer, const Tensor& weight, DType dt, F&& f) {
  Q3VL_CHECK(weight.dtype() == DType::f32 || weight.dtype() == dt, layer, ": weight has dtype ",
             dtype_name(weight.dtype()), ", expected f32 or ", dtype_name(dt));
  dispatch_float_dtype(layer, weight.dtype(), f);
}

}  // namespace

void CudaLayersImpl::vision_pos_embed_forward(const Tensor& table, const Tensor& idx, const Tensor& weight,
                                              const Tensor& y) const {
  const char* L = "vision_pos_embed_forward";
  require_float_dtype(L, "table", table);
  const DType dt = table.dtype();
  require_device(L, "table", table, dt, {-1, -1});
  const int64_t rows = table.size(0), dim = table.size(1);
  require_device(L, "idx", idx, DType::i64, {-1, 4});
  const int64_t patches = idx.size(0);
  Q3VL_CHECK(weight.defined(), L, ": weight is missing");
  require_device(L, "weight", weight, weight.dtype(), {patches, 4});
  require_device(L, "y", y, dt, {patches, dim});
  if (patches * dim == 0) return;
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    dispatch_weight(L, weight, dt, [&](auto w) {
      using W = decltype(w);
      pos_embed_gather_kernel<T, W><<<blocks_for(patches * dim), kThreads, 0, context().stream>>>(
          static_cast<const T*>(table.raw()), rows, static_cast<const int64_t*>(idx.raw()),
          static_cast<const W*>(weight.raw()), patches, dim, static_cast<T*>(y.raw()));
      Q3VL_CUDA_LAUNCHED("pos_embed_gather_kernel");
    });
  });
}

void CudaLayersImpl::vision_pos_embed_backward(const Tensor& idx, const Tensor& weight, const Tensor& dy,
                                               const Tensor& dtable) const {
  const char* L = "vision_pos_embed_backward";
  require_float_dtype(L, "dy", dy);
  const DType dt = dy.dtype();
  require_device(L, "dy", dy, dt, {-1, -1});
  const int64_t patches = dy.size(0), dim = dy.size(1);
  require_device(L, "idx", idx, DType::i64, {patches, 4});
  Q3VL_CHECK(weight.defined(), L, ": weight is missing");
  require_device(L, "weight", weight, weight.dtype(), {patches, 4});
  Q3VL_CHECK(dtable.defined(), L, ": dtable is missing");
  require_grad_dtype(L, "dtable", dtable, dt);
  require_device(L, "dtable", dtable, dtable.dtype(), {-1, dim});
  const int64_t rows = dtable.size(0);
  Q3VL_CHECK(4 * patches < (int64_t{1} << 31) && rows < (int64_t{1} << 31), L, ": ", patches, " patches or ",
             rows, " table rows exceed the grid");
  dispatch_float_dtype(L, dt, [&](auto t) {
    using T = decltype(t);
    dispatch_weight(L, weight, dt, [&](auto w) {
      using W = decltype(w);
      dispatch_float_dtype(L, dtable.dtype(), [&](auto g) {
        using G = decltype(g);
        keyed_row_sums<T, W, G>(static_cast<const int64_t*>(idx.raw()), 4 * patches, 4,
                                static_cast<const W*>(weight.raw()), static_cast<const T*>(dy.raw()), 0, rows,
                                dim, static_cast<G*>(dtable.raw()));
      });
    });
  });
}

}  // namespace q3vl::cuda
