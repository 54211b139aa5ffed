// ParamStore: parameters of a model in one arena in model_param_specs order, looked up by HF key.
#include "core/model/param_store.h"

#include "core/check.h"
#include "core/rng.h"

namespace q3vl {

size_t ParamStore::bytes(const ModelConfig& config, DType dtype) {
  size_t total = 0;
  for (const ParamSpec& s : model_param_specs(config))
    total += Arena::aligned(static_cast<size_t>(s.numel()) * dtype_size(dtype));
  return total;
}

ParamStore::ParamStore(const ModelConfig& config, DType dtype, const std::string& name)
    : dtype_(dtype), specs_(model_param_specs(config)) {
  Q3VL_CHECK(dtype == DType::f32 || dtype == DType::f64, "ParamStore '", name, "': dtype ", dtype_name(dtype),
             " is not f32 or f64");
  arena_ = std::make_unique<Arena>(name, bytes(config, dtype));
  tensors_.reserve(specs_.size());
  for (size_t i = 0; i < specs_.size(); ++i) {
    tensors_.push_back(Tensor::empty(*arena_, specs_[i].shape, dtype));
    index_.emplace(specs_[i].hf_key, i);
  }
}

const Tensor& ParamStore::at(std::string_view hf_key) const {
  const auto it = index_.find(std::string(hf_key));
  Q3VL_CHECK(it != index_.end(), "ParamStore '", arena_->name(), "': no parameter '", hf_key, "'");
  return tensors_[it->second];
}

bool ParamStore::contains(std::string_view hf_key) const { return index_.count(std::string(hf_key)) != 0; }

int64_t ParamStore::numel() const {
  int64_t n = 0;
  for (const Tensor& t : tensors_) n += t.numel();
  return n;
}

void ParamStore::fill_zero() {
  for (const Tensor& t : tensors_) fill(t, 0.0);
}

void ParamStore::init(uint64_t seed, double std) {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    switch (specs_[i].kind) {
      case ParamKind::embedding:
      case ParamKind::matrix:
      case ParamKind::experts: fill_normal(tensors_[i], Philox(seed, i), 0.0, std); break;
      case ParamKind::norm: fill(tensors_[i], 1.0); break;
      case ParamKind::bias: fill(tensors_[i], 0.0); break;
    }
  }
}

}  // namespace q3vl
