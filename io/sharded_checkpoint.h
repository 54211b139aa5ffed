// Sharded training checkpoints: with FSDP / expert parallelism every rank holds pieces of parameters
// (contiguous element ranges of the flattened tensor, in its on-disk shape of model_param_specs) and the
// AdamW moments of those elements; each rank writes its own file, and one manifest says which file holds
// which pieces. CheckpointReader reads element ranges from this format or from the whole-tensor format of
// io/train_checkpoint.h alike, so a checkpoint resumes in any other layout (saved on 4 ranks, resumed on 2).
//
// Layout of ROOT/step-00000100/ (a step folder like the whole-tensor format's: same names, same temporary
// folder / fsync / rename / COMPLETE sequence and the same pruning, so list_complete_checkpoints and
// latest_complete_checkpoint see both formats):
//   shard-RRRRR.safetensors  f32 1-D tensors "<key>@<offset>", "<key>@<offset>.exp_avg",
//                            "<key>@<offset>.exp_avg_sq" for each piece the shard holds
//   manifest.json            {"format": 1, "layout": <the caller's layout JSON>,
//                             "tensors": [{"key", "shape"}, ...] (model_param_specs order),
//                             "shards": [{"file", "pieces": [{"key", "offset", "numel"}, ...]}, ...]}
//   config.json              the model config, as the whole-tensor format's model/config.json
//   trainer_state.json, config.yaml, COMPLETE   as in the whole-tensor format
// The pieces of all shards cover every element of every parameter exactly once; saving checks that before
// the checkpoint becomes complete, and reading checks it again.
//
// Saving runs in three phases: begin (one rank, then a barrier), write_checkpoint_shard (every rank holding a
// distinct shard, then the entries are gathered on rank 0), finish (rank 0). Shard writes go through the
// full-disk fault budget of set_write_fault_after_bytes; a failed shard write removes its partial file, a
// failed finish removes the temporary folder, and no failure touches another complete checkpoint.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/model/config.h"

namespace q3vl::io {

// Elements [offset, offset + numel) of flattened parameter `key` (an HF key of model_param_specs).
struct ShardPiece {
  std::string key;
  int64_t offset = 0, numel = 0;
  const float* param = nullptr;  // numel values each
  const float* exp_avg = nullptr;
  const float* exp_avg_sq = nullptr;
};

// Phase 1, called on one rank (the caller then barriers): creates ROOT (if needed) and an empty
// ROOT/.tmp-step-NNNNNNNN-<tag>/ (replacing a stale one of that name); returns its path. `tag` is given by the
// caller, identical on all ranks: a non-empty file name of letters, digits, '-', '_' and '.'.
std::string begin_sharded_checkpoint(const std::string& root, int64_t step, const std::string& tag);

// Phase 2, on every rank that holds a distinct shard: writes TMP/shard-RRRRR.safetensors (fsynced) and returns
// this shard's manifest entry as a JSON string: {"file": "shard-RRRRR.safetensors", "pieces": [{"key",
// "offset", "numel"}, ...]}. Zero pieces is allowed (a file with no tensors); a piece has numel >= 1, three
// non-null arrays, and no two pieces of a shard share key and offset. Errors name the file.
std::string write_checkpoint_shard(const std::string& tmp_dir, int shard_index, const std::vector<ShardPiece>& pieces);

// Phase 3, on rank 0 after every shard is written: checks that the entries' pieces cover every element of every
// parameter of model_param_specs(config) exactly once (an error names the key and the first missing or doubly
// covered element) and that every shard file holds its pieces, that `layout_json` and `trainer_state_json`
// parse, then writes manifest.json, config.json, trainer_state.json, config.yaml, publishes the folder as
// ROOT/step-NNNNNNNN (replacing an earlier one of that step) and keeps the newest `keep` complete checkpoints,
// as save_train_checkpoint does. Returns the step folder.
std::string finish_sharded_checkpoint(const std::string& root, const std::string& tmp_dir, int64_t step,
                                      const ModelConfig& config, const std::string& layout_json,
                                      const std::vector<std::string>& shard_entries,
                                      const std::string& trainer_state_json, const std::string& config_yaml, int keep);

// Reads any complete checkpoint folder (whole-tensor or sharded) by element ranges. The constructor checks
// COMPLETE, the model config against `expected` (naming the first differing config key), trainer_state.json,
// and every file: for the sharded format the manifest (errors name manifest.json) and that each listed file
// exists and holds its pieces' tensors with the stated sizes; for the whole-tensor format that every weight
// (F32, BF16 or F16) and every stored moment (F32) has its parameter's shape. Files are memory-mapped once;
// reads copy straight from the mappings, so a reader may be shared by threads.
class CheckpointReader {
 public:
  CheckpointReader(const std::string& dir, const ModelConfig& expected);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  enum class Field { param, exp_avg, exp_avg_sq };

  // Copies elements [offset, offset + numel) of flattened `key`'s field into dst; a range may span several
  // pieces and files. Errors name the checkpoint, the key and the range (unknown key, out of range, a
  // whole-tensor checkpoint without that moment).
  void read(const std::string& key, Field field, int64_t offset, int64_t numel, float* dst) const;

  bool sharded() const;
  const std::string& trainer_state_json() const;
  const std::string& config_yaml() const;
  const std::string& layout_json() const;  // "{}" for the whole-tensor format

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace q3vl::io
