// q3vl_check_memory RUN --tolerance X: a `q3vl train` run's measured per-rank memory (the "memory" records of
// RUN/metrics.jsonl: shard, AdamW, peak gathered-unit, staging, workspace and expert-buffer bytes the trainer
// holds after its first step) against `q3vl plan`'s model (app/plan_memory.h) for the run's model, layout
// (RUN/config.yaml) and each rank's micro-batch shape. Every rank's total must be within X relative of the plan;
// prints both, item by item. Exit 1 when a rank differs by more.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "app/plan_memory.h"
#include "app/train_config.h"
#include "core/check.h"
#include "io/hf_config.h"

int main(int argc, char** argv) {
  try {
    Q3VL_CHECK(argc == 4 && std::string(argv[2]) == "--tolerance", "usage: q3vl_check_memory RUN --tolerance X");
    const std::string run = argv[1];
    const double tolerance = std::stod(argv[3]);
    const q3vl::app::TrainConfig cfg = q3vl::app::TrainConfig::load(run + "/config.yaml");
    Q3VL_CHECK(cfg.model.flavor || cfg.model.config, "check_memory: ", run, " trains a checkpoint; name a flavor/config");
    q3vl::ModelConfig model = q3vl::io::load_model_config(cfg.model.flavor ? *cfg.model.flavor : *cfg.model.config);
    q3vl::app::PlanLayoutArgs layout;
    layout.dp = cfg.parallel.dp;
    layout.fsdp = cfg.parallel.fsdp;
    layout.ep = cfg.parallel.ep;
    layout.tp = cfg.parallel.tp;

    std::ifstream in(run + "/metrics.jsonl");
    Q3VL_CHECK(in.good(), "check_memory: cannot read ", run, "/metrics.jsonl");
    std::string line;
    int ranks = 0;
    bool ok = true;
    while (std::getline(in, line)) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j.at("event") != "memory") continue;
      const nlohmann::json& s = j.at("batch_shape");
      q3vl::BatchShape shape;
      shape.batch = s.at("batch");
      shape.seq = s.at("seq");
      shape.image_patches = s.at("image_patches");
      shape.video_patches = s.at("video_patches");
      shape.items = s.at("items");
      shape.frames = s.at("frames");
      const q3vl::app::PlanMemory p = q3vl::app::plan_memory(model, layout, shape);
      const int64_t measured = j.at("total_bytes");
      const double rel = std::abs(static_cast<double>(measured - p.total())) / static_cast<double>(p.total());
      std::printf("rank %d (batch %lldx%lld, %lld image patches): measured %lld B = shards %lld + %lld, AdamW %lld, "
                  "gathered peak %lld + staging %lld, activations %lld, scratch %lld, expert buffers %lld\n"
                  "  plan %lld B = shards %lld + %lld, AdamW %lld, gathered %lld, activations %lld, scratch %lld, "
                  "expert buffers %lld; relative difference %.4f (tolerance %.2f)\n",
                  j.at("rank").get<int>(), (long long)shape.batch, (long long)shape.seq, (long long)shape.image_patches,
                  (long long)measured, j.at("weight_shard_bytes").get<long long>(), j.at("grad_shard_bytes").get<long long>(),
                  j.at("adamw_bytes").get<long long>(), j.at("gathered_peak_bytes").get<long long>(),
                  j.at("staging_bytes").get<long long>(), j.at("activation_bytes").get<long long>(),
                  j.at("scratch_bytes").get<long long>(), j.at("ep_buffer_bytes").get<long long>(), (long long)p.total(),
                  (long long)p.weight_shard, (long long)p.grad_shard, (long long)p.adamw, (long long)p.gathered,
                  (long long)p.activations, (long long)p.scratch, (long long)p.ep_buffers, rel, tolerance);
      ok = ok && rel <= tolerance;
      ++ranks;
    }
    Q3VL_CHECK(ranks > 0, "check_memory: ", run, "/metrics.jsonl has no memory record");
    std::printf("%s\n", ok ? "measured memory agrees with the plan" : "measured memory differs from the plan");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "q3vl_check_memory: %s\n", e.what());
    return 1;
  }
}
