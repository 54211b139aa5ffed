// RMSNorm and LayerNorm over the last dimension. Forward saves per-row statistics (rstd, mean) that the
// backward needs; the caller keeps x.
#pragma once

#include "core/tensor.h"

namespace q3vl {

// RMSNorm as HF Qwen3: y = w * (x * rsqrt(mean(x^2) + eps)), statistics in fp32 (or f64 for tests).
// x [N, D], w [D], y [N, D] written, rstd [N] written (saved for the backward).
void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y, const Tensor& rstd);
// dx [N, D] written when defined; dw += ... when defined (frozen weights pass an undefined dw).
void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor& dx,
                      const Tensor& dw);

// LayerNorm with weight and bias: y = (x - mean) * rstd * w + b.
// x [N, D], w [D], b [D], y [N, D]; mean [N] and rstd [N] written (saved for the backward).
void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, const Tensor& y,
                       const Tensor& mean, const Tensor& rstd);
// dx written when defined; dw += and db += when defined.
void layernorm_backward(const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd, const Tensor& dy,
                        const Tensor& dx, const Tensor& dw, const Tensor& db);

}  // namespace q3vl
