// q3vl_compare_runs RUN_A RUN_B --rtol X: the distributed-equivalence check of CTest. Two `q3vl train` output
// folders: every step B logged (a resumed run logs only its own) must be a step of A with a loss equal within X
// relative (metrics.jsonl) and, in their newest complete checkpoints (whole-tensor or sharded, any layout), all
// parameters together within X relative L2 (||a - b|| / ||a||). Each tensor alone must be within 10 X: AdamW's
// update m / sqrt(v) does not depend on the gradient's scale, so for a tensor whose gradient is almost zero (the
// LayerNorm biases of the mergers start at 0 and barely move) the fp32 summation order differences of the
// gradient become relative differences of the update of that same size (~1e-5 after 5 steps here), while the
// whole parameter vector agrees to ~1e-8. Prints the worst differences; exit 1 when a bound is exceeded or the
// runs do not line up.
//
// --min-router-margin M (after --rtol X): also every step record of both runs must report a routing margin
// (router_margin: the smallest router-logit gap between a token's last chosen expert and the best one left out)
// of at least M. Runs that differ only in fp32 summation order agree within X only if every token chose the same
// experts in both; a token nearer a tie than the logits' summation noise may flip, which moves its whole
// contribution to another expert's gradient. The margin check tells such a near-tie apart from a real mismatch.
//
// Runs with a router bias (moe.balance: bias | aux+bias, in trainer_state.json) must have equal biases, bit for
// bit: the bias moves by +-rate from integer expert loads summed over all ranks, so any layout that routes every
// token alike computes the same bias.
//
// q3vl_compare_runs RUN RUN --export-of-b: RUN's HF export (RUN/hf, f32) must hold exactly the parameters of
// RUN's newest checkpoint (a sharded run gathers its export unit by unit).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/model/param_specs.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "io/sharded_checkpoint.h"
#include "io/train_checkpoint.h"

namespace {

namespace fs = std::filesystem;
using q3vl::Tensor;
using Field = q3vl::io::CheckpointReader::Field;

// The step records of a run's metrics.jsonl by step.
std::map<int64_t, nlohmann::json> step_records(const std::string& run) {
  std::ifstream in(run + "/metrics.jsonl");
  Q3VL_CHECK(in.good(), "compare_runs: cannot read ", run, "/metrics.jsonl");
  std::map<int64_t, nlohmann::json> steps;
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.at("event") == "step") steps[j.at("step").get<int64_t>()] = j;
  }
  return steps;
}

// The smallest routing margin over every step record of both runs; false when it is below `bound`.
bool check_router_margin(const std::string& a, const std::string& b, double bound) {
  double smallest = std::numeric_limits<double>::infinity();
  std::string where;
  for (const std::string& run : {a, b}) {
    for (const auto& [step, j] : step_records(run)) {
      Q3VL_CHECK(j.contains("router_margin"), "compare_runs: step ", step, " of ", run,
                 " has no router_margin (not an MoE run, or written before the margin was logged)");
      const double m = j.at("router_margin").get<double>();
      if (m < smallest) {
        smallest = m;
        where = "step " + std::to_string(step) + " of " + run;
      }
    }
  }
  std::printf("routing margin: smallest top-k router-logit gap %.3g at %s (bound %.3g)\n", smallest, where.c_str(),
              bound);
  if (smallest >= bound) return true;
  std::printf("a token is within %.3g of a routing tie: runs differing in summation order may route it to other "
              "experts, so their parameters cannot be compared within the bound (choose other data or init_seed)\n",
              smallest);
  return false;
}

// The model config a checkpoint folder was written with (sharded: config.json; whole-tensor: model/config.json).
q3vl::ModelConfig checkpoint_config(const std::string& dir) {
  const fs::path sharded = fs::path(dir) / "config.json";
  return q3vl::io::load_model_config(fs::exists(sharded) ? sharded.string() : (fs::path(dir) / "model/config.json").string());
}

std::vector<float> read_param(const q3vl::io::CheckpointReader& r, const q3vl::ParamSpec& s) {
  std::vector<float> v(static_cast<size_t>(s.numel()));
  r.read(s.hf_key, Field::param, 0, s.numel(), v.data());
  return v;
}

int export_check(const std::string& run) {
  const auto c = q3vl::io::latest_complete_checkpoint(run + "/checkpoints");
  Q3VL_CHECK(c, "compare_runs: ", run, " has no complete checkpoint");
  const q3vl::ModelConfig config = checkpoint_config(c->path);
  const q3vl::io::CheckpointReader reader(c->path, config);
  const q3vl::io::SafetensorsDir hf(run + "/hf");
  size_t differing = 0, tensors = 0;
  for (const q3vl::ParamSpec& s : q3vl::model_param_specs(config)) {
    const std::vector<float> want = read_param(reader, s);
    std::vector<float> got(want.size());
    hf.read(s.hf_key, Tensor(got.data(), q3vl::DType::f32, s.shape));
    ++tensors;
    if (got != want) {
      ++differing;
      std::printf("differs: %s\n", s.hf_key.c_str());
    }
  }
  std::printf("%zu tensors, %zu differ\n", tensors, differing);
  if (differing == 0) std::printf("export equals the checkpoint\n");
  return differing == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 4 && std::string(argv[3]) == "--export-of-b") return export_check(argv[2]);
    const bool with_margin = argc == 7 && std::string(argv[5]) == "--min-router-margin";
    Q3VL_CHECK((argc == 5 || with_margin) && std::string(argv[3]) == "--rtol",
               "usage: q3vl_compare_runs RUN_A RUN_B --rtol X [--min-router-margin M] | q3vl_compare_runs RUN RUN "
               "--export-of-b");
    const std::string a = argv[1], b = argv[2];
    const double rtol = std::stod(argv[4]);
    bool ok = !with_margin || check_router_margin(a, b, std::stod(argv[6]));

    // B's steps (all of them: a resumed run logs only the steps it ran) must be steps of A.
    const std::map<int64_t, nlohmann::json> la = step_records(a), lb = step_records(b);
    Q3VL_CHECK(!lb.empty(), "compare_runs: ", b, " logged no steps");
    double worst_loss = 0;
    for (const auto& [step, record] : lb) {
      Q3VL_CHECK(la.count(step) == 1, "compare_runs: step ", step, " of ", b, " is not in ", a);
      const double want = la.at(step).at("loss").get<double>(), got = record.at("loss").get<double>();
      worst_loss = std::max(worst_loss, std::abs(want - got) / std::abs(want));
    }
    std::printf("losses of steps %lld..%lld: worst relative difference %.3g (bound %.3g)\n",
                static_cast<long long>(lb.begin()->first), static_cast<long long>(lb.rbegin()->first), worst_loss, rtol);
    ok = ok && worst_loss <= rtol;

    const auto ca = q3vl::io::latest_complete_checkpoint(a + "/checkpoints");
    const auto cb = q3vl::io::latest_complete_checkpoint(b + "/checkpoints");
    Q3VL_CHECK(ca && cb && ca->step == cb->step, "compare_runs: the runs have no complete checkpoints of the same step");
    const q3vl::ModelConfig config = checkpoint_config(ca->path);
    const q3vl::io::CheckpointReader ra(ca->path, config), rb(cb->path, config);
    std::printf("checkpoints: %s (%s), %s (%s)\n", ca->path.c_str(), ra.sharded() ? "sharded" : "whole tensors",
                cb->path.c_str(), rb.sharded() ? "sharded" : "whole tensors");
    double worst_param = 0, total_diff = 0, total_norm = 0;
    std::string worst_key;
    const std::vector<q3vl::ParamSpec> specs = q3vl::model_param_specs(config);
    for (const q3vl::ParamSpec& s : specs) {
      const std::vector<float> va = read_param(ra, s), vb = read_param(rb, s);
      double diff = 0, norm = 0;
      for (size_t i = 0; i < va.size(); ++i) {
        diff += (double(va[i]) - vb[i]) * (double(va[i]) - vb[i]);
        norm += double(va[i]) * va[i];
      }
      total_diff += diff;
      total_norm += norm;
      const double rel = diff == 0 ? 0 : std::sqrt(diff / norm);
      if (rel > worst_param) {
        worst_param = rel;
        worst_key = s.hf_key;
      }
    }
    const double total = total_diff == 0 ? 0 : std::sqrt(total_diff / total_norm);
    std::printf("parameters at step %lld (%zu tensors): relative L2 difference %.3g (bound %.3g); worst tensor %.3g%s%s "
                "(bound %.3g)\n",
                static_cast<long long>(ca->step), specs.size(), total, rtol, worst_param,
                worst_key.empty() ? "" : " in ", worst_key.c_str(), 10 * rtol);
    ok = ok && total <= rtol && worst_param <= 10 * rtol;
    const nlohmann::json sa = nlohmann::json::parse(ra.trainer_state_json()),
                         sb = nlohmann::json::parse(rb.trainer_state_json());
    if (sa.contains("router_bias") || sb.contains("router_bias")) {
      const bool same =
          sa.contains("router_bias") && sb.contains("router_bias") && sa["router_bias"] == sb["router_bias"];
      std::printf("router bias: %s\n", same ? "equal" : "differs (or only one run has one)");
      ok = ok && same;
    }
    std::printf("%s\n", ok ? "equivalent" : "NOT equivalent");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "q3vl_compare_runs: %s\n", e.what());
    return 1;
  }
}
