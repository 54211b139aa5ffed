// The training loop of `q3vl train` on one process: model (flavor, config.json or HF checkpoint), packed-shard
// loader, AdamW with schedule and clipping, gradient accumulation, progress and JSON-lines metrics, atomic
// checkpoints with exact resume, stop-and-save on a signal, and the HF export at the end.
//
// Step s (0-based) consumes grad_accum micro-batches. Their cross-entropy is one mean over all their target
// tokens and their aux loss a mean over micro-batches, so accumulation gives the gradient of the same loss
// as one big batch. A non-finite loss or gradient norm stops the run (exit code 1) or, with
// train.on_nonfinite: skip, skips the optimizer update for that step and counts it.
//
// Everything the next step depends on (weights, AdamW moments and step, loader position, counters) is in a
// checkpoint, so N steps + resume + N steps equal 2N steps bit for bit.
//
// Parallel layouts (parallel/process_grid.h: world = dp x fsdp x ep x tp, every rank of dp x fsdp x ep reading its
// own sequences). The CE normaliser and the MoE routing statistics (so the aux loss is the global batch's) are
// summed over ranks, so a run on R ranks with one sequence each computes the loss and update of one rank with R
// sequences, up to fp32 summation order.
// Every layout goes through one sharding mechanism (parallel/sharded_params.h), which cuts each FSDP unit into flat
// groups and gives every rank a piece of each for its AdamW; a layout only chooses the groups' ranks and residency:
// - fsdp = ep = tp = 1 (data parallelism only; one process too): resident, every rank holds the whole model; the
//   gradients are reduce-scattered into the pieces and AdamW steps this rank's (ZeRO-1), the updated pieces are
//   all-gathered; rank 0 writes whole-tensor checkpoints.
// - fsdp x ep x tp > 1: per unit, parameters, gradients and AdamW state are sharded (ZeRO-3, units
//   gathered inside the model's forward and backward), the experts split over ep ranks with token exchange
//   (core/layers/moe.h); the ranks of replica 0 write their pieces into a sharded checkpoint; the HF export
//   is gathered unit by unit while rank 0 writes it.
// - tp > 1: each tensor-parallel group shares its sequences and splits the attention heads, MLP columns and (without
//   expert parallelism) the experts' columns (core/model/tp_layout.h); replicated tensors whose gradients are partial
//   sums over the group are all-reduced over it.
// Any checkpoint resumes in any layout (io/sharded_checkpoint.h reads element ranges of either format).
// The trainer's parts live in trainer*.cpp around one shared state (trainer_impl.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "app/train_config.h"
#include "core/model/model.h"

namespace q3vl::parallel {
class Comm;
}

namespace q3vl::app {

// Where a step's time went, in seconds: waiting for the loader; forward and backward of its micro-batches (the
// collectives inside the model, FSDP gathers and expert exchanges, count there); the trainer's collectives (sums of
// token counts, losses and gradients, the parameter all-gather); the optimizer (gradient norm, AdamW, router bias).
struct StepPhases {
  double data_s = 0, forward_s = 0, backward_s = 0, comm_s = 0, optimizer_s = 0;
};

struct StepRecord {
  int64_t step = 0;  // 1-based count of optimizer steps done
  double loss = 0, ce_loss = 0, aux_loss = 0, grad_norm = 0, lr = 0;
  int64_t tokens = 0, target_tokens = 0;
  double seconds = 0;
  bool skipped = false;
  // The smallest routing margin of the step (MoeStats::min_margin over its micro-batches, MoE layers and data
  // ranks); infinity without MoE layers.
  double router_margin = std::numeric_limits<double>::infinity();
  StepPhases phases;
};

struct TrainOutcome {
  int64_t start_step = 0;          // steps already done when the run started (resume)
  int64_t steps_done = 0;          // optimizer steps done at the end (including start_step)
  bool stopped_by_signal = false;  // a stop request ended the run early (after saving)
  std::vector<StepRecord> steps;   // the steps this run executed
  std::string last_checkpoint;     // the newest checkpoint written (empty if none)
  std::string export_dir;          // the HF export (empty if none)
};

class Trainer {
 public:
  // Validates the inputs (data, tokenizer, output folder, checkpoint to resume) and builds everything; errors
  // name the key or file. `out` receives the human progress lines.
  // `comm`: the ranks of this run (nullptr: one process). Only rank 0 writes to `out`.
  // `dry_run` (q3vl train --dry-run): the same validation and construction, but no file or folder is written
  // (output_dir must be creatable); run() must not be called.
  Trainer(const TrainConfig& config, std::ostream& out, parallel::Comm* comm = nullptr, bool dry_run = false);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  TrainOutcome run();

  // Called after every step (tests use it to raise a signal at a chosen step).
  void set_step_callback(std::function<void(const StepRecord&)> callback);

  const Model& model() const;

  // Asks the running trainer to save at the next step boundary and return (async-signal-safe).
  static void request_stop();
  static void clear_stop_request();
  // SIGTERM and SIGUSR1 call request_stop().
  static void install_stop_signal_handlers();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Which module a parameter belongs to for freezing and learning-rate scales: "vision_tower", "mergers"
// (the final and DeepStack mergers) or "language_model" (decoder, embeddings and lm_head).
std::string param_module(const std::string& hf_key);

}  // namespace q3vl::app
