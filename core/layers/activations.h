// Element-wise activations with their backward: GELU (tanh approximation, as HF gelu_pytorch_tanh, and
// exact erf), SiLU, and the SiLU-gated SwiGLU product used by dense and expert MLPs.
#pragma once

#include "core/tensor.h"

namespace q3vl {

enum class Gelu { tanh, erf };

// y = gelu(x) elementwise, any contiguous shape; y may alias x.
void gelu_forward(Gelu kind, const Tensor& x, const Tensor& y);
// dx = dy * gelu'(x); dx may alias dy.
void gelu_backward(Gelu kind, const Tensor& x, const Tensor& dy, const Tensor& dx);

// SwiGLU over a fused [N, 2I] input whose first I columns are the gate and last I the up projection
// (the layout of HF's fused gate_up_proj): y [N, I] = silu(gate) * up.
void swiglu_forward(const Tensor& gate_up, const Tensor& y);
// dgate_up [N, 2I] written from dy [N, I].
void swiglu_backward(const Tensor& gate_up, const Tensor& dy, const Tensor& dgate_up);

}  // namespace q3vl
