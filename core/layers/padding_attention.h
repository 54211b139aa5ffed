// Attention of padding queries as HF's masks compute it: a padding token (after the real tokens of its
// document) attends, without a causal limit, to the real tokens of its document only, where the varlen
// attention (attention.h) would let it see the earlier padding too. The text decoder overwrites the padding rows
// of its attention output with these. Forward only: padding takes no loss, so the gradient reaching these rows
// is zero and they need no backward.
//
// Layout as in attention.h: q [N, Hq, D], k and v [N, Hkv, D] (the rotated attention inputs), GQA with q head h
// reading kv head h / (Hq / Hkv).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl {

// The padding rows of one document: out [P, Hq, D] = softmax(q k^T * scale) v for its P padding queries over
// its `real` real tokens, the document starting at token doc_begin.
void padding_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t doc_begin, int64_t real,
                       double scale, const Tensor& out);

// Every document's padding rows through the output projection: for each document d (cu_seqlens i64 [D + 1],
// doc_real i64 [D] real tokens of each) with padding, the rows of y [N, hidden] at its padding tokens are
// overwritten with padding_attention(...) wo^T (wo [hidden, Hq*D], no bias). Scratch for one document's
// attention rows comes from `scratch` and is released before returning.
void padding_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                               const Tensor& doc_real, double scale, const Tensor& wo, const Tensor& y,
                               Arena& scratch);

// Bytes padding_attention_forward takes from its scratch arena when no document has more than max_padding
// padding tokens.
size_t padding_attention_scratch_bytes(int64_t max_padding, int64_t q_heads, int64_t head_dim, DType dtype);

}  // namespace q3vl
