// The trainer's output (trainer_impl.h): human progress lines of rank 0, each starting with the wall-clock time,
// and metrics.jsonl records, each with a "time" field (UTC, ISO 8601): the start, every step (with where its time
// went), memory, expert load and expert health.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <limits>
#include <sstream>

#include "app/save_progress.h"
#include "app/simd.h"
#include "app/trainer_impl.h"
#include "app/version.h"
#include "core/human_units.h"
#include "core/model/config.h"

namespace q3vl::app {

namespace {

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


// "2026-12-04 20:41:07" (local time) or, with utc, "2026-12-04T20:41:07.123Z".
std::string wall_clock(bool utc) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  std::tm parts{};
  char buf[40];
  if (utc) {
    gmtime_r(&t, &parts);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &parts);
    char full[48];
    std::snprintf(full, sizeof full, "%s.%03dZ", buf, static_cast<int>(ms));
    return full;
  }
  localtime_r(&t, &parts);
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &parts);
  return buf;
}

}  // namespace

io::WriteObserver Trainer::Impl::save_progress(const std::string& what) {
  constexpr double kEverySeconds = 5;
  auto meter = std::make_shared<SaveProgress>(what, kEverySeconds,
                                              [this](const std::string& line) { say() << line << "\n" << std::flush; });
  return [meter](uint64_t bytes) { (*meter)(bytes); };
}

std::ostream& Trainer::Impl::say() { return out << wall_clock(false) << " "; }

void Trainer::Impl::emit(json record) {
  if (!root) return;
  record["time"] = wall_clock(true);
  metrics << record.dump() << "\n" << std::flush;
}

void Trainer::Impl::log_start() {
  const ModelConfig& mc = model->config();
  const std::string& model_source = cfg.model.flavor ? *cfg.model.flavor : cfg.model.checkpoint ? *cfg.model.checkpoint
                                                                                                 : *cfg.model.config;
  say() << "q3vl " << q3vl_version() << " (git " << q3vl_git_commit() << ") training " << model_source << ": "
        << count_parameters(mc) << " parameters, " << loader->num_sequences() << " packed sequences ("
        << loader->batches_per_epoch() << " micro-batches per epoch), steps " << step << " -> " << cfg.train.steps
        << ", grad_accum " << cfg.train.grad_accum << "\n";
  char peak[64];
  std::snprintf(peak, sizeof peak, "%.1f", peak_gflops);
  say() << "MFU against a peak of " << peak << " GFLOP/s per rank (" << peak_source << ")\n";
  emit(json{{"event", "start"}, {"step", step}, {"steps", cfg.train.steps}, {"parameters", count_parameters(mc)},
            {"sequences", loader->num_sequences()}, {"peak_gflops", peak_gflops}, {"peak_source", peak_source},
            {"simd", simd_summary()}, {"q3vl_version", q3vl_version()}, {"git_commit", q3vl_git_commit()}});
}

void Trainer::Impl::log_memory() {
  // Bytes this rank's training state takes (the parallel plan of `q3vl plan` predicts the same items).
  json j{{"event", "memory"}, {"step", step}};
  const BatchShape& cap = workspace->capacity();
  j["batch_shape"] = {{"batch", cap.batch}, {"seq", cap.seq}, {"image_patches", cap.image_patches},
                      {"video_patches", cap.video_patches}, {"items", cap.items}, {"frames", cap.frames}};
  const parallel::ShardedParams::Memory m = sharded->memory();
  const int64_t weights = m.weight_shard, grads = m.grad_shard, gathered = m.gathered_peak, staging_bytes = m.staging;
  int64_t adam = 0;
  for (size_t i = 0; i < adamw->size(); ++i) adam += static_cast<int64_t>(AdamW::state_bytes(adamw->tensor(i).param.numel()));
  // The expert-rows arena is sized for the worst case; the rows the routing used are its high-water mark.
  const int64_t ep_buffers = static_cast<int64_t>(workspace->expert_rows().high_water());
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
         {"skipped", r.skipped}, {"tokens_seen", tokens_seen}, {"data_s", r.phases.data_s},
         {"forward_s", r.phases.forward_s}, {"backward_s", r.phases.backward_s}, {"comm_s", r.phases.comm_s},
         {"optimizer_s", r.phases.optimizer_s}};
  if (std::isfinite(r.router_margin)) j["router_margin"] = r.router_margin;
  emit(j);
  if (r.step % cfg.logging.every != 0 && r.step != cfg.train.steps) return;
  char line[512];
  std::snprintf(line, sizeof line,
                "step %lld/%lld | loss %.4f | aux %.4f | grad %.3f | lr %.3e | %.0f tok/s | %.2f GFLOP/s%s | %.3f s "
                "(data %.3f fwd %.3f bwd %.3f comm %.3f opt %.3f) | mem %.0f MiB | ETA %s%s\n",
                (long long)r.step, (long long)cfg.train.steps, r.loss, r.aux_loss, r.grad_norm, r.lr, tok_s, gflops,
                peak_gflops > 0 ? (" (MFU " + std::to_string(mfu * 100).substr(0, 4) + "%)").c_str() : "",
                r.seconds, r.phases.data_s, r.phases.forward_s, r.phases.backward_s, r.phases.comm_s,
                r.phases.optimizer_s, mem.rss / 1048576.0, human_duration(eta).c_str(), r.skipped ? " | SKIPPED" : "");
  say() << line << std::flush;
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
  say() << line;
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
  say() << line;
  for (auto& c : health_counts) std::fill(c.begin(), c.end(), 0);
  std::fill(health_entropy.begin(), health_entropy.end(), 0.0);
  std::fill(health_tokens.begin(), health_tokens.end(), 0);
  health_steps = 0;
}

}  // namespace q3vl::app
