// Trainer::Impl: the state of one training run, shared by the trainer's parts, each in a file of its own:
//   trainer.cpp            building the run (config, model, data, optimizer) and its step loop
//   trainer_step.cpp       one optimizer step: micro-batches, forward/backward, gradient reduction, update
//   trainer_checkpoint.cpp saving and resuming (whole-tensor and sharded checkpoints)
//   trainer_export.cpp     the HF export at the end of a run
//   trainer_log.cpp        progress lines (timestamped, rank 0) and metrics.jsonl records
// Private to app/.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <ostream>
#include <streambuf>
#include <string>
#include <vector>

#include "app/hf_export.h"
#include "app/train_config.h"
#include "app/trainer.h"
#include "app/watchdog.h"
#include "core/model/flops.h"
#include "core/model/model.h"
#include "core/optim/adamw.h"
#include "core/optim/lr_schedule.h"
#include "io/loader.h"
#include "io/model_io.h"
#include "io/train_checkpoint.h"
#include "io/write_progress.h"
#include "parallel/comm.h"
#include "parallel/expert_exchange.h"
#include "parallel/process_grid.h"
#include "parallel/sharded_params.h"
#include "parallel/tensor_parallel_comm.h"

namespace q3vl::app {

using json = nlohmann::json;

// Set by a stop signal, read at step boundaries (trainer.cpp).
extern std::atomic<bool> g_stop_requested;

// Discards what is written (the human log of ranks other than 0).
class NullBuffer : public std::streambuf {
 protected:
  int overflow(int c) override { return c; }
};

struct Trainer::Impl {
  TrainConfig cfg;
  std::unique_ptr<parallel::Comm> own_comm;
  parallel::Comm& comm;
  bool root;
  NullBuffer null_buffer;
  std::ostream null_out{&null_buffer};
  std::ostream& out;
  std::unique_ptr<parallel::ProcessGrid> grid;
  std::unique_ptr<Model> model;
  // Which elements this rank's AdamW steps, in every layout: with fsdp x ep x tp > 1 the parameters live sharded
  // here (gathered per unit); otherwise every rank holds the whole model and the optimizer state is split over the
  // dp ranks (resident sharding: ZeRO-1).
  std::unique_ptr<parallel::ShardedParams> sharded;
  std::unique_ptr<ExpertExchange> expert_exchange;
  std::unique_ptr<TensorParallel> tensor_parallel;
  // The pieces the gradient norm sums: tensors replicated over tp ranks count on tp rank 0 only.
  std::vector<OptimTensor> norm_tensors;
  // Pieces of replicated tensors whose gradients are partial sums over the tp ranks (tp_layout.h).
  std::vector<size_t> tp_partial_pieces;
  std::vector<float> tp_partial_buffer;
  std::unique_ptr<io::Loader> loader;
  std::vector<OptimTensor> shard_tensors;  // this rank's pieces (sharded->pieces()), what adamw steps
  std::unique_ptr<AdamW> adamw;
  LrSchedule schedule;
  FlopModel flops;
  std::unique_ptr<Workspace> workspace;
  std::string checkpoint_root, metrics_path, config_yaml;
  std::ofstream metrics;
  int64_t step = 0;           // optimizer steps done
  int64_t tokens_seen = 0;    // tokens consumed over the whole run (resumes included)
  int64_t skipped_steps = 0;
  bool resumed = false;  // metrics.jsonl continues (else a fresh run starts it anew)
  bool dry_run = false;  // validate and build only: no folder, config.yaml or metrics.jsonl is written
  double ema_step_seconds = 0;
  // Per-rank fp32 peak behind the MFU: logging.peak_gflops when set, else this CPU's estimate; and where it came
  // from, printed at the start so an odd MFU can be traced to its figure.
  double peak_gflops = 0;
  std::string peak_source;
  std::function<void(const StepRecord&)> step_callback;
  std::unique_ptr<Watchdog> watchdog;
  // Fault injection for the watchdog test: Q3VL_FAULT_HANG=RANK:STEP makes that rank stop making progress
  // (sleep) when it starts that step.
  int hang_rank = -1;
  int64_t hang_step = -1;

  void beat(const std::string& what) {
    if (watchdog) watchdog->beat(what);
  }
  std::vector<std::vector<int64_t>> expert_counts;  // per MoE layer, accumulated over a step
  // Expert-health window (logging.expert_health_every steps), global over the data ranks: per MoE layer the
  // expert loads, the router entropy summed over valid tokens, and those tokens.
  std::vector<std::vector<int64_t>> health_counts;
  std::vector<double> health_entropy;
  std::vector<int64_t> health_tokens;
  int64_t health_steps = 0;  // steps in the window (fewer than expert_health_every after a resume)

  // The per-rank peak behind the MFU is chosen here (trainer.cpp).
  Impl(const TrainConfig& c, std::ostream& o, parallel::Comm* shared);

  // trainer.cpp
  void build();
  void build_model();
  void build_optimizer(const AdamWOptions& options);

  // trainer_step.cpp
  StepRecord train_step();
  void reduce_expert_stats(std::vector<MoeStats>& layers);
  void reduce_gradients();
  void update_router_bias();

  // trainer_checkpoint.cpp
  void resume_if_asked();
  void load_checkpoint(const std::string& dir, std::string& trainer_state);
  void restore_router_bias(const json& state, const std::string& dir);
  std::string trainer_state_json() const;
  std::string save_checkpoint();
  std::string save_sharded_checkpoint();
  // The AdamW moments as whole tensors shaped like their parameters, under the names a checkpoint stores them
  // ("<key>.exp_avg", "<key>.exp_avg_sq"), in `storage`, gathered from every rank's pieces (resident sharding).
  std::vector<io::NamedTensor> full_moments(std::vector<float>& storage);

  // trainer_export.cpp: the HF export of the final model into `dir` (every rank takes part).
  void export_model(const std::string& dir);
  void export_sharded(const std::string& dir, HfExportOptions options);

  // trainer_log.cpp
  // A human progress line of rank 0, starting with the wall-clock time.
  std::ostream& say();
  // One metrics.jsonl record (rank 0), stamped with the wall-clock time.
  void emit(json record);
  void log_start();
  void log_memory();
  void log_step(const StepRecord& r, int64_t step_flops);
  void log_expert_load();
  void log_expert_health();
  // The write observer of the save or export named `what`: progress lines while it takes long.
  io::WriteObserver save_progress(const std::string& what);
};

}  // namespace q3vl::app
