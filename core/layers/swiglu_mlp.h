// Dense SwiGLU MLP (HF Qwen3VLMoeTextMLP): y = down_proj(silu(gate_proj(x)) * up_proj(x)), no biases, with its
// backward. The two input projections are written side by side into one [N, 2I] block (gate, then up: the fused
// layout swiglu_forward expects). Under tensor parallelism the caller passes this rank's column slices of
// gate/up and row slice of down and sums y (and dx) over the group itself.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl {

// Parameters, and with the same type their gradients: nn.Linear weights gate_proj and up_proj [I, H],
// down_proj [H, I].
struct SwigluMlpWeights {
  Tensor gate_proj, up_proj, down_proj;
};

// What the forward keeps for the backward (the caller also keeps x).
struct SwigluMlpSaved {
  Tensor gate_up;  // [N, 2I] x gate_proj^T | x up_proj^T
  Tensor act;      // [N, I] silu(gate) * up, the input of down_proj
};

// Bytes swiglu_mlp_forward carves from its `saved` arena for n tokens and I = inter.
size_t swiglu_mlp_saved_bytes(int64_t n, int64_t inter, DType dtype);
// Bytes swiglu_mlp_backward takes from its scratch arena (released before it returns).
size_t swiglu_mlp_scratch_bytes(int64_t n, int64_t inter, DType dtype);

// x [N, H]; y [N, H] written. Activations for the backward are carved from `saved`.
SwigluMlpSaved swiglu_mlp_forward(const SwigluMlpWeights& w, const Tensor& x, Arena& saved, const Tensor& y);

// dx [N, H] written; the three weight gradients accumulated (+=).
void swiglu_mlp_backward(const SwigluMlpWeights& w, const Tensor& x, const SwigluMlpSaved& saved, const Tensor& dy,
                         const Tensor& dx, const SwigluMlpWeights& grads, Arena& scratch);

}  // namespace q3vl
