// The HF export at the end of a run (trainer_impl.h): with the whole model on every rank, rank 0 writes it; with
// sharded parameters every rank serves its pieces tensor by tensor while rank 0 writes.
#include <algorithm>
#include <filesystem>
#include <map>

#include "app/trainer_impl.h"
#include "core/check.h"

namespace q3vl::app {

namespace {

DType export_dtype(const std::string& name) {
  if (name == "f32") return DType::f32;
  if (name == "bf16") return DType::bf16;
  if (name == "f16") return DType::f16;
  Q3VL_FAIL("export.dtype: expected f32, bf16 or f16, got '", name, "'");
}

}  // namespace

void Trainer::Impl::export_model(const std::string& dir) {
  HfExportOptions eo;
  eo.dtype = export_dtype(cfg.export_.dtype);
  eo.max_shard_bytes = static_cast<uint64_t>(cfg.export_.shard_mb) << 20;
  if (cfg.export_.tokenizer) eo.tokenizer_dir = *cfg.export_.tokenizer;
  eo.router_bias = model->router_bias();
  const io::WriteObserverScope progress(save_progress("HF export"));
  if (!sharded->resident()) {
    export_sharded(dir, eo);
  } else if (root) {
    export_hf(dir, *model, eo);
  }
  say() << "exported HF model -> " << dir << "\n";
  if (eo.router_bias.defined()) say() << router_bias_warning(dir) << "\n";
  comm.barrier();
}

void Trainer::Impl::export_sharded(const std::string& dir, HfExportOptions options) {
  // Rank 0 writes tensor by tensor. Before each tensor it broadcasts the tensor's index; every rank then gathers
  // that tensor's unit if it is not the one held (FSDP, the same order everywhere, so no rank holds more than
  // one unit) and the tensor-parallel ranks all-gather their slices, which rank 0 assembles into one staging
  // tensor that the writer reads. -1 ends.
  const std::vector<ParamSpec>& specs = model->weights().specs();
  const std::vector<ParamUnit>& units = model->units();
  const TpLayout& tp = model->tp_layout();
  int64_t largest = 0;
  for (const ParamSpec& s : specs) largest = std::max(largest, s.numel());
  std::vector<float> staging(root ? static_cast<size_t>(largest) : 0), slices;
  int held = -1;
  const auto serve = [&](int64_t spec_index) {
    int unit = -1;
    for (size_t u = 0; u < units.size() && spec_index >= 0; ++u)
      if (static_cast<size_t>(spec_index) < units[u].end_spec && unit < 0) unit = static_cast<int>(u);
    if (unit != held) {
      if (held >= 0) sharded->release(held);
      held = unit;
      if (unit >= 0) sharded->acquire(unit);
    }
    if (spec_index < 0) return;
    const ParamSpec& spec = specs[static_cast<size_t>(spec_index)];
    const Tensor& local = model->weights().tensor(static_cast<size_t>(spec_index));
    const int64_t n = local.numel();
    if (tp_split_dim(spec, tp) < 0) {
      if (root) std::copy_n(local.data<float>(), n, staging.data());
      return;
    }
    slices.resize(static_cast<size_t>(n * tp.size));
    grid->tp().all_gather(std::span<const float>(local.data<float>(), static_cast<size_t>(n)), std::span<float>(slices));
    if (!root) return;
    for (int r = 0; r < tp.size; ++r) {
      const TpLayout other{tp.size, r, tp.experts_split};
      for (const TpRun& run : tp_global_runs(spec, other, 0, n))
        std::copy_n(slices.data() + r * n + run.local_offset, run.numel, staging.data() + run.global_offset);
    }
  };
  if (root) {
    std::map<std::string, int64_t> index;
    for (size_t i = 0; i < specs.size(); ++i) index[specs[i].hf_key] = static_cast<int64_t>(i);
    const auto spec_of = [&](const std::string& key) {
      const auto it = index.find(key);
      Q3VL_CHECK(it != index.end(), "export: no parameter '", key, "'");
      return it->second;
    };
    options.lookup = [&](const std::string& key) {
      return Tensor(staging.data(), DType::f32, specs[static_cast<size_t>(spec_of(key))].shape);
    };
    options.before_write = [&](const std::string& key) {
      int64_t message = spec_of(key);
      comm.broadcast(&message, sizeof message, 0);
      serve(message);
    };
    // A failed export throws while the other ranks wait for an index: train_cmd then aborts every rank.
    export_hf(dir, *model, options);
    int64_t end = -1;
    comm.broadcast(&end, sizeof end, 0);
    serve(-1);
    return;
  }
  for (;;) {
    int64_t message = 0;
    comm.broadcast(&message, sizeof message, 0);
    serve(message);
    if (message < 0) break;
  }
}

}  // namespace q3vl::app
