// The training loop (trainer.h).
#include "app/trainer.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <ostream>
#include <sstream>

#include "app/hf_export.h"
#include "app/simd.h"
#include "app/train_batch.h"
#include "app/watchdog.h"
#include "core/check.h"
#include "core/cpu_peak.h"
#include "core/model/flops.h"
#include "core/optim/adamw.h"
#include "core/optim/lr_schedule.h"
#include "io/hf_config.h"
#include "io/loader.h"
#include "io/model_io.h"
#include "io/shard_format.h"
#include "io/sharded_checkpoint.h"
#include "io/train_checkpoint.h"
#include "parallel/comm.h"
#include "parallel/expert_exchange.h"
#include "parallel/process_grid.h"
#include "parallel/self_comm.h"
#include "parallel/sharded_params.h"
#include "parallel/tensor_parallel_comm.h"

namespace q3vl::app {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::atomic<bool> g_stop_requested{false};

constexpr int kStateFormat = 1;

struct ProcessMemory {
  int64_t rss = 0, peak = 0;  // bytes
};

// VmRSS / VmHWM of this process (Linux); zeros where /proc is unavailable.
ProcessMemory process_memory() {
  ProcessMemory m;
  std::ifstream in("/proc/self/status");
  std::string key;
  int64_t kib = 0;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    if (!(ls >> key >> kib)) continue;
    if (key == "VmRSS:") m.rss = kib * 1024;
    if (key == "VmHWM:") m.peak = kib * 1024;
  }
  return m;
}

std::string human_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(std::llround(std::max(0.0, seconds)));
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(s / 3600), (long long)(s / 60 % 60));
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
  else std::snprintf(buf, sizeof buf, "%llds", (long long)s);
  return buf;
}

DType export_dtype(const std::string& name) {
  if (name == "f32") return DType::f32;
  if (name == "bf16") return DType::bf16;
  if (name == "f16") return DType::f16;
  Q3VL_FAIL("export.dtype: expected f32, bf16 or f16, got '", name, "'");
}

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

struct ExpertLoad {
  int layer = 0;
  double min = 0, max = 0, mean = 0, std = 0;
};

}  // namespace

std::string param_module(const std::string& key) {
  if (key.rfind("model.visual.merger", 0) == 0 || key.rfind("model.visual.deepstack_merger_list", 0) == 0) return "mergers";
  if (key.rfind("model.visual.", 0) == 0) return "vision_tower";
  return "language_model";
}

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
  // FSDP / expert parallelism (parallel.fsdp x parallel.ep > 1): the model's parameters live sharded here and
  // AdamW steps this rank's pieces; otherwise every rank holds the whole model (ZeRO-1 below).
  std::unique_ptr<parallel::ShardedParams> sharded;
  std::unique_ptr<ExpertExchange> expert_exchange;
  std::unique_ptr<TensorParallel> tensor_parallel;
  // The pieces the gradient norm sums: tensors replicated over tp ranks count on tp rank 0 only.
  std::vector<OptimTensor> norm_tensors;
  // Pieces of replicated tensors whose gradients are partial sums over the tp ranks (tp_layout.h).
  std::vector<size_t> tp_partial_pieces;
  std::vector<float> tp_partial_buffer;
  std::unique_ptr<io::Loader> loader;
  std::vector<OptimTensor> optim_tensors;  // every parameter, whole
  // Optimizer sharding over the data-parallel ranks (ZeRO-1): each tensor of n elements is cut into `size`
  // chunks of ceil(n / size); this rank's AdamW holds moments for its chunks only, steps them, and the updated
  // chunks are all-gathered. One process: the chunk is the whole tensor.
  struct ShardRange {
    int64_t lo = 0, hi = 0, chunk = 0;  // this rank's elements [lo, hi) of a tensor, chunk = ceil(n / size)
    int optim_index = -1;               // its entry in adamw (-1: empty chunk)
  };
  std::vector<ShardRange> ranges;      // per entry of optim_tensors
  std::vector<OptimTensor> shard_tensors;  // this rank's chunks (what adamw steps and the norm sums)
  std::vector<float> staging;          // padded send/receive buffer of the collectives
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

  Impl(const TrainConfig& c, std::ostream& o, parallel::Comm* shared)
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

  void reduce_expert_stats(std::vector<MoeStats>& layers);
  // The AdamW moments as whole tensors shaped like their parameters, under the names a checkpoint stores them
  // ("<key>.exp_avg", "<key>.exp_avg_sq"), in `storage`, gathered from every rank's chunks.
  std::vector<io::NamedTensor> full_moments(std::vector<float>& storage);
  // All-gathers `data` [n] from the ranks' chunks (each rank's own chunk must be current in `data`).
  void gather_chunks(float* data, const ShardRange& r, int64_t n);
  // One metrics.jsonl record (rank 0).
  void emit(const json& record) {
    if (root) metrics << record.dump() << "\n" << std::flush;
  }
  void reduce_gradients();
  void build_model();
  void build_optimizer(const AdamWOptions& options);
  void load_checkpoint(const std::string& dir, std::string& trainer_state);
  std::string save_sharded_checkpoint();
  void log_memory();
  void export_sharded(const std::string& dir, HfExportOptions options);

  void build();
  void resume_if_asked();
  std::string trainer_state_json() const;
  void restore_router_bias(const json& state, const std::string& dir);
  std::string save_checkpoint();
  StepRecord train_step();
  void log_step(const StepRecord& r, int64_t micro_tokens_total);
  void log_expert_load();
  void log_expert_health();
  void update_router_bias();
};

void Trainer::Impl::build() {
  cfg.validate();
  const ParallelSection& par = cfg.parallel;
  grid = std::make_unique<parallel::ProcessGrid>(comm, parallel::GridShape{par.dp, par.fsdp, par.ep, par.tp});
  // Output folder first: nothing is computed for a run that cannot write its results.
  if (root) require_writable_dir(cfg.output_dir, "output_dir");
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
  if (root) {
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
  if (par.fsdp * par.ep * par.tp == 1) {
    std::unique_ptr<Model> loaded;  // an HF checkpoint, whole
    if (cfg.model.checkpoint) loaded = io::load_hf_model(*cfg.model.checkpoint);
    if (loaded && !cfg.model.router_aux_loss_coef) {
      model = std::move(loaded);
      return;
    }
    model = std::make_unique<Model>(mc);
    if (loaded) {
      for (size_t i = 0; i < model->weights().size(); ++i) copy(model->weights().tensor(i), loaded->weights().tensor(i));
    } else {
      model->init_weights(cfg.model.init_seed);
    }
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
  if (sharded) {
    // FSDP: AdamW steps exactly this rank's pieces of the shards.
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
    return;
  }
  // Whole model on every rank: one entry per parameter, in model_param_specs order.
  for (size_t i = 0; i < model->weights().size(); ++i)
    optim_tensors.push_back(entry(i, model->weights().tensor(i), model->grads().tensor(i)));
  const int64_t ranks = comm.size(), me = comm.rank();
  size_t staging_size = 0;
  for (const OptimTensor& t : optim_tensors) {
    const int64_t n = t.param.numel(), chunk = (n + ranks - 1) / ranks;
    ShardRange r;
    r.chunk = chunk;
    r.lo = std::min(n, me * chunk);
    r.hi = std::min(n, r.lo + chunk);
    if (r.hi > r.lo) {
      OptimTensor st = t;
      st.param = Tensor(t.param.data<float>() + r.lo, DType::f32, {r.hi - r.lo});
      st.grad = Tensor(t.grad.data<float>() + r.lo, DType::f32, {r.hi - r.lo});
      r.optim_index = static_cast<int>(shard_tensors.size());
      shard_tensors.push_back(st);
    }
    ranges.push_back(r);
    staging_size = std::max(staging_size, static_cast<size_t>(chunk * (ranks + 1)));
  }
  if (ranks > 1) staging.resize(staging_size);
  adamw = std::make_unique<AdamW>(shard_tensors, ao);
}

std::string Trainer::Impl::trainer_state_json() const {
  json j;
  j["format"] = kStateFormat;
  j["step"] = step;
  j["optimizer_steps"] = adamw->steps();
  j["tokens_seen"] = tokens_seen;
  j["skipped_steps"] = skipped_steps;
  j["seed"] = cfg.train.seed;
  j["loader"] = json::parse(loader->state().to_json());
  if (const Tensor& bias = model->router_bias(); bias.defined()) {
    // Every rank holds the same bias (same global loads, same updates). Floats widen to doubles exactly and
    // JSON writes doubles so that they read back to the same bits.
    json rows = json::array();
    for (int64_t l = 0; l < bias.size(0); ++l) {
      const float* row = bias.data<float>() + l * bias.size(1);
      rows.push_back(std::vector<double>(row, row + bias.size(1)));
    }
    j["router_bias"] = rows;
  }
  return j.dump(2);
}

std::vector<io::NamedTensor> Trainer::Impl::full_moments(std::vector<float>& storage) {
  int64_t total = 0;
  for (const OptimTensor& t : optim_tensors) total += 2 * t.param.numel();
  storage.assign(static_cast<size_t>(total), 0.0f);
  std::vector<io::NamedTensor> out;
  float* p = storage.data();
  for (size_t i = 0; i < optim_tensors.size(); ++i) {
    const OptimTensor& t = optim_tensors[i];
    const int64_t n = t.param.numel();
    const ShardRange& r = ranges[i];
    for (int which = 0; which < 2; ++which) {
      if (r.optim_index >= 0) {
        const Tensor& m = which == 0 ? adamw->exp_avg(r.optim_index) : adamw->exp_avg_sq(r.optim_index);
        std::copy_n(m.data<float>(), r.hi - r.lo, p + r.lo);
      }
      gather_chunks(p, r, n);
      out.push_back({t.name + (which == 0 ? ".exp_avg" : ".exp_avg_sq"), Tensor(p, DType::f32, t.param.shape())});
      p += n;
    }
  }
  return out;
}

void Trainer::Impl::gather_chunks(float* data, const ShardRange& r, int64_t n) {
  if (comm.size() == 1) return;
  const size_t chunk = static_cast<size_t>(r.chunk), ranks = static_cast<size_t>(comm.size());
  float* send = staging.data() + chunk * ranks;  // the last chunk of the staging buffer
  std::fill_n(send, chunk, 0.0f);
  std::copy_n(data + r.lo, r.hi - r.lo, send);
  comm.all_gather(std::span<const float>(send, chunk), std::span<float>(staging.data(), chunk * ranks));
  std::copy_n(staging.data(), n, data);
}

void Trainer::Impl::load_checkpoint(const std::string& dir, std::string& trainer_state) {
  // Any layout's checkpoint (whole tensors or per-rank shards) is read by element ranges into this layout.
  const io::CheckpointReader reader(dir, model->config());
  using Field = io::CheckpointReader::Field;
  const std::vector<ParamSpec>& specs = model->weights().specs();
  if (sharded) {
    const auto& pieces = sharded->pieces();
    for (size_t i = 0; i < pieces.size(); ++i) {
      const parallel::ShardedParams::Piece& p = pieces[i];
      const std::string& key = specs[p.spec].hf_key;
      for (const TpRun& r : tp_global_runs(specs[p.spec], model->tp_layout(), p.offset, p.numel)) {
        const int64_t at = r.local_offset - p.offset;
        reader.read(key, Field::param, r.global_offset, r.numel, p.param + at);
        reader.read(key, Field::exp_avg, r.global_offset, r.numel, adamw->exp_avg(i).data<float>() + at);
        reader.read(key, Field::exp_avg_sq, r.global_offset, r.numel, adamw->exp_avg_sq(i).data<float>() + at);
      }
    }
  } else {
    for (size_t i = 0; i < optim_tensors.size(); ++i) {
      const Tensor& w = model->weights().tensor(i);
      reader.read(specs[i].hf_key, Field::param, 0, w.numel(), w.data<float>());
      const ShardRange& r = ranges[i];
      if (r.optim_index < 0) continue;
      reader.read(specs[i].hf_key, Field::exp_avg, r.lo, r.hi - r.lo, adamw->exp_avg(r.optim_index).data<float>());
      reader.read(specs[i].hf_key, Field::exp_avg_sq, r.lo, r.hi - r.lo, adamw->exp_avg_sq(r.optim_index).data<float>());
    }
  }
  trainer_state = reader.trainer_state_json();
}

void Trainer::Impl::restore_router_bias(const json& state, const std::string& dir) {
  const Tensor& bias = model->router_bias();
  if (!state.contains("router_bias")) {
    if (bias.defined())
      out << "checkpoint '" << dir << "' has no router bias (saved with moe.balance: aux): it starts at zero\n";
    return;
  }
  if (!bias.defined()) {
    out << "checkpoint '" << dir << "' has a router bias, unused with moe.balance: aux (routing will change)\n";
    return;
  }
  const json& rows = state.at("router_bias");
  const int64_t layers = bias.size(0), experts = bias.size(1);
  Q3VL_CHECK(rows.is_array() && static_cast<int64_t>(rows.size()) == layers, "checkpoint '", dir,
             "': trainer_state.json router_bias has ", rows.size(), " rows, expected ", layers, " (MoE layers)");
  for (int64_t l = 0; l < layers; ++l) {
    const std::vector<double> row = rows[l].get<std::vector<double>>();
    Q3VL_CHECK(static_cast<int64_t>(row.size()) == experts, "checkpoint '", dir, "': trainer_state.json router_bias[",
               l, "] has ", row.size(), " values, expected ", experts, " (experts)");
    std::copy(row.begin(), row.end(), bias.data<float>() + l * experts);
  }
}

void Trainer::Impl::resume_if_asked() {
  const std::string& r = cfg.checkpoint.resume;
  std::string dir;
  if (r == "none") return;
  if (r == "auto") {
    const auto latest = io::latest_complete_checkpoint(checkpoint_root);
    if (!latest) return;
    dir = latest->path;
  } else {
    dir = r;
  }
  std::string state_text;
  load_checkpoint(dir, state_text);
  json s;
  try {
    s = json::parse(state_text);
  } catch (const json::exception& e) {
    Q3VL_FAIL("checkpoint '", dir, "': trainer_state.json is not valid JSON: ", e.what());
  }
  try {
    Q3VL_CHECK(s.at("format").get<int>() == kStateFormat, "checkpoint '", dir, "': trainer_state.json format ",
               s.at("format").dump(), " is not ", kStateFormat);
    step = s.at("step").get<int64_t>();
    adamw->set_steps(s.at("optimizer_steps").get<int64_t>());
    tokens_seen = s.at("tokens_seen").get<int64_t>();
    skipped_steps = s.at("skipped_steps").get<int64_t>();
    loader->restore(io::LoaderState::from_json(s.at("loader").dump()));
    restore_router_bias(s, dir);
  } catch (const json::exception& e) {
    Q3VL_FAIL("checkpoint '", dir, "': trainer_state.json: ", e.what());
  }
  resumed = true;
  out << "resumed from " << dir << " at step " << step << "\n";
}

std::string Trainer::Impl::save_checkpoint() {
  if (sharded) return save_sharded_checkpoint();
  // Every rank holds the same state: rank 0 writes, the others wait so nobody runs ahead of a failed save.
  std::string dir;
  beat("checkpoint of step " + std::to_string(step));
  std::vector<float> moment_storage;
  const std::vector<io::NamedTensor> moments = full_moments(moment_storage);
  if (root) {
    io::TrainCheckpointWrite w;
    w.step = step;
    w.model_config = &model->config();
    Model& m = *model;
    w.weights = [&](const std::string& key) { return m.weights().at(key); };
    w.optimizer = moments;
    w.trainer_state_json = trainer_state_json();
    w.config_yaml = config_yaml;
    const auto t0 = std::chrono::steady_clock::now();
    dir = io::save_train_checkpoint(checkpoint_root, w, cfg.checkpoint.keep);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char line[64];
    std::snprintf(line, sizeof line, " (%.2f s)", secs);
    out << "checkpoint step " << step << " -> " << dir << line << "\n";
    emit(json{{"event", "checkpoint"}, {"step", step}, {"path", dir}, {"seconds", secs}});
  }
  comm.barrier();
  return dir;
}

std::string Trainer::Impl::save_sharded_checkpoint() {
  // The ranks of replica 0 write their pieces (the other replicas hold the same ones), rank 0 the manifest.
  beat("checkpoint of step " + std::to_string(step));
  const auto t0 = std::chrono::steady_clock::now();
  int64_t tag = root ? static_cast<int64_t>(::getpid()) : 0;
  comm.broadcast(&tag, sizeof tag, 0);
  std::string tmp;
  if (root) tmp = io::begin_sharded_checkpoint(checkpoint_root, step, std::to_string(tag));
  int64_t length = static_cast<int64_t>(tmp.size());
  comm.broadcast(&length, sizeof length, 0);
  tmp.resize(static_cast<size_t>(length));
  comm.broadcast(tmp.data(), tmp.size(), 0);
  std::string entry;
  if (grid->dp_index() == 0) {
    // Pieces in global coordinates: a tensor-parallel slice is several runs of the global tensor; tensors
    // replicated over tp are written by tp rank 0 only.
    const std::vector<ParamSpec>& specs = model->weights().specs();
    const TpLayout& tp = model->tp_layout();
    std::vector<io::ShardPiece> pieces;
    const auto& mine = sharded->pieces();
    for (size_t i = 0; i < mine.size(); ++i) {
      const ParamSpec& spec = specs[mine[i].spec];
      if (tp_split_dim(spec, tp) < 0 && tp.rank != 0) continue;
      for (const TpRun& r : tp_global_runs(spec, tp, mine[i].offset, mine[i].numel)) {
        const int64_t at = r.local_offset - mine[i].offset;
        pieces.push_back({spec.hf_key, r.global_offset, r.numel, mine[i].param + at, adamw->exp_avg(i).data<float>() + at,
                          adamw->exp_avg_sq(i).data<float>() + at});
      }
    }
    entry = io::write_checkpoint_shard(tmp, grid->replica().rank(), pieces);
  }
  std::vector<std::string> entries = comm.gather_strings(entry, 0);
  std::string dir;
  if (root) {
    entries.erase(std::remove(entries.begin(), entries.end(), std::string()), entries.end());
    const parallel::GridShape& g = grid->shape();
    const json layout{{"dp", g.dp}, {"fsdp", g.fsdp}, {"ep", g.ep}, {"tp", g.tp}, {"world", g.world()}};
    dir = io::finish_sharded_checkpoint(checkpoint_root, tmp, step, model->config(), layout.dump(), entries,
                                        trainer_state_json(), config_yaml, cfg.checkpoint.keep);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char line[64];
    std::snprintf(line, sizeof line, " (%.2f s, %zu shard files)", secs, entries.size());
    out << "checkpoint step " << step << " -> " << dir << line << "\n";
    emit(json{{"event", "checkpoint"}, {"step", step}, {"path", dir}, {"seconds", secs}, {"shards", entries.size()}});
  }
  comm.barrier();
  return dir;
}

void Trainer::Impl::export_sharded(const std::string& dir, HfExportOptions options) {
  // Rank 0 writes tensor by tensor. Before each tensor it broadcasts the tensor's index; every rank then gathers
  // that tensor's unit if it is not the one held (FSDP, the same order everywhere, so no rank holds more than
  // one unit) and the tensor-parallel ranks all-gather their slices, which rank 0 assembles into one staging
  // tensor that the writer reads. -1 ends.
  const std::vector<ParamSpec>& specs = model->weights().specs();
  const std::vector<ParamUnit>& units = model->units();
  const TpLayout& tp = model->tp_layout();
  int64_t largest = 0;
  for (const ParamSpec& s : specs) largest = std::max(largest, s.numel());
  std::vector<float> staging(root ? static_cast<size_t>(largest) : 0), slices;
  int held = -1;
  const auto serve = [&](int64_t spec_index) {
    int unit = -1;
    for (size_t u = 0; u < units.size() && spec_index >= 0; ++u)
      if (static_cast<size_t>(spec_index) < units[u].end_spec && unit < 0) unit = static_cast<int>(u);
    if (unit != held) {
      if (held >= 0) sharded->release(held);
      held = unit;
      if (unit >= 0) sharded->acquire(unit);
    }
    if (spec_index < 0) return;
    const ParamSpec& spec = specs[static_cast<size_t>(spec_index)];
    const Tensor& local = model->weights().tensor(static_cast<size_t>(spec_index));
    const int64_t n = local.numel();
    if (tp_split_dim(spec, tp) < 0) {
      if (root) std::copy_n(local.data<float>(), n, staging.data());
      return;
    }
    slices.resize(static_cast<size_t>(n * tp.size));
    grid->tp().all_gather(std::span<const float>(local.data<float>(), static_cast<size_t>(n)), std::span<float>(slices));
    if (!root) return;
    for (int r = 0; r < tp.size; ++r) {
      const TpLayout other{tp.size, r, tp.experts_split};
      for (const TpRun& run : tp_global_runs(spec, other, 0, n))
        std::copy_n(slices.data() + r * n + run.local_offset, run.numel, staging.data() + run.global_offset);
    }
  };
  if (root) {
    std::map<std::string, int64_t> index;
    for (size_t i = 0; i < specs.size(); ++i) index[specs[i].hf_key] = static_cast<int64_t>(i);
    const auto spec_of = [&](const std::string& key) {
      const auto it = index.find(key);
      Q3VL_CHECK(it != index.end(), "export: no parameter '", key, "'");
      return it->second;
    };
    options.lookup = [&](const std::string& key) {
      return Tensor(staging.data(), DType::f32, specs[static_cast<size_t>(spec_of(key))].shape);
    };
    options.before_write = [&](const std::string& key) {
      int64_t message = spec_of(key);
      comm.broadcast(&message, sizeof message, 0);
      serve(message);
    };
    // A failed export throws while the other ranks wait for an index: train_cmd then aborts every rank.
    export_hf(dir, *model, options);
    int64_t end = -1;
    comm.broadcast(&end, sizeof end, 0);
    serve(-1);
    return;
  }
  for (;;) {
    int64_t message = 0;
    comm.broadcast(&message, sizeof message, 0);
    serve(message);
    if (message < 0) break;
  }
}

void Trainer::Impl::log_memory() {
  // Bytes this rank's training state takes (the parallel plan of `q3vl plan` predicts the same items).
  json j{{"event", "memory"}, {"step", step}};
  const BatchShape& cap = workspace->capacity();
  j["batch_shape"] = {{"batch", cap.batch}, {"seq", cap.seq}, {"image_patches", cap.image_patches},
                      {"video_patches", cap.video_patches}, {"items", cap.items}, {"frames", cap.frames}};
  int64_t weights = 0, grads = 0, gathered = 0, staging_bytes = 0;
  if (sharded) {
    const parallel::ShardedParams::Memory m = sharded->memory();
    weights = m.weight_shard;
    grads = m.grad_shard;
    gathered = m.gathered_peak;
    staging_bytes = m.staging;
  } else {
    weights = static_cast<int64_t>(ParamStore::bytes(model->config(), DType::f32));
    grads = weights;
    staging_bytes = static_cast<int64_t>(staging.size() * sizeof(float));
  }
  int64_t adam = 0;
  for (size_t i = 0; i < adamw->size(); ++i) adam += static_cast<int64_t>(AdamW::state_bytes(adamw->tensor(i).param.numel()));
  int64_t ep_buffers = 0;
  for (const size_t b : workspace->expert_parallel_bytes()) ep_buffers += static_cast<int64_t>(b);
  if (expert_exchange) ep_buffers += static_cast<int64_t>(expert_exchange_scratch_bytes(*expert_exchange));
  const int64_t acts = static_cast<int64_t>(workspace->activations().capacity());
  const int64_t scratch = static_cast<int64_t>(workspace->scratch().capacity());
  j["weight_shard_bytes"] = weights;
  j["grad_shard_bytes"] = grads;
  j["adamw_bytes"] = adam;
  j["gathered_peak_bytes"] = gathered;
  j["staging_bytes"] = staging_bytes;
  j["activation_bytes"] = acts;
  j["scratch_bytes"] = scratch;
  j["ep_buffer_bytes"] = ep_buffers;
  j["total_bytes"] = weights + grads + adam + gathered + staging_bytes + acts + scratch + ep_buffers;
  j["rank"] = comm.rank();
  // Every rank's numbers reach rank 0's metrics.
  const std::vector<std::string> all = comm.gather_strings(j.dump(), 0);
  for (const std::string& line : all) emit(json::parse(line));
}

StepRecord Trainer::Impl::train_step() {
  const auto t0 = std::chrono::steady_clock::now();
  StepRecord rec;
  rec.lr = schedule.at(step);
  // All micro-batches of the step first: the CE mean is over all their targets.
  std::vector<std::unique_ptr<TrainBatch>> micro;
  if (comm.rank() == hang_rank && step + 1 == hang_step) {
    std::fprintf(stderr, "rank %d: Q3VL_FAULT_HANG: not making progress in step %lld\n", hang_rank, (long long)hang_step);
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  beat("step " + std::to_string(step + 1) + ": loading micro-batches");
  for (int k = 0; k < cfg.train.grad_accum; ++k)
    micro.push_back(std::make_unique<TrainBatch>(loader->next(), model->config(), model->dtype()));
  BatchShape need = micro[0]->shape();
  for (const auto& b : micro) {
    need = batch_shape_max(need, b->shape());
    rec.tokens += b->tokens();
    rec.target_tokens += b->target_tokens();
  }
  {
    int64_t counts[2] = {rec.tokens, rec.target_tokens};
    grid->data().all_reduce_sum(std::span<int64_t>(counts, 2));
    rec.tokens = counts[0];
    rec.target_tokens = counts[1];
  }
  if (cfg.train.max_tokens > 0)
    Q3VL_CHECK(need.tokens() <= cfg.train.max_tokens, "train.max_tokens: a micro-batch of ", need.tokens(),
               " tokens exceeds the configured capacity ", cfg.train.max_tokens);
  if (!workspace || !batch_fits(need, workspace->capacity())) {
    const BatchShape cap = workspace ? batch_shape_max(need, workspace->capacity()) : need;
    workspace.reset();
    workspace = std::make_unique<Workspace>(*model, cap);
  }

  if (sharded) sharded->zero_grads();
  else model->zero_grads();
  for (auto& c : expert_counts) std::fill(c.begin(), c.end(), 0);
  ++health_steps;
  const int64_t normalizer = std::max<int64_t>(rec.target_tokens, 1);
  bool finite = true;
  ForwardOptions fo;
  fo.aux_loss = cfg.moe.uses_aux();
  fo.aux_per_layer = cfg.moe.aux_loss == "per_layer";
  if (grid->data().size() > 1) fo.expert_stats_reducer = [this](std::vector<MoeStats>& layers) { reduce_expert_stats(layers); };
  for (const auto& b : micro) {
    beat("step " + std::to_string(step + 1) + ": forward and backward");
    const ForwardResult r = model->forward(b->plan(), b->batch(), *workspace, fo);
    rec.ce_loss += r.ce_loss * static_cast<double>(r.ce_tokens) / static_cast<double>(normalizer);
    rec.aux_loss += r.aux_loss / cfg.train.grad_accum;
    finite = finite && std::isfinite(r.loss);
    const auto& load = workspace->expert_load();
    for (size_t l = 0; l < load.size(); ++l) {
      const int64_t* c = load[l].counts.data<int64_t>();
      for (size_t e = 0; e < expert_counts[l].size(); ++e) {
        expert_counts[l][e] += c[e];
        health_counts[l][e] += c[e];
      }
      health_entropy[l] += load[l].entropy_sum;
      health_tokens[l] += load[l].valid_tokens;
      rec.router_margin = std::min(rec.router_margin, load[l].min_margin);
    }
    BackwardOptions bo;
    bo.ce_normalizer = normalizer;
    bo.aux_scale = 1.0 / cfg.train.grad_accum;
    model->backward(b->plan(), *workspace, bo);
  }
  {
    double sums[2] = {rec.ce_loss, finite ? 0.0 : 1.0};
    grid->data().all_reduce_sum(std::span<double>(sums, 2));
    rec.ce_loss = sums[0];
    finite = sums[1] == 0.0;
    double negated_margin = -rec.router_margin;  // the minimum over ranks as a maximum
    grid->data().all_reduce_max(std::span<double>(&negated_margin, 1));
    rec.router_margin = -negated_margin;
  }
  beat("step " + std::to_string(step + 1) + ": gradient all-reduce");
  reduce_gradients();
  beat("step " + std::to_string(step + 1) + ": optimizer");
  const double coef = model->config().num_moe_layers() > 0 && cfg.moe.uses_aux()
                          ? model->config().text.router_aux_loss_coef
                          : 0.0;
  rec.loss = rec.ce_loss + coef * rec.aux_loss;
  {
    // Each element is owned by one rank of a replica (ZeRO-1 chunks: one rank of the world).
    double sum_sq = gradient_sum_of_squares(sharded ? norm_tensors : shard_tensors);
    (sharded ? grid->replica() : comm).all_reduce_sum(std::span<double>(&sum_sq, 1));
    rec.grad_norm = std::sqrt(sum_sq);
  }
  ++step;
  rec.step = step;
  if (!finite || !std::isfinite(rec.grad_norm)) {
    std::ostringstream why;
    why << "step " << step << ": " << (!finite ? "loss" : "gradient norm") << " is not finite (loss " << rec.loss
        << ", gradient norm " << rec.grad_norm << "; its micro-batches end at loader epoch " << loader->state().epoch
        << " position " << loader->state().position << ")";
    Q3VL_CHECK(cfg.train.skip_nonfinite, why.str(), "; set train.on_nonfinite: skip to skip such steps");
    out << why.str() << ": update skipped\n";
    rec.skipped = true;
    ++skipped_steps;
  } else {
    adamw->step(rec.lr, clip_coefficient(rec.grad_norm, cfg.optimizer.grad_clip));
    update_router_bias();
    beat("step " + std::to_string(step) + ": parameter all-gather");
    // Sharded parameters are gathered by the next forward; ZeRO-1 chunks are gathered now.
    for (size_t i = 0; i < optim_tensors.size(); ++i) {
      if (!optim_tensors[i].frozen) gather_chunks(optim_tensors[i].param.data<float>(), ranges[i], optim_tensors[i].param.numel());
    }
  }
  tokens_seen += rec.tokens;
  rec.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double step_flops = 0;
  for (const auto& b : micro) step_flops += train_flops(flops, b->document_tokens(), b->item_patches());
  log_step(rec, static_cast<int64_t>(step_flops));
  return rec;
}

void Trainer::Impl::log_step(const StepRecord& r, int64_t step_flops) {
  ema_step_seconds = ema_step_seconds == 0 ? r.seconds : 0.9 * ema_step_seconds + 0.1 * r.seconds;
  const double tok_s = r.tokens / std::max(r.seconds, 1e-9);
  const double gflops = static_cast<double>(step_flops) / std::max(r.seconds, 1e-9) / 1e9;
  const double mfu = peak_gflops > 0 ? gflops / peak_gflops : 0.0;
  const ProcessMemory mem = process_memory();
  const double eta = ema_step_seconds * static_cast<double>(cfg.train.steps - step);
  json j{{"event", "step"},  {"step", r.step},       {"steps", cfg.train.steps}, {"loss", r.loss},
         {"ce_loss", r.ce_loss}, {"aux_loss", r.aux_loss}, {"grad_norm", r.grad_norm}, {"lr", r.lr},
         {"tokens", r.tokens}, {"target_tokens", r.target_tokens}, {"tokens_per_s", tok_s}, {"gflops", gflops},
         {"mfu", mfu},         {"step_s", r.seconds},  {"rss_bytes", mem.rss}, {"peak_rss_bytes", mem.peak},
         {"skipped", r.skipped}, {"tokens_seen", tokens_seen}};
  if (std::isfinite(r.router_margin)) j["router_margin"] = r.router_margin;
  emit(j);
  if (r.step % cfg.logging.every != 0 && r.step != cfg.train.steps) return;
  char line[512];
  std::snprintf(line, sizeof line,
                "step %lld/%lld | loss %.4f | aux %.4f | grad %.3f | lr %.3e | %.0f tok/s | %.2f GFLOP/s%s | %.3f s | "
                "mem %.0f MiB | ETA %s%s\n",
                (long long)r.step, (long long)cfg.train.steps, r.loss, r.aux_loss, r.grad_norm, r.lr, tok_s, gflops,
                peak_gflops > 0 ? (" (MFU " + std::to_string(mfu * 100).substr(0, 4) + "%)").c_str() : "",
                r.seconds, mem.rss / 1048576.0, human_duration(eta).c_str(), r.skipped ? " | SKIPPED" : "");
  out << line << std::flush;
}

void Trainer::Impl::log_expert_load() {
  if (expert_counts.empty()) return;
  json layers = json::array();
  double worst_max_over_mean = 0;
  int worst_layer = 0;
  for (size_t l = 0; l < expert_counts.size(); ++l) {
    const auto& c = expert_counts[l];
    const double n = static_cast<double>(c.size());
    double sum = 0, sq = 0, mn = 1e300, mx = 0;
    for (const int64_t v : c) {
      sum += v;
      sq += static_cast<double>(v) * v;
      mn = std::min(mn, static_cast<double>(v));
      mx = std::max(mx, static_cast<double>(v));
    }
    const double mean = sum / n, sd = std::sqrt(std::max(0.0, sq / n - mean * mean));
    layers.push_back({{"moe_layer", l}, {"min", mn}, {"max", mx}, {"mean", mean}, {"std", sd}});
    if (mean > 0 && mx / mean > worst_max_over_mean) {
      worst_max_over_mean = mx / mean;
      worst_layer = static_cast<int>(l);
    }
  }
  emit(json{{"event", "expert_load"}, {"step", step}, {"layers", layers}});
  char line[256];
  const auto& w = layers[worst_layer];
  std::snprintf(line, sizeof line,
                "expert load step %lld: %zu MoE layers, most unbalanced layer %d: tokens per expert min %.0f max %.0f "
                "mean %.1f std %.1f\n",
                (long long)step, expert_counts.size(), worst_layer, w["min"].get<double>(), w["max"].get<double>(),
                w["mean"].get<double>(), w["std"].get<double>());
  out << line;
}

void Trainer::Impl::log_expert_health() {
  if (health_counts.empty()) return;
  const Tensor& bias = model->router_bias();
  json layers = json::array();
  double worst = 0, worst_cv = 0, min_entropy = std::numeric_limits<double>::infinity();
  int worst_layer = 0;
  int64_t dead_total = 0;
  for (size_t l = 0; l < health_counts.size(); ++l) {
    const auto& c = health_counts[l];
    const double n = static_cast<double>(c.size());
    double sum = 0, sq = 0, mx = 0;
    int64_t dead = 0;
    for (const int64_t v : c) {
      sum += v;
      sq += static_cast<double>(v) * v;
      mx = std::max(mx, static_cast<double>(v));
      dead += v == 0;
    }
    const double mean = sum / n, sd = std::sqrt(std::max(0.0, sq / n - mean * mean));
    const double cv = mean > 0 ? sd / mean : 0.0, max_over_mean = mean > 0 ? mx / mean : 0.0;
    const double entropy = health_tokens[l] > 0 ? health_entropy[l] / static_cast<double>(health_tokens[l]) : 0.0;
    json layer{{"moe_layer", l},  {"cv", cv},           {"max_over_mean", max_over_mean},
               {"dead_experts", dead}, {"router_entropy", entropy}, {"tokens", health_tokens[l]}};
    if (bias.defined()) {
      const float* b = bias.data<float>() + static_cast<int64_t>(l) * bias.size(1);
      layer["bias_min"] = *std::min_element(b, b + bias.size(1));
      layer["bias_max"] = *std::max_element(b, b + bias.size(1));
    }
    layers.push_back(layer);
    if (max_over_mean > worst) {
      worst = max_over_mean;
      worst_layer = static_cast<int>(l);
    }
    worst_cv = std::max(worst_cv, cv);
    dead_total += dead;
    min_entropy = std::min(min_entropy, entropy);  // NaN (not computed) is never the minimum
  }
  emit(json{{"event", "expert_health"}, {"step", step}, {"window_steps", health_steps}, {"layers", layers}});
  char line[320];
  std::snprintf(line, sizeof line,
                "expert health step %lld (last %lld steps, %zu MoE layers): worst max/mean %.2f (layer %d), worst CV "
                "%.3f, dead experts %lld, lowest router entropy %.3f (uniform %.3f)\n",
                (long long)step, (long long)health_steps, health_counts.size(), worst, worst_layer, worst_cv,
                (long long)dead_total, min_entropy, std::log(static_cast<double>(health_counts[0].size())));
  out << line;
  for (auto& c : health_counts) std::fill(c.begin(), c.end(), 0);
  std::fill(health_entropy.begin(), health_entropy.end(), 0.0);
  std::fill(health_tokens.begin(), health_tokens.end(), 0);
  health_steps = 0;
}

void Trainer::Impl::update_router_bias() {
  const Tensor& bias = model->router_bias();
  if (!bias.defined()) return;
  const int64_t experts = bias.size(1);
  const double rate = cfg.moe.bias_update_rate;
  std::vector<double> delta(static_cast<size_t>(experts));
  for (size_t l = 0; l < expert_counts.size(); ++l) {
    const std::vector<int64_t>& load = expert_counts[l];
    double mean = 0;
    for (const int64_t v : load) mean += static_cast<double>(v);
    mean /= static_cast<double>(experts);
    double centre = 0;
    for (int64_t e = 0; e < experts; ++e) {
      const double gap = mean - static_cast<double>(load[e]);
      delta[e] = rate * static_cast<double>((gap > 0) - (gap < 0));
      centre += delta[e];
    }
    centre = cfg.moe.bias_centered ? centre / static_cast<double>(experts) : 0.0;
    float* b = bias.data<float>() + static_cast<int64_t>(l) * experts;
    for (int64_t e = 0; e < experts; ++e) b[e] = static_cast<float>(b[e] + (delta[e] - centre));
  }
}

void Trainer::Impl::reduce_expert_stats(std::vector<MoeStats>& layers) {
  const size_t e = layers.empty() ? 0 : static_cast<size_t>(layers[0].counts.numel());
  std::vector<int64_t> ints(layers.size() * (e + 1));
  // prob_sum rows, then each layer's entropy sum.
  std::vector<double> doubles(layers.size() * (e + 1));
  for (size_t l = 0; l < layers.size(); ++l) {
    std::copy_n(layers[l].counts.data<int64_t>(), e, ints.begin() + l * e);
    std::copy_n(layers[l].prob_sum.data<double>(), e, doubles.begin() + l * e);
    ints[layers.size() * e + l] = layers[l].valid_tokens;
    doubles[layers.size() * e + l] = layers[l].entropy_sum;
  }
  grid->data().all_reduce_sum(std::span<int64_t>(ints));
  grid->data().all_reduce_sum(std::span<double>(doubles));
  for (size_t l = 0; l < layers.size(); ++l) {
    std::copy_n(ints.begin() + l * e, e, layers[l].counts.data<int64_t>());
    std::copy_n(doubles.begin() + l * e, e, layers[l].prob_sum.data<double>());
    layers[l].valid_tokens = ints[layers.size() * e + l];
    layers[l].entropy_sum = doubles[layers.size() * e + l];
  }
}

void Trainer::Impl::reduce_gradients() {
  if (sharded) {
    // The model's backward already reduce-scattered every unit inside the replica.
    sharded->all_reduce_grads(grid->replicate());
    if (!tp_partial_pieces.empty()) {
      // q/k norms (and the router of split experts) saw only this rank's heads (expert columns).
      const auto& pieces = sharded->pieces();
      float* at = tp_partial_buffer.data();
      for (const size_t i : tp_partial_pieces) at = std::copy_n(pieces[i].grad, pieces[i].numel, at);
      grid->tp().all_reduce_sum(std::span<float>(tp_partial_buffer));
      at = tp_partial_buffer.data();
      for (const size_t i : tp_partial_pieces) {
        std::copy_n(at, pieces[i].numel, pieces[i].grad);
        at += pieces[i].numel;
      }
    }
    return;
  }
  if (comm.size() == 1) return;
  const size_t ranks = static_cast<size_t>(comm.size());
  for (size_t i = 0; i < optim_tensors.size(); ++i) {
    const OptimTensor& t = optim_tensors[i];
    if (t.frozen) continue;
    const ShardRange& r = ranges[i];
    const size_t chunk = static_cast<size_t>(r.chunk), n = static_cast<size_t>(t.grad.numel());
    // Padded to ranks x chunk; rank q receives the sum of chunk q, which is all its optimizer reads.
    float* send = staging.data();
    std::copy_n(t.grad.data<float>(), n, send);
    std::fill(send + n, send + chunk * ranks, 0.0f);
    float* recv = staging.data() + chunk * ranks;
    comm.reduce_scatter_sum(std::span<const float>(send, chunk * ranks), std::span<float>(recv, chunk));
    std::copy_n(recv, r.hi - r.lo, t.grad.data<float>() + r.lo);
  }
}

Trainer::Trainer(const TrainConfig& config, std::ostream& out, parallel::Comm* comm)
    : impl_(std::make_unique<Impl>(config, out, comm)) {
  impl_->build();
  impl_->resume_if_asked();
  if (impl_->root) {
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
  const ModelConfig& mc = m.model->config();
  m.out << "training " << (m.cfg.model.flavor ? *m.cfg.model.flavor : m.cfg.model.checkpoint ? *m.cfg.model.checkpoint : *m.cfg.model.config)
        << ": " << count_parameters(mc) << " parameters, " << m.loader->num_sequences() << " packed sequences ("
        << m.loader->batches_per_epoch() << " micro-batches per epoch), steps " << m.step << " -> " << m.cfg.train.steps
        << ", grad_accum " << m.cfg.train.grad_accum << "\n";
  char peak[64];
  std::snprintf(peak, sizeof peak, "%.1f", m.peak_gflops);
  m.out << "MFU against a peak of " << peak << " GFLOP/s per rank (" << m.peak_source << ")\n";
  json start{{"event", "start"}, {"step", m.step}, {"steps", m.cfg.train.steps}, {"parameters", count_parameters(mc)},
             {"sequences", m.loader->num_sequences()}, {"peak_gflops", m.peak_gflops}, {"peak_source", m.peak_source},
             {"simd", simd_summary()}};
  m.emit(start);

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
      m.out << "stop requested: saved step " << m.step << ", exiting\n";
      outcome.stopped_by_signal = true;
      break;
    }
  }
  outcome.steps_done = m.step;
  m.beat("export");
  if (m.step == m.cfg.train.steps && !outcome.stopped_by_signal && m.cfg.export_.hf) {
    outcome.export_dir = (fs::path(m.cfg.output_dir) / "hf").string();
    HfExportOptions eo;
    eo.dtype = export_dtype(m.cfg.export_.dtype);
    eo.max_shard_bytes = static_cast<uint64_t>(m.cfg.export_.shard_mb) << 20;
    if (m.cfg.export_.tokenizer) eo.tokenizer_dir = *m.cfg.export_.tokenizer;
    eo.router_bias = m.model->router_bias();
    if (m.sharded) {
      m.export_sharded(outcome.export_dir, eo);
    } else if (m.root) {
      export_hf(outcome.export_dir, *m.model, eo);
    }
    m.out << "exported HF model -> " << outcome.export_dir << "\n";
    if (eo.router_bias.defined()) m.out << router_bias_warning(outcome.export_dir) << "\n";
    m.comm.barrier();
  }
  m.watchdog.reset();
  return outcome;
}

}  // namespace q3vl::app
