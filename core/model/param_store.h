// ParamStore: every parameter of a Qwen3-VL(-MoE) model in one arena, laid out in model_param_specs order,
// reachable by HF checkpoint key. The model's weights and its gradients are two stores of the same layout;
// checkpoint readers and optimizers walk `specs()` and `tensor(i)` side by side.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/arena.h"
#include "core/model/param_specs.h"
#include "core/tensor.h"

namespace q3vl {

class ParamStore {
 public:
  // Allocates (uninitialised) tensors of `dtype` for every spec; `name` labels the arena in errors.
  ParamStore(const ModelConfig& config, DType dtype, const std::string& name);

  // Bytes the arena of a store takes for `config` (each tensor kAlign-aligned).
  static size_t bytes(const ModelConfig& config, DType dtype);

  DType dtype() const { return dtype_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  size_t size() const { return tensors_.size(); }
  const Tensor& tensor(size_t i) const { return tensors_[i]; }
  // The tensor of an HF key, shaped as on disk; an unknown key is an error naming it.
  const Tensor& at(std::string_view hf_key) const;
  bool contains(std::string_view hf_key) const;
  int64_t numel() const;

  void fill_zero();
  // Deterministic initialisation by kind: embedding, matrix and experts tensors get normal(0, std) from
  // Philox(seed, stream = the tensor's index in specs()), element k taking sequence value k; norm weights
  // get 1 and biases 0. The same seed gives the same weights in f32 and f64 (up to rounding to f32).
  void init(uint64_t seed, double std);

 private:
  DType dtype_;
  std::vector<ParamSpec> specs_;
  std::unique_ptr<Arena> arena_;
  std::vector<Tensor> tensors_;
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace q3vl
