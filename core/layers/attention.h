// Scaled-dot-product attention over packed variable-length documents with grouped-query heads, computed
// flash-style on the CPU: query tiles stream over key/value tiles with an online softmax, so no [N, N]
// score matrix is ever formed, and only the per-row log-sum-exp is saved for the backward, which
// recomputes the probabilities tile by tile.
//
// Layout: tokens first, q [N, Hq, D], k and v [N, Hkv, D]; q head h reads kv head h / (Hq / Hkv).
// cu_seqlens [B + 1] (i64, 0 = c0 < c1 < ... < cB = N) cuts the tokens into documents; a token attends
// only to tokens of its own document, and with `causal` only to those at or before it.
#pragma once

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl {

// Throws unless cu_seqlens is an i64 [B + 1] vector, B >= 1, starting at 0, strictly increasing, ending at n.
void check_cu_seqlens(const char* layer, const Tensor& cu_seqlens, int64_t n);

// out [N, Hq, D] and lse [Hq, N] (natural-log log-sum-exp of the scaled scores of each query row) written.
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, bool causal,
                       double scale, const Tensor& out, const Tensor& lse);

// dq, dk, dv (shapes of q, k, v) written from dout and the forward's out and lse. Scratch comes from
// `scratch` and is released before returning.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, const Tensor& cu_seqlens, bool causal, double scale, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv, Arena& scratch);

// Bytes attention_backward takes from its scratch arena (per-thread tiles for omp_get_max_threads()
// threads), for sizing arenas up front.
size_t attention_backward_scratch_bytes(DType dtype);
// Bytes attention_backward takes from a device scratch arena for N tokens and Hq query heads (the f32
// rowsum(dout * out) of every query row, core/kernels/cuda/attention.cu), alignment included.
size_t attention_backward_device_scratch_bytes(int64_t tokens, int64_t q_heads);

}  // namespace q3vl
