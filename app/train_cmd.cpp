// q3vl train CONFIG.yaml [--set key.path=value ...]: validates the config, then runs the trainer (trainer.h).
// SIGTERM and SIGUSR1 (what Slurm sends before a time limit) make the run save a checkpoint at the next step
// boundary and exit 0; resubmitting the same command resumes from it (checkpoint.resume: auto). Under mpirun
// or srun the ranks form the data-parallel group of the `parallel:` section; an error on one rank ends all.
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "app/commands.h"
#include "app/train_config.h"
#include "app/trainer.h"
#include "parallel/mpi_comm.h"

namespace q3vl::app {

namespace {

constexpr const char* kUsage = "usage: q3vl train CONFIG.yaml [--set key.path=value ...]";

}  // namespace

int run_train(const std::vector<std::string>& args) {
  std::string config_path;
  std::vector<std::string> overrides;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::cout << kUsage << "\n";
      return 0;
    }
    if (a == "--set") {
      if (i + 1 >= args.size()) {
        std::cerr << "train: --set needs key.path=value\n" << kUsage << "\n";
        return 2;
      }
      overrides.push_back(args[++i]);
    } else if (a.rfind("--set=", 0) == 0) {
      overrides.push_back(a.substr(6));
    } else if (a.rfind("--", 0) == 0 || !config_path.empty()) {
      std::cerr << "train: unexpected argument '" << a << "'\n" << kUsage << "\n";
      return 2;
    } else {
      config_path = a;
    }
  }
  if (config_path.empty()) {
    std::cerr << kUsage << "\n";
    return 2;
  }
  const TrainConfig config = TrainConfig::load(config_path, overrides);
  std::optional<parallel::MpiSession> mpi;
  if (parallel::MpiSession::launched_by_mpirun()) mpi.emplace();
  parallel::Comm* world = mpi ? &mpi->world() : nullptr;
  const bool root = world == nullptr || world->rank() == 0;
  Trainer::clear_stop_request();
  Trainer::install_stop_signal_handlers();
  try {
    Trainer trainer(config, std::cout, world);
    const TrainOutcome outcome = trainer.run();
    if (!root) return 0;
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
    if (world != nullptr && world->size() > 1) parallel::abort_all(std::string("q3vl train: ") + e.what());
    throw;
  }
  return 0;
}

}  // namespace q3vl::app
