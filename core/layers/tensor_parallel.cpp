// tp_all_reduce: the tensor form of TensorParallel::all_reduce_sum.
#include "core/layers/tensor_parallel.h"

#include "core/check.h"
#include "core/layer_checks.h"
#include "core/tensor.h"

namespace q3vl {

void tp_all_reduce(TensorParallel* tp, const Tensor& t) {
  if (tp == nullptr || tp->size() == 1) return;
  const char* L = "tp_all_reduce";
  Q3VL_CHECK(t.is_contiguous(), L, ": ", t.str(), " is not contiguous");
  dispatch_float(L, t.dtype(), [&](auto tag) {
    using T = decltype(tag);
    tp->all_reduce_sum(std::span<T>(t.data<T>(), static_cast<size_t>(t.numel())));
  });
}

}  // namespace q3vl
