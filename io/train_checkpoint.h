// Training checkpoints: one directory per step under a root, written so that a crash, a kill or a full
// disk at any moment never damages an existing complete checkpoint.
//
// Layout of ROOT/step-00000100/:
//   model/            an HF checkpoint directory (config.json + model.safetensors, f32): weights by HF key
//   optimizer.safetensors   "<key>.exp_avg" / "<key>.exp_avg_sq" f32 tensors
//   trainer_state.json      the trainer's JSON (step, optimizer step, RNG, loader state, ...); checked to
//                           parse, otherwise opaque here
//   config.yaml             the effective training config
//   COMPLETE                marker, written last
// Saving writes everything into ROOT/.tmp-step-00000100-<pid>/, fsyncs every file and the folder, renames it
// to step-00000100, fsyncs ROOT, then writes COMPLETE (fsynced). Only then are older complete checkpoints
// beyond `keep` removed (oldest first) and stale .tmp-* folders of this step cleared. A step folder without
// COMPLETE is incomplete: listing and `resume: auto` ignore it; saving over it replaces it. Pruning keeps the
// checkpoint just written plus the keep-1 highest other steps (so a run resumed from an older step never
// deletes what it just saved); a removed or replaced folder loses its COMPLETE marker (fsynced) before its
// contents, so a crash midway never leaves a partial folder that looks complete. Every file is written with
// POSIX write + fsync, so a real ENOSPC or EIO is reported with the path and the system's reason.
// model/ is byte for byte what save_hf_checkpoint(dir, config, lookup, DType::f32, 0) writes, except that its
// experts are always in the published layout (CheckpointReader reads them by element range), also for a config
// with square experts, which save_hf_checkpoint writes in transformers' layout.
//
// Fault injection for tests: set_write_fault_after_bytes(n) (or the environment variable
// Q3VL_FAULT_WRITE_AFTER_BYTES=n read at the first save) makes checkpoint writes fail with the error a full
// disk gives (ENOSPC) once n bytes have been written in this process; -1 turns it off. Bytes are counted
// from the call (from the first save for the variable): the write that crosses the budget writes what still
// fits and then fails with "checkpoint: cannot write <file>: No space left on device", as the kernel would.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "core/tensor.h"
#include "io/checkpoint.h"

namespace q3vl::io {

struct NamedTensor {
  std::string name;
  Tensor tensor;  // f32 host, contiguous
};

struct TrainCheckpointWrite {
  int64_t step = 0;
  const ModelConfig* model_config = nullptr;
  WeightLookup weights;                 // every key of model_param_specs(*model_config)
  std::vector<NamedTensor> optimizer;   // moments, written as they are named
  std::string trainer_state_json;   // must be valid JSON (checked before anything is written)
  std::string config_yaml;
};

// Writes ROOT/step-NNNNNNNN atomically as above and keeps the newest `keep` complete checkpoints (keep >= 1).
// Returns the checkpoint folder. Errors (unwritable root, full disk) name the path; the partial temporary
// folder (or the renamed step folder, when writing COMPLETE fails) is removed on failure and no other complete
// checkpoint is touched. A failure while pruning after the new checkpoint is complete says so.
std::string save_train_checkpoint(const std::string& root, const TrainCheckpointWrite& contents, int keep);

struct CheckpointEntry {
  int64_t step = 0;
  std::string path;
};

// Complete checkpoints under ROOT, oldest first (missing ROOT: empty).
std::vector<CheckpointEntry> list_complete_checkpoints(const std::string& root);
std::optional<CheckpointEntry> latest_complete_checkpoint(const std::string& root);

// Reads a checkpoint folder. Errors name the file: not a complete checkpoint (no COMPLETE marker), a model
// config that differs from `expected_config` (naming the first differing config.json key), missing or
// mis-shaped weight or optimizer tensors, truncated files.
struct TrainCheckpointRead {
  std::string trainer_state_json;
  std::string config_yaml;
};
TrainCheckpointRead load_train_checkpoint(const std::string& dir, const ModelConfig& expected_config,
                                          const WeightLookup& weights, const std::vector<NamedTensor>& optimizer);

void set_write_fault_after_bytes(int64_t bytes);

}  // namespace q3vl::io
