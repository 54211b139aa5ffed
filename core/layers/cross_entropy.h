// Softmax cross-entropy over a large vocabulary (151,936 for Qwen3) with ignore index -100.
// The forward streams each row in vocabulary chunks with an online max/sum, so no probability matrix is
// formed; the backward writes the gradient into dlogits, which may alias logits, so the full
// [tokens, vocab] probabilities never exist beside the logits.
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace q3vl {

constexpr int64_t kIgnoreIndex = -100;
constexpr int64_t kVocabChunk = 8192;

struct CrossEntropySum {
  double sum = 0;     // sum of per-token losses over non-ignored tokens
  int64_t count = 0;  // non-ignored tokens
  double mean() const { return count > 0 ? sum / static_cast<double>(count) : 0.0; }
};

// logits [N, V], labels i64 [N] (kIgnoreIndex or in [0, V)), lse [N] written (saved for the backward; 0 on
// ignored rows, which are skipped). f32 uses a vectorised expf (core/kernels/cpu/vector_exp.h), f64 libm exp.
CrossEntropySum cross_entropy_forward(const Tensor& logits, const Tensor& labels, const Tensor& lse);

// max and sum of exp(row[j] - max) over one logits row of `width` values, in vocabulary chunks (the
// single-pass online log-sum-exp both cross-entropies use); T is float or double.
template <class T>
void row_max_and_sum_exp(const T* row, int64_t width, double& max, double& sum);

// dlogits[i] = scale * (softmax(logits[i]) - onehot(labels[i])) for valid rows, 0 for ignored rows.
// scale is dloss / normaliser, e.g. 1 / count for the mean (or 1 / global token count when accumulating
// micro-batches). dlogits may be the same tensor as logits.
void cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse, double scale,
                            const Tensor& dlogits);

}  // namespace q3vl
