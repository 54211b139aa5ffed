// Embedding gather and its deterministic scatter-add backward (device tensors go to the CUDA backend).
#include "core/layers/embedding.h"

#include <algorithm>

#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"

namespace q3vl {

namespace {
void require_ids(const char* layer, const Tensor& ids, int64_t vocab) {
  require(layer, "ids", ids, DType::i64, {-1});
  const int64_t* p = ids.data<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    Q3VL_CHECK(p[i] >= 0 && p[i] < vocab, layer, ": ids[", i, "] = ", p[i], " is outside the vocabulary [0, ", vocab, ")");
}
}  // namespace

void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& y) {
  if (on_cuda({&ids, &table, &y})) return cuda_layers().embedding_forward(ids, table, y);
  const char* L = "embedding_forward";
  const DType dt = table.dtype();
  require(L, "table", table, dt, {-1, -1});
  const int64_t vocab = table.size(0), h = table.size(1);
  require_ids(L, ids, vocab);
  const int64_t n = ids.numel();
  require(L, "y", y, dt, {n, h});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t* id = ids.data<int64_t>();
    const T* tp = table.data<T>();
    T* yp = y.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < h; ++j) yp[i * h + j] = tp[id[i] * h + j];
  });
}

void embedding_backward(const Tensor& ids, const Tensor& dy, const Tensor& dtable) {
  if (on_cuda({&ids, &dy, &dtable})) return cuda_layers().embedding_backward_rows(ids, dy, 0, dtable);
  const char* L = "embedding_backward";
  require(L, "dtable", dtable, dtable.dtype(), {-1, -1});
  require_ids(L, ids, dtable.size(0));
  embedding_backward_rows(ids, dy, 0, dtable);
}

void embedding_backward_rows(const Tensor& ids, const Tensor& dy, int64_t row_begin, const Tensor& dtable) {
  if (on_cuda({&ids, &dy, &dtable})) return cuda_layers().embedding_backward_rows(ids, dy, row_begin, dtable);
  const char* L = "embedding_backward_rows";
  const DType dt = dtable.dtype();
  require(L, "dtable", dtable, dt, {-1, -1});
  const int64_t rows = dtable.size(0), h = dtable.size(1);
  const int64_t n = ids.numel();
  require(L, "dy", dy, dt, {n, h});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t* id = ids.data<int64_t>();
    const T* g = dy.data<T>();
    T* dtp = dtable.data<T>();
    // Parallel over hidden columns, tokens in order: repeated ids accumulate in a fixed order.
    constexpr int64_t kBlock = 64;
    const int64_t blocks = (h + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t j0 = blk * kBlock, j1 = std::min(h, j0 + kBlock);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = id[i] - row_begin;
        if (r < 0 || r >= rows) continue;
        for (int64_t j = j0; j < j1; ++j) dtp[r * h + j] += g[i * h + j];
      }
    }
  });
}

}  // namespace q3vl
