// ParamStore: parameters of a model in one lazily committed anonymous mapping in model_param_specs order,
// FSDP units page-aligned, looked up by HF key.
#include "core/model/param_store.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/arena.h"
#include "core/check.h"
#include "core/rng.h"

namespace q3vl {

namespace {

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Byte offset of every tensor, and [begin, end) of every unit, in a store of `dtype`.
struct StoreLayout {
  std::vector<size_t> tensor_offset, unit_begin, unit_end;
  size_t total = 0;
};

StoreLayout store_layout(const std::vector<ParamSpec>& specs, const std::vector<ParamUnit>& units, DType dtype,
                         const TpLayout& tp) {
  StoreLayout l;
  l.tensor_offset.resize(specs.size());
  size_t at = 0;
  for (const ParamUnit& u : units) {
    at = round_up(at, page_size());
    l.unit_begin.push_back(at);
    for (size_t i = u.first_spec; i < u.end_spec; ++i) {
      l.tensor_offset[i] = at;
      at += Arena::aligned(static_cast<size_t>(tp_local_shape(specs[i], tp).numel()) * dtype_size(dtype));
    }
    l.unit_end.push_back(at);
  }
  l.total = round_up(at, page_size());
  return l;
}

}  // namespace

size_t ParamStore::bytes(const ModelConfig& config, DType dtype, const TpLayout& tp) {
  return store_layout(model_param_specs(config), param_units(config), dtype, tp).total;
}

ParamStore::ParamStore(const ModelConfig& config, DType dtype, const std::string& name, const TpLayout& tp)
    : name_(name), tp_(tp), dtype_(dtype), specs_(model_param_specs(config)), units_(param_units(config)) {
  check_tp_layout(config, tp);
  Q3VL_CHECK(dtype == DType::f32 || dtype == DType::f64, "ParamStore '", name, "': dtype ", dtype_name(dtype),
             " is not f32 or f64");
  const StoreLayout l = store_layout(specs_, units_, dtype, tp);
  unit_begin_ = l.unit_begin;
  unit_end_ = l.unit_end;
  mapped_ = l.total;
  if (mapped_ > 0) {
    base_ = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    Q3VL_CHECK(base_ != MAP_FAILED, "ParamStore '", name, "': cannot map ", mapped_, " bytes: ", std::strerror(errno));
    // Small pages, so that discarding a unit returns exactly its pages.
    madvise(base_, mapped_, MADV_NOHUGEPAGE);
  }
  tensors_.reserve(specs_.size());
  for (size_t i = 0; i < specs_.size(); ++i) {
    tensors_.emplace_back(static_cast<char*>(base_) + l.tensor_offset[i], dtype, tp_local_shape(specs_[i], tp));
    index_.emplace(specs_[i].hf_key, i);
  }
}

ParamStore::~ParamStore() {
  if (base_ != nullptr) munmap(base_, mapped_);
}

void ParamStore::discard_unit(size_t unit) {
  Q3VL_CHECK(unit < units_.size(), "ParamStore '", name_, "': no unit ", unit);
  const size_t begin = unit_begin_[unit], end = round_up(unit_end_[unit], page_size());
  if (end > begin)
    Q3VL_CHECK(madvise(static_cast<char*>(base_) + begin, end - begin, MADV_DONTNEED) == 0, "ParamStore '", name_,
               "': cannot discard unit '", units_[unit].name, "': ", std::strerror(errno));
}

const Tensor& ParamStore::at(std::string_view hf_key) const {
  const auto it = index_.find(std::string(hf_key));
  Q3VL_CHECK(it != index_.end(), "ParamStore '", name_, "': no parameter '", hf_key, "'");
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

void ParamStore::init(uint64_t seed, double std) { init(seed, std, 0, tensors_.size()); }

void ParamStore::init(uint64_t seed, double std, size_t first, size_t end) {
  Q3VL_CHECK(first <= end && end <= tensors_.size(), "ParamStore '", name_, "': init range [", first, ", ", end,
             ") outside ", tensors_.size(), " tensors");
  for (size_t i = first; i < end; ++i) {
    switch (specs_[i].kind) {
      case ParamKind::embedding:
      case ParamKind::matrix:
      case ParamKind::experts: {
        const Tensor flat = tensors_[i].view({tensors_[i].numel()});
        for (const TpRun& r : tp_global_runs(specs_[i], tp_, 0, flat.numel()))
          fill_normal(flat.narrow(0, r.local_offset, r.numel), Philox(seed, i), 0.0, std,
                      static_cast<uint64_t>(r.global_offset));
        break;
      }
      case ParamKind::norm: fill(tensors_[i], 1.0); break;
      case ParamKind::bias: fill(tensors_[i], 0.0); break;
    }
  }
}

}  // namespace q3vl
