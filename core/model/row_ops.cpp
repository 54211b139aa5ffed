// Residual adds and row scatter/gather for the assembled model, with edge checks.
#include "core/model/row_ops.h"

#include <cstring>

#include "core/layer_checks.h"

namespace q3vl {

namespace {

// Checks idx against n rows and returns it; the rows are distinct by contract (visual token positions).
const int64_t* checked_index(const char* L, const Tensor& idx, int64_t m, int64_t n) {
  require(L, "idx", idx, DType::i64, {m});
  const int64_t* p = idx.data<int64_t>();
  for (int64_t j = 0; j < m; ++j)
    Q3VL_CHECK(p[j] >= 0 && p[j] < n, L, ": idx[", j, "] = ", p[j], " outside [0, ", n, ")");
  return p;
}

template <class Op>
void rows(const char* L, const Tensor& big, const Tensor& idx, const Tensor& small, Op op) {
  const DType dt = big.dtype();
  require(L, "rows", big, dt, {-1, -1});
  const int64_t n = big.size(0), d = big.size(1);
  require(L, "packed rows", small, dt, {-1, d});
  const int64_t m = small.size(0);
  const int64_t* p = checked_index(L, idx, m, n);
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    T* b = big.data<T>();
    T* s = small.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < m; ++j) op(b + p[j] * d, s + j * d, d);
  });
}

}  // namespace

void add_into(const Tensor& dst, const Tensor& src) {
  const char* L = "add_into";
  const DType dt = dst.dtype();
  Q3VL_CHECK(dst.shape() == src.shape(), L, ": shapes ", dst.shape().str(), " and ", src.shape().str(), " differ");
  require_dtype(L, "src", src, dt);
  Q3VL_CHECK(dst.is_contiguous() && src.is_contiguous(), L, ": tensors must be contiguous");
  const int64_t n = dst.numel();
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    T* d = dst.data<T>();
    const T* s = src.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  });
}

void scatter_rows(const Tensor& dst, const Tensor& idx, const Tensor& src) {
  rows("scatter_rows", dst, idx, src, [](auto* b, auto* s, int64_t d) { std::memcpy(b, s, d * sizeof(*b)); });
}

void scatter_add_rows(const Tensor& dst, const Tensor& idx, const Tensor& src) {
  rows("scatter_add_rows", dst, idx, src, [](auto* b, auto* s, int64_t d) {
    for (int64_t k = 0; k < d; ++k) b[k] += s[k];
  });
}

void gather_rows(const Tensor& dst, const Tensor& src, const Tensor& idx) {
  rows("gather_rows", src, idx, dst, [](auto* b, auto* s, int64_t d) { std::memcpy(s, b, d * sizeof(*b)); });
}

void zero_rows(const Tensor& dst, const Tensor& idx) {
  const char* L = "zero_rows";
  require(L, "dst", dst, dst.dtype(), {-1, -1});
  const int64_t n = dst.size(0), d = dst.size(1), m = idx.numel();
  const int64_t* p = checked_index(L, idx, m, n);
  dispatch_float(L, dst.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* b = dst.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < m; ++j) std::memset(b + p[j] * d, 0, d * sizeof(T));
  });
}

}  // namespace q3vl
