// The configuration of `q3vl train`: a YAML file plus `--set key.path=value` overrides, validated in full
// before any work starts. Unknown keys, wrong types and impossible values are errors naming the key (and
// the file); the effective config (every field, defaults filled in) is written to the output folder.
//
// Types are YAML's: numbers and booleans are written bare (a quoted "10" is a string), lists are YAML lists.
// A null (`key: null`, `key:`) unsets an optional field; for any other field it is an error, except that a
// null section (`optimizer:` with nothing under it) changes nothing. A map given for a section sets only the
// keys it names (`--set optimizer.lr_scale={mergers: 0.5}` keeps the other two multipliers).
// model.flavor, model.config and model.checkpoint are alternatives: exactly one must be set. A file naming
// two is an error; a --set naming one replaces the file's choice.
// Paths (model.config, model.checkpoint, data.dir, export.tokenizer, output_dir, a checkpoint.resume folder)
// are made absolute: relative to the YAML file's folder when written in the file, to the current directory
// when given with --set; the default output_dir, out/run, is in the current directory. data.dir has no
// default.
//
//   model:
//     flavor: tiny-moe          # exactly one of flavor (jobs/flavors name), config (config.json path),
//     config: null              #   checkpoint (HF model folder to start from, weights loaded)
//     checkpoint: null
//     init_seed: 0              # weights when not loaded from a checkpoint
//     router_aux_loss_coef: null  # overrides the model config's coefficient when set
//   data:
//     dir: out/packed           # required: the `q3vl pack` output folder (manifest.json + shards)
//     seed: null                # shuffle seed (default: train.seed)
//     sequences_per_batch: 1    # packed sequences per micro-batch
//     prefetch: 2
//   train:
//     steps: 100                # optimizer steps
//     grad_accum: 1             # micro-batches per optimizer step
//     seed: 0
//     max_tokens: 0             # micro-batch token capacity (0: sequences_per_batch x the pack's token budget)
//     on_nonfinite: stop        # stop | skip (skip the optimizer step, count it)
//   optimizer:
//     lr: 1.0e-4
//     min_lr: 0.0
//     warmup_steps: 0
//     decay: cosine             # cosine | linear | constant
//     beta1: 0.9
//     beta2: 0.95
//     eps: 1.0e-8
//     weight_decay: 0.1
//     no_decay: [norm, bias, embedding]   # parameter kinds without weight decay
//     grad_clip: 1.0            # global-norm clipping; 0 = off
//     lr_scale: {vision_tower: 1.0, mergers: 1.0, language_model: 1.0}
//     freeze: []                # any of vision_tower, mergers, language_model
//   moe:                        # MoE load balancing (models with MoE layers)
//     balance: aux              # aux (HF's aux loss) | bias (aux-loss-free router bias) | aux+bias
//     bias_update_rate: 0.001   # bias += rate x sign(mean load - load) per optimizer step
//     bias_centered: false      # subtract the update's mean over the experts
//     aux_loss: pooled          # pooled (HF's, over all layers) | per_layer (mean of each layer's own)
//   logging:
//     every: 1                  # progress line + metrics.jsonl record every N steps
//     expert_stats_every: 10    # per-layer expert load (0 = off)
//     expert_health_every: 10   # per-layer load CV, max/mean, dead experts, router entropy (0 = off)
//     peak_gflops: 0            # per-rank fp32 peak for the MFU (0: this CPU's estimate, core/cpu_peak.h)
//   checkpoint:
//     every: 0                  # steps between checkpoints (0: only at the end)
//     keep: 3
//     resume: auto              # auto | none | a checkpoint folder
//   export:
//     hf: true                  # HF folder at the end (out/hf)
//     dtype: bf16               # f32 | bf16 | f16
//     shard_mb: 4096
//     tokenizer: null           # tokenizer.json or its folder, whose tokenizer files are copied into the export
//   parallel:                   # world size = dp x fsdp x ep x tp (mpirun -n / srun --ntasks)
//     dp: 1                     # data-parallel replicas
//     fsdp: 1                   # FSDP shard degree
//     tp: 1                     # tensor-parallel degree
//     ep: 1                     # expert-parallel degree (must divide the number of experts)
//     step_timeout_s: 1800      # watchdog: no progress for this long ends every rank (0: off)
//   output_dir: out/run
//
// docs/config.md is the user's page of this schema; `q3vl train --print-config` prints it with every default.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace q3vl::app {

struct ModelSection {
  std::optional<std::string> flavor, config, checkpoint;
  uint64_t init_seed = 0;
  std::optional<double> router_aux_loss_coef;

  bool operator==(const ModelSection&) const = default;
};

struct DataSection {
  std::string dir;
  std::optional<uint64_t> seed;
  int sequences_per_batch = 1;
  int prefetch = 2;

  bool operator==(const DataSection&) const = default;
};

struct TrainSection {
  int64_t steps = 100;
  int grad_accum = 1;
  uint64_t seed = 0;
  int64_t max_tokens = 0;
  bool skip_nonfinite = false;  // on_nonfinite: skip

  bool operator==(const TrainSection&) const = default;
};

struct OptimizerSection {
  double lr = 1e-4, min_lr = 0.0;
  int64_t warmup_steps = 0;
  std::string decay = "cosine";
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  std::vector<std::string> no_decay = {"norm", "bias", "embedding"};
  double grad_clip = 1.0;
  std::map<std::string, double> lr_scale = {{"vision_tower", 1.0}, {"mergers", 1.0}, {"language_model", 1.0}};
  std::vector<std::string> freeze;

  bool operator==(const OptimizerSection&) const = default;
};

// MoE load balancing. The router bias (balance bias or aux+bias) is per MoE layer and expert, added to the
// softmax probabilities for choosing the top-k only (core/layers/moe.h), updated after every optimizer step that
// is not skipped from the step's global expert loads (all micro-batches and data ranks), and kept in
// checkpoints (trainer_state.json).
struct MoeSection {
  std::string balance = "aux";
  double bias_update_rate = 1e-3;
  bool bias_centered = false;
  std::string aux_loss = "pooled";
  bool uses_aux() const { return balance != "bias"; }
  bool uses_bias() const { return balance != "aux"; }

  bool operator==(const MoeSection&) const = default;
};

struct LoggingSection {
  int64_t every = 1;
  int64_t expert_stats_every = 10;
  int64_t expert_health_every = 10;
  double peak_gflops = 0.0;

  bool operator==(const LoggingSection&) const = default;
};

struct CheckpointSection {
  int64_t every = 0;
  int keep = 3;
  std::string resume = "auto";

  bool operator==(const CheckpointSection&) const = default;
};

struct ExportSection {
  bool hf = true;
  std::string dtype = "bf16";
  int64_t shard_mb = 4096;
  std::optional<std::string> tokenizer;

  bool operator==(const ExportSection&) const = default;
};

// The process grid (parallel/process_grid.h): world size = dp x fsdp x ep x tp. Every rank of dp x fsdp x ep reads
// its own sequences (tp ranks share theirs); non-expert parameters are sharded over fsdp x ep ranks and
// tensor-parallel over tp; the experts are split over ep ranks (ep must divide them) and sharded over fsdp. All
// four degrees run (app/trainer.h says how each is trained and checkpointed).
struct ParallelSection {
  int dp = 1, fsdp = 1, tp = 1, ep = 1;
  double step_timeout_s = 1800;  // multi-rank runs: end the job when a step makes no progress this long; 0: off
  int world() const { return dp * fsdp * ep * tp; }
  bool operator==(const ParallelSection&) const = default;
};

struct TrainConfig {
  ModelSection model;
  DataSection data;
  TrainSection train;
  OptimizerSection optimizer;
  MoeSection moe;
  LoggingSection logging;
  CheckpointSection checkpoint;
  ExportSection export_;
  ParallelSection parallel;
  std::string output_dir = "out/run";

  // Reads a YAML file and applies `overrides` ("a.b=value", value parsed as YAML), then validates.
  // Relative paths in the file are resolved against the file's folder; those in overrides against the
  // current directory.
  static TrainConfig load(const std::string& path, const std::vector<std::string>& overrides = {});
  static TrainConfig parse(const std::string& yaml_text, const std::string& source_name,
                           const std::vector<std::string>& overrides = {}, const std::string& base_dir = ".");
  // Every field, defaults included, as YAML that parse() reads back to an equal config.
  std::string to_yaml() const;
  // Warnings about a valid but probably unintended config (q3vl train prints them), e.g. a run that is all warmup.
  std::vector<std::string> hints() const;
  // The value checks parse() runs after the overrides, for a config built in code; errors name the key
  // and `source_name`.
  void validate(const std::string& source_name = "train config") const;

  bool operator==(const TrainConfig&) const = default;
};

}  // namespace q3vl::app
