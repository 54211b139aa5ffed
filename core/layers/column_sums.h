// Deterministic column reductions for parameter gradients: out[j] += sum_i f(i, j), parallel over column
// blocks so each output has one writer and the row order is fixed whatever the thread count.
#pragma once

#include <cstdint>

namespace q3vl::detail {

template <class T, class F>
void accumulate_columns(int64_t rows, int64_t cols, T* out, F&& term) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = blk * kBlock, j1 = j0 + kBlock < cols ? j0 + kBlock : cols;
    double acc[kBlock] = {};
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += static_cast<double>(term(i, j));
    for (int64_t j = j0; j < j1; ++j) out[j] += static_cast<T>(acc[j - j0]);
  }
}

}  // namespace q3vl::detail
