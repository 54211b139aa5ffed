// The lm_head GEMM fused with the softmax cross-entropy, in vocabulary chunks of kVocabChunk words: each
// chunk's logits x w_chunk^T are formed, folded into a per-row online max / sum of exponentials, and dropped,
// so the [tokens, vocab] logits (151,936 words for Qwen3) never exist whole. The backward recomputes each
// chunk's logits from x and w. Equal, within fp32 rounding, to linear_forward + cross_entropy_forward and
// cross_entropy_backward + linear_backward (core/layers/linear.h, cross_entropy.h). Device tensors go to the
// CUDA backend, whose lse is f32 under bf16 x and w.
#pragma once

#include <cstdint>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl {

// x [N, H], w [V, H] (the lm_head rows), labels i64 [N] (kIgnoreIndex or in [0, V)), lse [N] written (the
// log-sum-exp of each row's logits, saved for the backward; 0 on ignored rows). Returns the sum of the per-token
// losses over non-ignored tokens and sets `count` to their number. Chunk buffers come from `scratch` and are
// released before returning. On the device this is the one place the forward reads back to the host (the
// loss sum, the count and the label check).
double lm_head_cross_entropy_forward(const Tensor& x, const Tensor& w, const Tensor& labels, const Tensor& lse,
                                     int64_t& count, Arena& scratch);

// dx [N, H] written and dw [V, H] accumulated (+=) with the gradient of scale * (the loss sum), e.g. scale =
// 1 / count for the mean; ignored rows contribute nothing. lse is the forward's. dw is f32 or w's dtype on the
// device. Chunk buffers come from `scratch` and are released before returning.
void lm_head_cross_entropy_backward(const Tensor& x, const Tensor& w, const Tensor& labels, const Tensor& lse,
                                    double scale, const Tensor& dx, const Tensor& dw, Arena& scratch);

// Scratch bytes either direction takes for N tokens, hidden size H and vocabulary V in `dtype` (the larger of
// the CPU's and the CUDA backend's needs), for sizing arenas up front.
size_t lm_head_cross_entropy_scratch_bytes(int64_t n, int64_t hidden, int64_t vocab, DType dtype);

}  // namespace q3vl
