// The trainer's checkpoints (trainer_impl.h): saving whole-tensor checkpoints (resident sharding, every rank holds
// the whole model: rank 0 writes, the AdamW moments gathered from the ranks' pieces) and sharded ones (each rank
// of replica 0 writes its pieces), and resuming from either format in any layout, with the trainer state (step,
// loader position, counters, router bias) in trainer_state.json.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <unistd.h>

#include "app/trainer_impl.h"
#include "app/version.h"
#include "core/check.h"
#include "io/sharded_checkpoint.h"
#include "io/train_checkpoint.h"

namespace q3vl::app {

namespace {

constexpr int kStateFormat = 1;

}  // namespace

std::string Trainer::Impl::trainer_state_json() const {
  json j;
  j["format"] = kStateFormat;
  j["q3vl_version"] = q3vl_version();
  j["git_commit"] = q3vl_git_commit();
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
  const ParamStore& w = model->weights();
  storage.assign(static_cast<size_t>(2 * w.numel()), 0.0f);
  std::vector<float*> at(2 * w.size());  // per spec: exp_avg, exp_avg_sq
  std::vector<io::NamedTensor> out;
  float* p = storage.data();
  for (size_t i = 0; i < w.size(); ++i) {
    for (int which = 0; which < 2; ++which) {
      at[2 * i + which] = p;
      out.push_back({w.specs()[i].hf_key + (which == 0 ? ".exp_avg" : ".exp_avg_sq"),
                     Tensor(p, DType::f32, w.tensor(i).shape())});
      p += w.tensor(i).numel();
    }
  }
  std::vector<const float*> values(adamw->size());
  for (int which = 0; which < 2; ++which) {
    for (size_t k = 0; k < values.size(); ++k)
      values[k] = (which == 0 ? adamw->exp_avg(k) : adamw->exp_avg_sq(k)).data<float>();
    sharded->gather_whole(values, [&](size_t spec) { return at[2 * spec + which]; });
  }
  return out;
}

void Trainer::Impl::load_checkpoint(const std::string& dir, std::string& trainer_state) {
  // Any layout's checkpoint (whole tensors or per-rank shards) is read by element ranges into this rank's pieces;
  // resident parameters are then all-gathered into the whole weights.
  const io::CheckpointReader reader(dir, model->config());
  using Field = io::CheckpointReader::Field;
  const std::vector<ParamSpec>& specs = model->weights().specs();
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
  sharded->parameters_updated();
  trainer_state = reader.trainer_state_json();
}

void Trainer::Impl::restore_router_bias(const json& state, const std::string& dir) {
  const Tensor& bias = model->router_bias();
  if (!state.contains("router_bias")) {
    if (bias.defined())
      say() << "checkpoint '" << dir << "' has no router bias (saved with moe.balance: aux): it starts at zero\n";
    return;
  }
  if (!bias.defined()) {
    say() << "checkpoint '" << dir << "' has a router bias, unused with moe.balance: aux (routing will change)\n";
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
  say() << "resumed from " << dir << " at step " << step << "\n";
}

std::string Trainer::Impl::save_checkpoint() {
  if (!sharded->resident()) return save_sharded_checkpoint();
  // Every rank holds the same weights: rank 0 writes them with the moments gathered from the ranks' pieces; the
  // others wait so nobody runs ahead of a failed save.
  std::string dir;
  beat("checkpoint of step " + std::to_string(step));
  std::vector<float> moment_storage;
  const std::vector<io::NamedTensor> moments = full_moments(moment_storage);
  if (root) {
    const io::WriteObserverScope progress(save_progress("checkpoint step " + std::to_string(step)));
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
    say() << "checkpoint step " << step << " -> " << dir << line << "\n";
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
    const io::WriteObserverScope progress(save_progress("checkpoint step " + std::to_string(step) + " (rank 0's shard)"));
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
    say() << "checkpoint step " << step << " -> " << dir << line << "\n";
    emit(json{{"event", "checkpoint"}, {"step", step}, {"path", dir}, {"seconds", secs}, {"shards", entries.size()}});
  }
  comm.barrier();
  return dir;
}

}  // namespace q3vl::app
