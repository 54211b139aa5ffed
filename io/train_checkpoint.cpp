// Training checkpoints: crash-safe save of the whole-tensor format (the shared publish sequence of
// io/checkpoint_files.h does the rename, COMPLETE marker and keep-last-K pruning), listing of complete
// checkpoints, validating load.
#include "io/train_checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "core/check.h"
#include "core/model/param_specs.h"
#include "io/checkpoint_files.h"
#include "io/hf_config.h"
#include "io/safetensors.h"

namespace q3vl::io {

namespace fs = std::filesystem;
using namespace checkpoint_files;

namespace {

constexpr const char* kModelDir = "model";
constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";

// ---------------------------------------------------------------------------------------------------------
// Contents

std::vector<StWriteEntry> weight_entries(const ModelConfig& config, const WeightLookup& weights) {
  std::vector<StWriteEntry> entries;
  for (const ParamSpec& s : model_param_specs(config)) {
    const Tensor t = weights(s.hf_key);
    Q3VL_CHECK(t.defined() && t.dtype() == DType::f32 && t.device() == Device::cpu && t.is_contiguous(),
               "checkpoint save: the weight tensor for '", s.hf_key, "' is ", t.str(),
               ", expected contiguous host f32");
    Q3VL_CHECK(t.shape() == s.shape, "checkpoint save: the weight tensor for '", s.hf_key, "' has shape ",
               t.shape().str(), ", expected ", s.shape.str());
    entries.push_back({s.hf_key, t});
  }
  return entries;
}

// Non-empty unique names, each a contiguous host f32 tensor.
void check_optimizer_tensors(const std::vector<NamedTensor>& tensors, const char* what) {
  std::set<std::string, std::less<>> names;
  for (const NamedTensor& t : tensors) {
    Q3VL_CHECK(!t.name.empty(), what, ": an optimizer tensor has an empty name");
    Q3VL_CHECK(t.tensor.defined() && t.tensor.dtype() == DType::f32 && t.tensor.device() == Device::cpu &&
                   t.tensor.is_contiguous(),
               what, ": optimizer tensor '", t.name, "' is ", t.tensor.str(), ", expected contiguous host f32");
    Q3VL_CHECK(names.insert(t.name).second, what, ": optimizer tensor '", t.name, "' is listed twice");
  }
}

std::string shape_text(const Tensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim(); ++i) {
    if (i > 0) s += ',';
    s += std::to_string(t.size(i));
  }
  s += ']';
  return s;
}

// Every requested moment must be stored with the same shape, and the file may hold nothing else.
void check_optimizer_file(const SafetensorsFile& file, const std::vector<NamedTensor>& optimizer) {
  check_optimizer_tensors(optimizer, "checkpoint load");
  std::set<std::string, std::less<>> requested;
  for (const NamedTensor& t : optimizer) {
    requested.insert(t.name);
    const StTensorInfo* info = file.find(t.name);
    Q3VL_CHECK(info != nullptr, "checkpoint ", file.path(), ": missing optimizer tensor '", t.name, "'");
    Q3VL_CHECK(info->dtype == StDType::F32, "checkpoint ", file.path(), ": optimizer tensor '", t.name, "' has dtype ",
               st_dtype_name(info->dtype), ", expected F32");
    const std::vector<int64_t> dims(t.tensor.shape().dims.begin(), t.tensor.shape().dims.begin() + t.tensor.ndim());
    Q3VL_CHECK(info->shape == dims, "checkpoint ", file.path(), ": optimizer tensor '", t.name, "' has shape ",
               info->shape_str(), ", expected ", shape_text(t.tensor));
  }
  for (const StTensorInfo& info : file.tensors())
    Q3VL_CHECK(requested.contains(info.key), "checkpoint ", file.path(), ": unexpected optimizer tensor '", info.key,
               "' (this run's optimizer has no such state)");
}

}  // namespace

std::string save_train_checkpoint(const std::string& root, const TrainCheckpointWrite& contents, int keep) {
  // Everything is checked before the first folder is made.
  Q3VL_CHECK(keep >= 1, "checkpoint save: keep is ", keep, ", expected at least 1");
  Q3VL_CHECK(contents.step >= 0, "checkpoint save: step is ", contents.step, ", expected >= 0");
  Q3VL_CHECK(contents.model_config != nullptr, "checkpoint save: no model config");
  Q3VL_CHECK(static_cast<bool>(contents.weights), "checkpoint save: no weight lookup");
  const std::string config_json = hf_config_json(*contents.model_config, DType::f32);
  const std::vector<StWriteEntry> weights = weight_entries(*contents.model_config, contents.weights);
  check_optimizer_tensors(contents.optimizer, "checkpoint save");
  std::vector<StWriteEntry> moments;
  for (const NamedTensor& t : contents.optimizer) moments.push_back({t.name, t.tensor});
  check_json(contents.trainer_state_json, "checkpoint save: the trainer state");

  create_root(root);
  const fs::path tmp = fs::path(root) / (tmp_prefix(contents.step) + std::to_string(::getpid()));
  try {
    std::error_code ec;
    fs::remove_all(tmp, ec);  // left by an earlier process that had this pid
    Q3VL_CHECK(!ec, "checkpoint: cannot remove ", tmp.string(), ": ", ec.message());
    make_dir(tmp.string());
    const fs::path model = tmp / kModelDir;
    make_dir(model.string());
    write_text_file((model / kConfigJson).string(), config_json);
    write_safetensors_synced((model / kModelFile).string(), weights);
    fsync_dir(model.string());
    write_safetensors_synced((tmp / kOptimizerFile).string(), moments);
    write_text_file((tmp / kTrainerState).string(), contents.trainer_state_json);
    write_text_file((tmp / kConfigYaml).string(), contents.config_yaml);
    fsync_dir(tmp.string());
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
  return publish_checkpoint(root, tmp.string(), contents.step, keep);
}

std::vector<CheckpointEntry> list_complete_checkpoints(const std::string& root) {
  std::error_code ec;
  const fs::file_status status = fs::status(root, ec);
  if (status.type() == fs::file_type::not_found) return {};
  Q3VL_CHECK(!ec, "checkpoint: cannot access ", root, ": ", ec.message());
  Q3VL_CHECK(fs::is_directory(status), "checkpoint: ", root, " is not a folder");
  std::vector<CheckpointEntry> out;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::optional<int64_t> step = parse_step_name(it->path().filename().string());
    std::error_code ignored;  // an entry that cannot be inspected is not a complete checkpoint
    if (step && it->is_directory(ignored) && fs::is_regular_file(it->path() / kComplete, ignored))
      out.push_back({*step, it->path().string()});
  }
  Q3VL_CHECK(!ec, "checkpoint: cannot list ", root, ": ", ec.message());
  std::sort(out.begin(), out.end(), [](const CheckpointEntry& a, const CheckpointEntry& b) { return a.step < b.step; });
  return out;
}

std::optional<CheckpointEntry> latest_complete_checkpoint(const std::string& root) {
  const std::vector<CheckpointEntry> all = list_complete_checkpoints(root);
  if (all.empty()) return std::nullopt;
  return all.back();
}

TrainCheckpointRead load_train_checkpoint(const std::string& dir, const ModelConfig& expected_config,
                                          const WeightLookup& weights, const std::vector<NamedTensor>& optimizer) {
  const fs::path root(dir);
  std::error_code ec;
  Q3VL_CHECK(fs::is_directory(root, ec), "checkpoint ", dir, " does not exist or is not a folder");
  Q3VL_CHECK(fs::is_regular_file(root / kComplete, ec), "checkpoint ", dir,
             " is incomplete: it has no COMPLETE marker (its save was interrupted)");
  check_model_config((root / kModelDir / kConfigJson).string(), expected_config);
  TrainCheckpointRead out;
  const std::string state_path = (root / kTrainerState).string();
  out.trainer_state_json = read_text_file(state_path);
  check_json(out.trainer_state_json, "checkpoint " + state_path);
  out.config_yaml = read_text_file((root / kConfigYaml).string());

  // Everything is validated before any destination is written: the optimizer file here, the weights inside
  // load_hf_weights (which checks every tensor before converting the first).
  const SafetensorsFile moments((root / kOptimizerFile).string());
  check_optimizer_file(moments, optimizer);
  load_hf_weights((root / kModelDir).string(), expected_config, weights);
  for (const NamedTensor& t : optimizer) moments.read(t.name, t.tensor);
  return out;
}

}  // namespace q3vl::io
