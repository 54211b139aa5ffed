// Checkpoint file machinery: the full-disk fault budget, durable POSIX writes, step folder names, the
// publish sequence (rename, COMPLETE, keep-last-K pruning) and the model config comparison of loaders.
#include "io/checkpoint_files.h"

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
#include "io/hf_config.h"
#include "io/train_checkpoint.h"
#include "io/write_progress.h"

namespace q3vl::io {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kFaultEnv = "Q3VL_FAULT_WRITE_AFTER_BYTES";

// ---------------------------------------------------------------------------------------------------------
// Fault injection: bytes the checkpoint writers wrote since the budget was set, and the budget (-1: unlimited).

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
// Model config comparison

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

}  // namespace

void set_write_fault_after_bytes(int64_t bytes) {
  Q3VL_CHECK(bytes >= -1, "set_write_fault_after_bytes: ", bytes, " is not a byte count (>= 0, or -1 for off)");
  WriteBudget& b = write_budget();
  const std::lock_guard lock(b.mutex);
  b.limit = bytes;
  b.written = 0;
}

namespace checkpoint_files {

namespace {

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

// ---------------------------------------------------------------------------------------------------------
// POSIX file helpers: every error names the path and carries the system's reason.

[[noreturn]] void fail_errno(const std::string& action, const std::string& path, int err) {
  Q3VL_FAIL("checkpoint: cannot ", action, " ", path, ": ", std::strerror(err));
}

SyncedFile::SyncedFile(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail_errno("create", path_, errno);
}

SyncedFile::~SyncedFile() {
  if (fd_ >= 0) ::close(fd_);
}

void SyncedFile::write(const void* data, size_t size) {
  const size_t allowed = claim_bytes(size);
  const auto* p = static_cast<const char*>(data);
  for (size_t done = 0; done < allowed;) {
    const ssize_t n = ::write(fd_, p + done, allowed - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno("write", path_, errno);
    done += static_cast<size_t>(n);
  }
  note_bytes_written(allowed);
  // The injected fault reads exactly like the kernel's ENOSPC, after the bytes that still fit.
  if (allowed < size) fail_errno("write", path_, ENOSPC);
}

void SyncedFile::finish() {
  if (::fsync(fd_) != 0) fail_errno("fsync", path_, errno);
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail_errno("close", path_, errno);
}

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

void create_root(const std::string& root) {
  std::error_code ec;
  fs::create_directories(root, ec);
  Q3VL_CHECK(!ec, "checkpoint: cannot create folder ", root, ": ", ec.message());
  Q3VL_CHECK(fs::is_directory(root, ec), "checkpoint: ", root, " is not a folder");
}

void remove_checkpoint_folder(const std::string& path) {
  const std::string marker = (fs::path(path) / kComplete).string();
  if (::unlink(marker.c_str()) != 0 && errno != ENOENT) fail_errno("remove", marker, errno);
  fsync_dir(path);
  std::error_code ec;
  fs::remove_all(path, ec);
  Q3VL_CHECK(!ec, "checkpoint: cannot remove ", path, ": ", ec.message());
}

std::string publish_checkpoint(const std::string& root, const std::string& tmp, int64_t step, int keep) {
  const std::string name = step_name(step);
  const fs::path final_dir = fs::path(root) / name;
  std::string partial = tmp;  // what a failure must remove
  try {
    std::error_code ec;
    if (fs::exists(final_dir, ec)) remove_checkpoint_folder(final_dir.string());
    if (::rename(tmp.c_str(), final_dir.c_str()) != 0) fail_errno("rename " + tmp + " to", final_dir.string(), errno);
    partial = final_dir.string();
    fsync_dir(root);
    write_text_file((final_dir / kComplete).string(), name + "\n");
    fsync_dir(final_dir.string());
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(partial, ignored);
    throw;
  }

  try {
    prune(root, step, keep);
    remove_stale_tmp(root, step);
    fsync_dir(root);
  } catch (const Error& e) {
    Q3VL_FAIL("checkpoint ", final_dir.string(), " is saved and complete, but cleaning up after it failed: ", e.what());
  }
  return final_dir.string();
}

// ---------------------------------------------------------------------------------------------------------
// Loader checks

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

void check_json(const std::string& text, const std::string& what) {
  Q3VL_CHECK(json::accept(text), what, " is not valid JSON (", text.size(), " bytes)");
}

}  // namespace checkpoint_files
}  // namespace q3vl::io
