// ParamStore: every parameter of a Qwen3-VL(-MoE) model in one mapping, laid out in model_param_specs order,
// reachable by HF checkpoint key. The model's weights and its gradients are two stores of the same layout;
// checkpoint readers and optimizers walk `specs()` and `tensor(i)` side by side.
//
// The mapping is reserved, not committed: anonymous pages are zero and take memory only once written, and each
// FSDP unit (param_units.h) starts on its own page, so a sharded run that writes only the units it has
// gathered, and discards them after use, holds only those in memory while every tensor keeps a fixed address.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/model/param_specs.h"
#include "core/model/param_units.h"
#include "core/model/tp_layout.h"
#include "core/tensor.h"

namespace q3vl {

class ParamStore {
 public:
  // Maps zero-filled tensors of `dtype` for every spec, of their tensor-parallel local shapes under `tp`
  // (tp_layout.h; whole tensors by default); `name` labels the store in errors.
  ParamStore(const ModelConfig& config, DType dtype, const std::string& name, const TpLayout& tp = {});
  ~ParamStore();
  ParamStore(const ParamStore&) = delete;
  ParamStore& operator=(const ParamStore&) = delete;

  // Bytes of the mapping of a store for `config` (tensors 64-byte aligned, units page-aligned).
  static size_t bytes(const ModelConfig& config, DType dtype, const TpLayout& tp = {});

  DType dtype() const { return dtype_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  size_t size() const { return tensors_.size(); }
  const Tensor& tensor(size_t i) const { return tensors_[i]; }
  // The tensor of an HF key, shaped as on disk; an unknown key is an error naming it.
  const Tensor& at(std::string_view hf_key) const;
  bool contains(std::string_view hf_key) const;
  int64_t numel() const;

  const std::string& name() const { return name_; }
  const TpLayout& tp() const { return tp_; }
  const std::vector<ParamUnit>& units() const { return units_; }
  // Returns the pages of a unit to the system: its tensors read as zeros until written again.
  void discard_unit(size_t unit);

  void fill_zero();
  // Deterministic initialisation by kind: embedding, matrix and experts tensors get normal(0, std) from
  // Philox(seed, stream = the tensor's index in specs()), element k of the global tensor taking sequence
  // value k (a tensor-parallel slice takes the values of its global elements); norm weights get 1 and biases
  // 0. The same seed gives the same weights in f32 and f64 (up to rounding to f32) and in every layout.
  void init(uint64_t seed, double std);
  // The same for specs [first, end) only (a sharded run initialises one unit at a time).
  void init(uint64_t seed, double std, size_t first, size_t end);

 private:
  std::string name_;
  TpLayout tp_;
  DType dtype_;
  std::vector<ParamSpec> specs_;
  std::vector<ParamUnit> units_;
  std::vector<size_t> unit_begin_, unit_end_;  // byte offsets of each unit in the mapping
  void* base_ = nullptr;
  size_t mapped_ = 0;
  std::vector<Tensor> tensors_;
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace q3vl
