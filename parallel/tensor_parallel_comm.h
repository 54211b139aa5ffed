// CommTensorParallel: the model's TensorParallel (core/layers/tensor_parallel.h) over a communicator (the
// process grid's tp ranks).
#pragma once

#include "core/layers/tensor_parallel.h"
#include "parallel/comm.h"

namespace q3vl::parallel {

class CommTensorParallel final : public TensorParallel {
 public:
  explicit CommTensorParallel(Comm& comm) : comm_(comm) {}
  int size() const override { return comm_.size(); }
  int rank() const override { return comm_.rank(); }
  void all_reduce_sum(std::span<float> data) override { comm_.all_reduce_sum(data); }
  void all_reduce_sum(std::span<double> data) override { comm_.all_reduce_sum(data); }
  void all_reduce_max(std::span<float> data) override { comm_.all_reduce_max(data); }

 private:
  Comm& comm_;
};

}  // namespace q3vl::parallel
