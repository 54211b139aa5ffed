// The trainer's construction (config, model, data, optimizer) and its step loop (trainer.h); the step itself,
// checkpoints, export and logging are in the trainer_*.cpp files beside it (trainer_impl.h).
#include "app/trainer.h"

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <omp.h>
#include <unistd.h>

#include "app/trainer_impl.h"
#include "core/check.h"
#include "core/cpu_peak.h"
#include "io/hf_config.h"
#include "io/shard_format.h"
#include "parallel/self_comm.h"

namespace q3vl::app {

namespace fs = std::filesystem;

std::atomic<bool> g_stop_requested{false};

namespace {

// Fails unless `dir` exists (or can be created) and a file can be written in it.
void require_writable_dir(const std::string& dir, const std::string& what) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  Q3VL_CHECK(!ec && fs::is_directory(dir), what, ": cannot create folder '", dir, "': ", ec.message());
  const fs::path probe = fs::path(dir) / ".q3vl-write-test";
  {
    std::ofstream f(probe);
    Q3VL_CHECK(f.good() && (f << "ok") && f.flush(), what, ": folder '", dir, "' is not writable");
  }
  fs::remove(probe, ec);
}

// A dry run writes nothing: `dir` must exist as a writable folder, or its nearest existing ancestor must.
void require_creatable_dir(const std::string& dir, const std::string& what) {
  fs::path existing = fs::absolute(dir);
  while (!fs::exists(existing) && existing.has_parent_path() && existing != existing.parent_path())
    existing = existing.parent_path();
  Q3VL_CHECK(fs::is_directory(existing), what, ": cannot create folder '", dir, "': '", existing.string(),
             "' is not a folder");
  Q3VL_CHECK(::access(existing.c_str(), W_OK) == 0, what, ": folder '", existing.string(), "' is not writable");
}

}  // namespace

std::string param_module(const std::string& key) {
  if (key.rfind("model.visual.merger", 0) == 0 || key.rfind("model.visual.deepstack_merger_list", 0) == 0) return "mergers";
  if (key.rfind("model.visual.", 0) == 0) return "vision_tower";
  return "language_model";
}

Trainer::Impl::Impl(const TrainConfig& c, std::ostream& o, parallel::Comm* shared)
    : cfg(c),
      own_comm(shared ? nullptr : std::make_unique<parallel::SelfComm>()),
      comm(shared ? *shared : *own_comm),
      root(comm.rank() == 0),
      out(root ? o : null_out) {
  if (cfg.logging.peak_gflops > 0) {
    peak_gflops = cfg.logging.peak_gflops;
    peak_source = "from config logging.peak_gflops";
  } else {
    const CpuPeak cpu = detect_cpu_peak(omp_get_max_threads());
    peak_gflops = cpu.gflops();
    peak_source = peak_gflops > 0 ? "detected: " + cpu.describe()
                                  : "not detected: /proc/cpuinfo gives no clock; set logging.peak_gflops for an MFU";
  }
}


void Trainer::Impl::build() {
  cfg.validate();
  const ParallelSection& par = cfg.parallel;
  grid = std::make_unique<parallel::ProcessGrid>(comm, parallel::GridShape{par.dp, par.fsdp, par.ep, par.tp});
  // Output folder first: nothing is computed for a run that cannot write its results.
  if (root) (dry_run ? require_creatable_dir : require_writable_dir)(cfg.output_dir, "output_dir");
  comm.barrier();
  checkpoint_root = (fs::path(cfg.output_dir) / "checkpoints").string();
  metrics_path = (fs::path(cfg.output_dir) / "metrics.jsonl").string();
  build_model();
  const ModelConfig& mc = model->config();
  flops = flop_model(mc);
  if (cfg.moe.uses_bias()) {
    Q3VL_CHECK(mc.num_moe_layers() > 0, "moe.balance: '", cfg.moe.balance,
               "' needs MoE layers, but the model has none (use moe.balance: aux)");
    model->enable_router_bias();
  }

  // Data: the manifest and shards are validated by the loader; the tokenizer must be the one packed with.
  io::LoaderOptions lo;
  lo.dir = cfg.data.dir;
  lo.state.seed = cfg.data.seed.value_or(cfg.train.seed);
  lo.sequences_per_batch = cfg.data.sequences_per_batch;
  lo.prefetch = cfg.data.prefetch;
  // Ranks get equal shares of each step's training FLOPs (not just tokens), so none waits on another's images.
  lo.cost = [model_flops = flops](const io::SequenceCost& s) {
    return train_flops(model_flops, s.document_tokens, s.item_patches);
  };
  // Tensor-parallel ranks share their sequences: the loader splits the data over the other dimensions.
  lo.rank = grid->data().rank();
  lo.world = grid->data().size();
  loader = std::make_unique<io::Loader>(lo);
  const io::Manifest& manifest = loader->manifest();
  Q3VL_CHECK(loader->batches_per_epoch() > 0, "data.dir: '", cfg.data.dir, "' holds ", loader->num_sequences(),
             " packed sequences, fewer than data.sequences_per_batch = ", cfg.data.sequences_per_batch);
  std::vector<std::string> tokenizer_files;
  if (cfg.export_.tokenizer) tokenizer_files.push_back((fs::path(*cfg.export_.tokenizer) / "tokenizer.json").string());
  if (cfg.model.checkpoint && fs::exists(fs::path(*cfg.model.checkpoint) / "tokenizer.json"))
    tokenizer_files.push_back((fs::path(*cfg.model.checkpoint) / "tokenizer.json").string());
  for (const std::string& t : tokenizer_files) {
    const std::string hash = io::tokenizer_file_hash(t);
    Q3VL_CHECK(hash == manifest.tokenizer_hash, "data.dir: '", cfg.data.dir, "' was packed with tokenizer ",
               manifest.tokenizer_hash, " but '", t, "' has hash ", hash, " (pack the data with this tokenizer)");
  }

  AdamWOptions ao;
  ao.beta1 = cfg.optimizer.beta1;
  ao.beta2 = cfg.optimizer.beta2;
  ao.eps = cfg.optimizer.eps;
  ao.weight_decay = cfg.optimizer.weight_decay;
  build_optimizer(ao);
  schedule.lr = cfg.optimizer.lr;
  schedule.min_lr = cfg.optimizer.min_lr;
  schedule.warmup_steps = cfg.optimizer.warmup_steps;
  schedule.total_steps = cfg.train.steps;
  schedule.decay = parse_lr_decay(cfg.optimizer.decay);
  schedule.validate();
  expert_counts.assign(mc.num_moe_layers(), std::vector<int64_t>(std::max(mc.text.num_experts, 0), 0));
  health_counts = expert_counts;
  health_entropy.assign(mc.num_moe_layers(), 0.0);
  health_tokens.assign(mc.num_moe_layers(), 0);

  config_yaml = cfg.to_yaml();
  if (root && !dry_run) {
    std::ofstream f(fs::path(cfg.output_dir) / "config.yaml");
    f << config_yaml;
    Q3VL_CHECK(f.flush(), "output_dir: cannot write '", (fs::path(cfg.output_dir) / "config.yaml").string(), "'");
  }
}

void Trainer::Impl::build_model() {
  ModelConfig mc = io::load_model_config(cfg.model.checkpoint ? *cfg.model.checkpoint
                                        : cfg.model.flavor   ? *cfg.model.flavor
                                                             : *cfg.model.config);
  if (cfg.model.router_aux_loss_coef) mc.text.router_aux_loss_coef = *cfg.model.router_aux_loss_coef;
  const ParallelSection& par = cfg.parallel;
  if (grid->shape().data_parallel_only()) {
    // Pure data parallelism: the whole model on every rank, the optimizer's elements split over the ranks.
    std::unique_ptr<Model> loaded;  // an HF checkpoint, whole
    if (cfg.model.checkpoint) loaded = io::load_hf_model(*cfg.model.checkpoint);
    if (loaded && !cfg.model.router_aux_loss_coef) {
      model = std::move(loaded);
    } else {
      model = std::make_unique<Model>(mc);
      if (loaded) {
        for (size_t i = 0; i < model->weights().size(); ++i) copy(model->weights().tensor(i), loaded->weights().tensor(i));
      } else {
        model->init_weights(cfg.model.init_seed);
      }
    }
    sharded = std::make_unique<parallel::ShardedParams>(*model, *grid, parallel::Residency::resident);
    return;
  }
  // With tensor parallelism the experts are split like a dense MLP unless expert parallelism holds them whole.
  const TpLayout tp{par.tp, grid->tp_index(), par.ep == 1};
  model = std::make_unique<Model>(mc, DType::f32, tp);
  sharded = std::make_unique<parallel::ShardedParams>(*model, *grid);
  if (cfg.model.checkpoint) {
    // One whole tensor at a time through a staging buffer: every rank copies out its pieces.
    const std::vector<ParamSpec>& specs = model->weights().specs();
    std::map<std::string, size_t> spec_index;
    int64_t largest = 0;
    for (size_t i = 0; i < specs.size(); ++i) {
      spec_index[specs[i].hf_key] = i;
      largest = std::max(largest, specs[i].numel());
    }
    std::vector<float> staging(static_cast<size_t>(largest));
    io::load_hf_weights(
        *cfg.model.checkpoint, mc,
        [&](const std::string& key) { return Tensor(staging.data(), DType::f32, specs[spec_index.at(key)].shape); },
        [&](const std::string& key) {
          const size_t spec = spec_index.at(key);
          for (const parallel::ShardedParams::Piece& p : sharded->pieces()) {
            if (p.spec != spec) continue;
            for (const TpRun& r : tp_global_runs(specs[spec], tp, p.offset, p.numel))
              std::copy_n(staging.data() + r.global_offset, r.numel, p.param + (r.local_offset - p.offset));
          }
        });
  } else {
    sharded->init(cfg.model.init_seed, mc.text.initializer_range);
  }
  model->set_param_hooks(sharded.get());
  if (par.ep > 1) {
    expert_exchange = std::make_unique<parallel::CommExpertExchange>(grid->expert());
    model->set_expert_exchange(expert_exchange.get());
  }
  if (par.tp > 1) {
    tensor_parallel = std::make_unique<parallel::CommTensorParallel>(grid->tp());
    model->set_tensor_parallel(tensor_parallel.get());
  }
}

void Trainer::Impl::build_optimizer(const AdamWOptions& ao) {
  const std::vector<std::string>& frozen = cfg.optimizer.freeze;
  const auto entry = [&](size_t i, const Tensor& param, const Tensor& grad) {
    const ParamSpec& spec = model->weights().specs()[i];
    OptimTensor t;
    t.name = spec.hf_key;
    t.param = param;
    t.grad = grad;
    const std::string kind(param_kind_name(spec.kind));
    t.decay = std::find(cfg.optimizer.no_decay.begin(), cfg.optimizer.no_decay.end(), kind) == cfg.optimizer.no_decay.end();
    const std::string module = param_module(spec.hf_key);
    t.lr_scale = cfg.optimizer.lr_scale.at(module);
    t.frozen = std::find(frozen.begin(), frozen.end(), module) != frozen.end();
    return t;
  };
  // AdamW steps exactly this rank's pieces (every layout: sharded->pieces()).
  const TpLayout& tp = model->tp_layout();
  const auto& pieces = sharded->pieces();
  for (size_t i = 0; i < pieces.size(); ++i) {
    const parallel::ShardedParams::Piece& p = pieces[i];
    shard_tensors.push_back(entry(p.spec, Tensor(p.param, DType::f32, {p.numel}), Tensor(p.grad, DType::f32, {p.numel})));
    const ParamSpec& spec = model->weights().specs()[p.spec];
    if (tp_split_dim(spec, tp) >= 0 || tp.rank == 0) norm_tensors.push_back(shard_tensors.back());
    if (tp_partial_grad(spec, tp)) tp_partial_pieces.push_back(i);
  }
  size_t partial = 0;
  for (const size_t i : tp_partial_pieces) partial += static_cast<size_t>(pieces[i].numel);
  tp_partial_buffer.resize(partial);
  adamw = std::make_unique<AdamW>(shard_tensors, ao);
}

Trainer::Trainer(const TrainConfig& config, std::ostream& out, parallel::Comm* comm, bool dry_run)
    : impl_(std::make_unique<Impl>(config, out, comm)) {
  impl_->dry_run = dry_run;
  impl_->build();
  impl_->resume_if_asked();
  if (impl_->root && !dry_run) {
    impl_->metrics.open(impl_->metrics_path, impl_->resumed ? std::ios::app : std::ios::trunc);
    Q3VL_CHECK(impl_->metrics.good(), "output_dir: cannot open '", impl_->metrics_path, "' for writing");
  }
}

Trainer::~Trainer() = default;

const Model& Trainer::model() const { return *impl_->model; }

void Trainer::set_step_callback(std::function<void(const StepRecord&)> callback) {
  impl_->step_callback = std::move(callback);
}

namespace {
extern "C" void on_stop_signal(int) { Trainer::request_stop(); }
}  // namespace

void Trainer::install_stop_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGUSR1, &sa, nullptr);
}

void Trainer::request_stop() { g_stop_requested.store(true); }
void Trainer::clear_stop_request() { g_stop_requested.store(false); }

TrainOutcome Trainer::run() {
  Impl& m = *impl_;
  TrainOutcome outcome;
  outcome.start_step = m.step;
  m.log_start();

  if (m.comm.size() > 1) m.watchdog = std::make_unique<Watchdog>(m.cfg.parallel.step_timeout_s, m.comm.rank());
  if (const char* hang = std::getenv("Q3VL_FAULT_HANG")) {
    long long hang_step = 0;
    Q3VL_CHECK(std::sscanf(hang, "%d:%lld", &m.hang_rank, &hang_step) == 2, "Q3VL_FAULT_HANG: expected RANK:STEP, got '",
               hang, "'");
    m.hang_step = hang_step;
  }
  const bool periodic = m.cfg.checkpoint.every > 0;
  while (m.step < m.cfg.train.steps) {
    outcome.steps.push_back(m.train_step());
    if (outcome.steps.size() == 1) m.log_memory();
    if (m.step_callback) m.step_callback(outcome.steps.back());
    if (m.cfg.logging.expert_stats_every > 0 && m.step % m.cfg.logging.expert_stats_every == 0) m.log_expert_load();
    if (m.cfg.logging.expert_health_every > 0 && m.step % m.cfg.logging.expert_health_every == 0) m.log_expert_health();
    int64_t stop_flag = g_stop_requested.load() ? 1 : 0;  // every rank stops at the same step
    m.comm.all_reduce_max(std::span<int64_t>(&stop_flag, 1));
    const bool stop = stop_flag != 0;
    if (stop || m.step == m.cfg.train.steps || (periodic && m.step % m.cfg.checkpoint.every == 0))
      outcome.last_checkpoint = m.save_checkpoint();
    if (stop && m.step < m.cfg.train.steps) {
      m.say() << "stop requested: saved step " << m.step << ", exiting\n";
      outcome.stopped_by_signal = true;
      break;
    }
  }
  outcome.steps_done = m.step;
  m.beat("export");
  if (m.step == m.cfg.train.steps && !outcome.stopped_by_signal && m.cfg.export_.hf) {
    outcome.export_dir = (fs::path(m.cfg.output_dir) / "hf").string();
    m.export_model(outcome.export_dir);
  }
  m.watchdog.reset();
  return outcome;
}

}  // namespace q3vl::app
