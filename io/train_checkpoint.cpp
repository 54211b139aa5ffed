// Training checkpoints: crash-safe save (temporary folder, fsync, rename, COMPLETE marker), keep-last-K
// pruning, listing of complete checkpoints, validating load, and the full-disk fault injection switch.
#include "io/train_checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "core/model/param_specs.h"
#include "io/hf_config.h"
#include "io/safetensors.h"

namespace q3vl::io {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kComplete = "COMPLETE";
constexpr const char* kModelDir = "model";
constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kConfigJson = "config.json";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kTrainerState = "trainer_state.json";
constexpr const char* kConfigYaml = "config.yaml";
constexpr const char* kFaultEnv = "Q3VL_FAULT_WRITE_AFTER_BYTES";

// ---------------------------------------------------------------------------------------------------------
// Fault injection: bytes this module wrote since the budget was set, and the budget (-1: unlimited).

struct WriteBudget {
  std::mutex mutex;
  int64_t limit = -1;
  int64_t written = 0;
};

int64_t parse_fault_env(const char* text) {
  int64_t value = 0;
  const char* end = text + std::strlen(text);
  const auto [ptr, ec] = std::from_chars(text, end, value);
  Q3VL_CHECK(ec == std::errc() && ptr == end && value >= -1, kFaultEnv, "='", text,
             "' is not a byte count (an integer >= 0, or -1 for off)");
  return value;
}

// Created at the first checkpoint write (or set_write_fault_after_bytes call), reading the environment once.
WriteBudget& write_budget() {
  static WriteBudget budget;
  static std::once_flag from_env;
  std::call_once(from_env, [] {
    if (const char* text = std::getenv(kFaultEnv)) budget.limit = parse_fault_env(text);
  });
  return budget;
}

// How many of `size` bytes the budget still allows; the caller writes those and fails on the rest.
size_t claim_bytes(size_t size) {
  WriteBudget& b = write_budget();
  const std::lock_guard lock(b.mutex);
  size_t allowed = size;
  if (b.limit >= 0)
    allowed = static_cast<size_t>(std::clamp<int64_t>(b.limit - b.written, 0, static_cast<int64_t>(size)));
  b.written += static_cast<int64_t>(allowed);
  return allowed;
}

// ---------------------------------------------------------------------------------------------------------
// POSIX file helpers: every error names the path and carries the system's reason.

[[noreturn]] void fail_errno(const std::string& action, const std::string& path, int err) {
  Q3VL_FAIL("checkpoint: cannot ", action, " ", path, ": ", std::strerror(err));
}

// A file written from scratch and made durable: every write goes through the fault budget; finish() fsyncs
// and closes. Destroying an unfinished file just closes it (the caller removes the folder).
class SyncedFile {
 public:
  explicit SyncedFile(std::string path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) fail_errno("create", path_, errno);
  }
  ~SyncedFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  SyncedFile(const SyncedFile&) = delete;
  SyncedFile& operator=(const SyncedFile&) = delete;

  void write(const void* data, size_t size) {
    const size_t allowed = claim_bytes(size);
    const auto* p = static_cast<const char*>(data);
    for (size_t done = 0; done < allowed;) {
      const ssize_t n = ::write(fd_, p + done, allowed - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail_errno("write", path_, errno);
      done += static_cast<size_t>(n);
    }
    // The injected fault reads exactly like the kernel's ENOSPC, after the bytes that still fit.
    if (allowed < size) fail_errno("write", path_, ENOSPC);
  }

  void finish() {
    if (::fsync(fd_) != 0) fail_errno("fsync", path_, errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail_errno("close", path_, errno);
  }

 private:
  std::string path_;
  int fd_ = -1;
};

void write_text_file(const std::string& path, const std::string& text) {
  SyncedFile f(path);
  f.write(text.data(), text.size());
  f.finish();
}

void write_safetensors_synced(const std::string& path, const std::vector<StWriteEntry>& entries) {
  SyncedFile f(path);
  write_safetensors([&](const void* data, size_t size) { f.write(data, size); }, path, entries, DType::f32);
  f.finish();
}

// A folder's entries (creations, renames, removals) are durable only once the folder itself is fsynced.
void fsync_dir(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail_errno("open folder", path, errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) fail_errno("fsync folder", path, err);
}

void make_dir(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) != 0) fail_errno("create folder", path, errno);
}

std::string read_text_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_errno("read", path, errno);
  std::string text;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      fail_errno("read", path, err);
    }
    if (n == 0) break;
    text.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return text;
}

// ---------------------------------------------------------------------------------------------------------
// Names and folders

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

// The step of a canonical "step-NNNNNNNN" name (exactly what step_name writes), else nullopt.
std::optional<int64_t> parse_step_name(const std::string& name) {
  constexpr std::string_view prefix = "step-";
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  int64_t step = 0;
  const char* begin = name.data() + prefix.size();
  const char* end = name.data() + name.size();
  const auto [ptr, ec] = std::from_chars(begin, end, step);
  if (ec != std::errc() || ptr != end || step < 0 || step_name(step) != name) return std::nullopt;
  return step;
}

std::string tmp_prefix(int64_t step) { return ".tmp-" + step_name(step) + "-"; }

// Removes a checkpoint folder so that no crash midway leaves something that looks complete: the marker goes
// first (durably), then the contents.
void remove_checkpoint_folder(const std::string& path) {
  const std::string marker = (fs::path(path) / kComplete).string();
  if (::unlink(marker.c_str()) != 0 && errno != ENOENT) fail_errno("remove", marker, errno);
  fsync_dir(path);
  std::error_code ec;
  fs::remove_all(path, ec);
  Q3VL_CHECK(!ec, "checkpoint: cannot remove ", path, ": ", ec.message());
}

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

// The first key path (a.b.c) whose values differ between two JSON documents; empty when they are equal.
std::string first_difference(const json& a, const json& b, const std::string& prefix) {
  if (!a.is_object() || !b.is_object()) return a == b ? "" : prefix;
  std::set<std::string> keys;
  for (const auto& [k, v] : a.items()) keys.insert(k);
  for (const auto& [k, v] : b.items()) keys.insert(k);
  for (const std::string& k : keys) {
    const std::string path = prefix.empty() ? k : prefix + "." + k;
    if (!a.contains(k) || !b.contains(k)) return path;
    std::string d = first_difference(a[k], b[k], path);
    if (!d.empty()) return d;
  }
  return "";
}

json value_at(const json& doc, const std::string& path) {
  const json* node = &doc;
  size_t start = 0;
  while (start <= path.size()) {
    const size_t dot = std::min(path.find('.', start), path.size());
    const std::string key = path.substr(start, dot - start);
    if (!node->is_object() || !node->contains(key)) return "(absent)";
    node = &(*node)[key];
    start = dot + 1;
  }
  return *node;
}

// Both configs go through the same serialisation, so the comparison is over what the model computes and
// not over how a file happens to spell it.
void check_model_config(const std::string& path, const ModelConfig& expected) {
  const ModelConfig stored = parse_hf_config(read_text_file(path), path);
  const json have = json::parse(hf_config_json(stored, DType::f32));
  const json want = json::parse(hf_config_json(expected, DType::f32));
  const std::string key = first_difference(have, want, "");
  Q3VL_CHECK(key.empty(), "checkpoint ", path, ": the model config differs from this run's at '", key,
             "': the checkpoint has ", value_at(have, key).dump(), ", the run has ", value_at(want, key).dump());
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

void check_json(const std::string& text, const std::string& what) {
  Q3VL_CHECK(json::accept(text), what, " is not valid JSON (", text.size(), " bytes)");
}

// Keeps the newest `keep` complete checkpoints by step, always including the one just written (`saved`).
void prune(const std::string& root, int64_t saved, int keep) {
  std::vector<CheckpointEntry> others;
  for (const CheckpointEntry& e : list_complete_checkpoints(root))
    if (e.step != saved) others.push_back(e);
  const size_t allowed = static_cast<size_t>(keep - 1);
  for (size_t i = 0; i + allowed < others.size(); ++i) remove_checkpoint_folder(others[i].path);
}

void remove_stale_tmp(const std::string& root, int64_t step) {
  const std::string prefix = tmp_prefix(step);
  std::error_code ec;
  std::vector<fs::path> stale;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().filename().string().starts_with(prefix)) stale.push_back(it->path());
  Q3VL_CHECK(!ec, "checkpoint: cannot list ", root, ": ", ec.message());
  for (const fs::path& p : stale) {
    fs::remove_all(p, ec);
    Q3VL_CHECK(!ec, "checkpoint: cannot remove stale temporary folder ", p.string(), ": ", ec.message());
  }
}

}  // namespace

void set_write_fault_after_bytes(int64_t bytes) {
  Q3VL_CHECK(bytes >= -1, "set_write_fault_after_bytes: ", bytes, " is not a byte count (>= 0, or -1 for off)");
  WriteBudget& b = write_budget();
  const std::lock_guard lock(b.mutex);
  b.limit = bytes;
  b.written = 0;
}

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

  std::error_code ec;
  fs::create_directories(root, ec);
  Q3VL_CHECK(!ec, "checkpoint: cannot create folder ", root, ": ", ec.message());
  Q3VL_CHECK(fs::is_directory(root, ec), "checkpoint: ", root, " is not a folder");

  const std::string name = step_name(contents.step);
  const fs::path tmp = fs::path(root) / (tmp_prefix(contents.step) + std::to_string(::getpid()));
  const fs::path final_dir = fs::path(root) / name;
  fs::path partial = tmp;  // what a failure must remove
  try {
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

    if (fs::exists(final_dir, ec)) remove_checkpoint_folder(final_dir.string());
    if (::rename(tmp.c_str(), final_dir.c_str()) != 0)
      fail_errno("rename " + tmp.string() + " to", final_dir.string(), errno);
    partial = final_dir;
    fsync_dir(root);
    write_text_file((final_dir / kComplete).string(), name + "\n");
    fsync_dir(final_dir.string());
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(partial, ignored);
    throw;
  }

  try {
    prune(root, contents.step, keep);
    remove_stale_tmp(root, contents.step);
    fsync_dir(root);
  } catch (const Error& e) {
    Q3VL_FAIL("checkpoint ", final_dir.string(), " is saved and complete, but cleaning up after it failed: ", e.what());
  }
  return final_dir.string();
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
