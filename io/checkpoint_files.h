// The file machinery shared by the training checkpoint formats (io/train_checkpoint.h, whole tensors written
// by rank 0; io/sharded_checkpoint.h, one file per rank): durable writes through the full-disk fault budget
// of set_write_fault_after_bytes, step folder names, the publish sequence (fsync, rename, COMPLETE, prune),
// and the checks a loader makes on the model config and on JSON files. Every error names the path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "io/safetensors.h"

namespace q3vl::io::checkpoint_files {

inline constexpr const char* kComplete = "COMPLETE";
inline constexpr const char* kConfigJson = "config.json";
inline constexpr const char* kTrainerState = "trainer_state.json";
inline constexpr const char* kConfigYaml = "config.yaml";

[[noreturn]] void fail_errno(const std::string& action, const std::string& path, int err);

// A file written from scratch and made durable: every write goes through the fault budget; finish() fsyncs
// and closes. Destroying an unfinished file just closes it (the caller removes the folder).
class SyncedFile {
 public:
  explicit SyncedFile(std::string path);
  ~SyncedFile();
  SyncedFile(const SyncedFile&) = delete;
  SyncedFile& operator=(const SyncedFile&) = delete;

  void write(const void* data, size_t size);
  void finish();

 private:
  std::string path_;
  int fd_ = -1;
};

void write_text_file(const std::string& path, const std::string& text);
void write_safetensors_synced(const std::string& path, const std::vector<StWriteEntry>& entries);
// A folder's entries (creations, renames, removals) are durable only once the folder itself is fsynced.
void fsync_dir(const std::string& path);
void make_dir(const std::string& path);
std::string read_text_file(const std::string& path);

// "step-00000100", and its inverse for exactly that spelling (anything else: nullopt).
std::string step_name(int64_t step);
std::optional<int64_t> parse_step_name(const std::string& name);
// ".tmp-step-00000100-": the start of every temporary folder of that step.
std::string tmp_prefix(int64_t step);

// Creates ROOT (and its parents) and checks it is a folder.
void create_root(const std::string& root);
// Removes a checkpoint folder so that no crash midway leaves something that looks complete: the marker goes
// first (durably), then the contents.
void remove_checkpoint_folder(const std::string& path);

// Turns the fully written and fsynced temporary folder `tmp` (inside ROOT) into ROOT/step-NNNNNNNN: replaces
// an existing folder of that step, renames, fsyncs ROOT, writes COMPLETE (fsynced); on failure removes what
// is partial (tmp, or the renamed folder) and rethrows. Then keeps the newest `keep` complete checkpoints
// (always the one just written), clears stale temporary folders of this step and fsyncs ROOT; a failure there
// says the checkpoint is complete. Returns the step folder.
std::string publish_checkpoint(const std::string& root, const std::string& tmp, int64_t step, int keep);

// Checks that config.json at `path` describes the same model as `expected`, naming the first differing key.
void check_model_config(const std::string& path, const ModelConfig& expected);
void check_json(const std::string& text, const std::string& what);

}  // namespace q3vl::io::checkpoint_files
