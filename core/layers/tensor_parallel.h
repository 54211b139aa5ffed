// TensorParallel: the collectives tensor-parallel layers need (and tp_all_reduce of a tensor), over the ranks that split one layer's heads and
// FFN columns (and the vocabulary). Implemented over a communicator in parallel/ (core never sees MPI).
//
// Conventions of the tensor-parallel layers (Megatron): activations entering a column-parallel projection are
// whole on every rank; a row-parallel projection's output is a partial sum, all-reduced before the residual
// add, and its bias is added by tp rank 0 only; in the backward, the input gradient of a column-parallel
// projection is partial and all-reduced. Every rank of the group calls the operations in the same order.
#pragma once

#include <span>

namespace q3vl {

class Tensor;

class TensorParallel {
 public:
  virtual ~TensorParallel() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // In place, element-wise over the ranks; bitwise the same result on every rank.
  virtual void all_reduce_sum(std::span<float> data) = 0;
  virtual void all_reduce_sum(std::span<double> data) = 0;
  virtual void all_reduce_max(std::span<float> data) = 0;
};

// In place sum over the tensor-parallel ranks of a contiguous f32/f64 tensor; nothing when tp is null.
void tp_all_reduce(TensorParallel* tp, const Tensor& t);

}  // namespace q3vl
