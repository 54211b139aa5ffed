// Linear layer: y = x W^T + b with HF/nn.Linear weights [out, in]. Forward saves nothing beyond its
// input x, which the caller keeps for the backward.
#pragma once

#include "core/tensor.h"

namespace q3vl {

// x [N, in], w [out, in], b [out] or undefined, y [N, out] (written).
void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y);

// dx [N, in] is written when defined; dw += dy^T x; db += column sums of dy when defined.
void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx, const Tensor& dw,
                     const Tensor& db);

}  // namespace q3vl
