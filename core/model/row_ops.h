// Element-wise and row-indexed helpers the assembled model needs between layers: residual adds and the
// placement of visual features at their token rows (scatter, DeepStack add, and their gradients).
// All take contiguous f32/f64 tensors of one dtype; idx is i64 [M] of distinct rows.
#pragma once

#include "core/tensor.h"

namespace q3vl {

// dst += src (same shape).
void add_into(const Tensor& dst, const Tensor& src);
// dst[idx[j]] = src[j]; dst [N, D], src [M, D].
void scatter_rows(const Tensor& dst, const Tensor& idx, const Tensor& src);
// dst[idx[j]] += src[j].
void scatter_add_rows(const Tensor& dst, const Tensor& idx, const Tensor& src);
// dst[j] = src[idx[j]]; dst [M, D], src [N, D].
void gather_rows(const Tensor& dst, const Tensor& src, const Tensor& idx);
// dst[idx[j]] = 0.
void zero_rows(const Tensor& dst, const Tensor& idx);

}  // namespace q3vl
