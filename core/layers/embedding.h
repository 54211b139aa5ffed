// Token embedding: gather rows of the [V, H] table; backward scatter-adds into the table gradient in a
// fixed order (deterministic).
#pragma once

#include "core/tensor.h"

namespace q3vl {

// ids i64 [N] in [0, V); table [V, H]; y [N, H] written. An id out of range is an error naming it.
void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& y);
// dtable[ids[i]] += dy[i].
void embedding_backward(const Tensor& ids, const Tensor& dy, const Tensor& dtable);
// The same for a table holding rows [row_begin, row_begin + rows) of the vocabulary (a vocabulary-parallel
// slice): ids outside that range are skipped.
void embedding_backward_rows(const Tensor& ids, const Tensor& dy, int64_t row_begin, const Tensor& dtable);

}  // namespace q3vl
