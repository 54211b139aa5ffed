// q3vl train CONFIG.yaml [--set key.path=value ...] [--print-config] [--dry-run]: validates the config, then runs
// the trainer (trainer.h). SIGTERM and SIGUSR1 (what Slurm sends before a time limit) make the run save a
// checkpoint at the next step boundary and exit 0; resubmitting the same command resumes from it
// (checkpoint.resume: auto). Under mpirun or srun the ranks form the process grid of the `parallel:` section; an
// error on one rank ends all.
// --print-config prints the resolved config (every key, defaults and comments: the config.yaml a run writes) and
// exits; --dry-run builds the trainer under the same MPI setup as a run (data, tokenizer, model, layout, output
// folder and resume checkpoint validated, nothing written) and prints the plan of the run.
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "app/cli.h"
#include "app/commands.h"
#include "app/plan_memory.h"
#include "app/train_config.h"
#include "app/trainer.h"
#include "core/model/param_specs.h"
#include "io/shard_format.h"
#include "parallel/mpi_comm.h"

namespace q3vl::app {

namespace {

// What a run of `config` would do, from the built trainer (rank 0 prints it).
void print_plan(const TrainConfig& config, const Trainer& trainer, int world_size) {
  const ModelConfig& mc = trainer.model().config();
  const ParallelSection& p = config.parallel;
  const io::Manifest manifest = io::read_manifest(config.data.dir + "/manifest.json");
  const int64_t micro_tokens =
      config.train.max_tokens > 0 ? config.train.max_tokens : config.data.sequences_per_batch * manifest.token_budget;
  const int64_t data_ranks = static_cast<int64_t>(p.dp) * p.fsdp * p.ep;
  PlanLayoutArgs layout;
  layout.dp = p.dp;
  layout.fsdp = p.fsdp;
  layout.ep = p.ep;
  layout.tp = p.tp;
  BatchShape shape;
  shape.batch = 1;
  shape.seq = micro_tokens;
  const PlanMemory memory = plan_memory(mc, layout, shape);
  std::cout << "dry run: the config, data, tokenizer, model, layout and output folder are valid; nothing was written\n"
            << "model: " << count_parameters(mc) << " parameters (" << count_active_text_parameters(mc)
            << " active per text token), " << mc.text.num_hidden_layers << " text layers, " << mc.num_moe_layers()
            << " MoE\n"
            << "layout: " << world_size << " ranks = dp " << p.dp << " x fsdp " << p.fsdp << " x ep " << p.ep
            << " x tp " << p.tp << "; " << data_ranks << " data-parallel token streams\n"
            << "data: " << config.data.dir << ", token budget " << manifest.token_budget << " per sequence\n"
            << "step: up to " << micro_tokens << " tokens per micro-batch x grad_accum " << config.train.grad_accum
            << " x " << data_ranks << " streams = " << micro_tokens * config.train.grad_accum * data_ranks
            << " tokens per optimizer step\n"
            << "steps: " << config.train.steps << " (warmup " << config.optimizer.warmup_steps << ", decay "
            << config.optimizer.decay << "), checkpoints "
            << (config.checkpoint.every > 0 ? "every " + std::to_string(config.checkpoint.every) + " steps"
                                            : std::string("at the end"))
            << " into " << config.output_dir << "\n"
            << "memory per rank (plan, text-only micro-batch): " << memory.total() << " B\n";
}

}  // namespace

int run_train(const std::vector<std::string>& args) {
  auto cli = make_command("train", "Trains from a YAML config (the schema: docs/config.md; examples: jobs/configs/).");
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false, dry_run = false;
  cli->add_option("config", config_path, "the training config (YAML)")->type_name("CONFIG.yaml");
  cli->add_option("--set", overrides, "override one key, e.g. --set train.steps=10 (repeatable; also --set=key=value)")
      ->type_name("KEY.PATH=VALUE")
      ->allow_extra_args(false);
  cli->add_flag("--print-config", print_config,
                "print the resolved config (every key, defaults and comments) and exit; without CONFIG the defaults");
  cli->add_flag("--dry-run", dry_run,
                "validate config, data, model and layout (under mpirun/srun as a run would) and print the plan; "
                "trains and writes nothing");
  if (const auto done = parse_command(*cli, args)) return *done;
  if (print_config && dry_run) throw UsageError("--print-config and --dry-run do not go together");
  if (print_config) {
    const TrainConfig config = !config_path.empty()  ? TrainConfig::load(config_path, overrides)
                               : !overrides.empty() ? TrainConfig::parse("", "--set", overrides)
                                                    : TrainConfig();
    std::cout << config.to_yaml();
    return kExitOk;
  }
  if (config_path.empty()) throw UsageError("a CONFIG.yaml is required");
  const TrainConfig config = TrainConfig::load(config_path, overrides);
  for (const std::string& hint : config.hints()) std::cerr << "q3vl train: hint: " << hint << "\n";
  std::optional<parallel::MpiSession> mpi;
  if (parallel::MpiSession::launched_by_mpirun()) mpi.emplace();
  parallel::Comm* world = mpi ? &mpi->world() : nullptr;
  const bool root = world == nullptr || world->rank() == 0;
  Trainer::clear_stop_request();
  Trainer::install_stop_signal_handlers();
  try {
    Trainer trainer(config, std::cout, world, dry_run);
    if (dry_run) {
      if (root) print_plan(config, trainer, world != nullptr ? world->size() : 1);
      return kExitOk;
    }
    const TrainOutcome outcome = trainer.run();
    if (!root) return kExitOk;
    if (!outcome.steps.empty()) {
      std::cout << "done: steps " << outcome.start_step << " -> " << outcome.steps_done << ", loss "
                << outcome.steps.front().loss << " -> " << outcome.steps.back().loss;
      if (!outcome.last_checkpoint.empty()) std::cout << ", checkpoint " << outcome.last_checkpoint;
      if (!outcome.export_dir.empty()) std::cout << ", HF export " << outcome.export_dir;
      std::cout << "\n";
    } else {
      std::cout << "done: nothing to do (step " << outcome.steps_done << " of " << config.train.steps << ")\n";
    }
  } catch (const std::exception& e) {
    // One rank's error ends the job: the others would wait forever in the next collective.
    if (world != nullptr && world->size() > 1) parallel::abort_all(error_line("q3vl", "train", e));
    throw;
  }
  return kExitOk;
}

}  // namespace q3vl::app
