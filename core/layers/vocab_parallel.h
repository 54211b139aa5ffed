// Vocabulary-parallel token embedding and softmax cross-entropy (tensor parallelism, Megatron style): the
// vocabulary V is split into tp.size() equal contiguous ranges and tp rank t holds rows
// [t * V/P, (t + 1) * V/P) of the embedding table and of lm_head, so its logits are the columns of its range.
// Ids and labels are global on every rank; vocab_begin is the first id of this rank's range.
//
// The cross-entropy never gathers logits: each rank reduces its columns to a per-row max and sum of
// exponentials, and the ranks combine those (and the target logit, held by exactly one rank) with two small
// all-reduces per call whatever the data (one of N floats, one of 2N doubles), so every rank of the group
// makes the same calls.
#pragma once

#include <cstdint>

#include "core/layers/cross_entropy.h"
#include "core/layers/tensor_parallel.h"
#include "core/tensor.h"

namespace q3vl {

// ids i64 [N] in [0, V) with V = table_local rows x tp.size(); table_local [V/P, H]; y [N, H] written: this
// rank's rows for the ids in [vocab_begin, vocab_begin + V/P), zeros elsewhere, then all-reduced over tp.
// vocab_begin must be tp.rank() x V/P.
void vocab_parallel_embedding_forward(const Tensor& ids, const Tensor& table_local, int64_t vocab_begin,
                                      const Tensor& y, TensorParallel& tp);

// dtable_local[id - vocab_begin] += dy[i] for the ids in this rank's range, tokens in order (deterministic);
// no communication.
void vocab_parallel_embedding_backward(const Tensor& ids, const Tensor& dy, int64_t vocab_begin,
                                       const Tensor& dtable_local);

// logits_local [N, V/P] (this rank's columns), labels i64 [N] (kIgnoreIndex or a global id in [0, V)), lse [N]
// written with the global log-sum-exp (0 on ignored rows, which are skipped). The returned sum and count are
// bitwise the same on every rank and equal cross_entropy_forward on the whole logits up to fp32 summation
// order. vocab_begin must be tp.rank() x V/P.
CrossEntropySum vocab_parallel_cross_entropy_forward(const Tensor& logits_local, const Tensor& labels,
                                                     int64_t vocab_begin, const Tensor& lse, TensorParallel& tp);

// dlogits_local = scale * (softmax - onehot(label)) on this rank's columns of the counted rows, 0 on ignored
// rows, from the lse of the forward; no communication. dlogits_local may be the same tensor as logits_local.
void vocab_parallel_cross_entropy_backward(const Tensor& logits_local, const Tensor& labels, const Tensor& lse,
                                           int64_t vocab_begin, double scale, const Tensor& dlogits_local);

}  // namespace q3vl
