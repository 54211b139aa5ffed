// q3vl_compare_runs RUN_A RUN_B --rtol X: the distributed-equivalence check of CTest. Two `q3vl train` output
// folders: every step B logged (a resumed run logs only its own) must be a step of A with a loss equal within X
// relative (metrics.jsonl) and, in their newest
// complete checkpoints, all parameters together within X relative L2 (||a - b|| / ||a||). Each tensor alone must
// be within 10 X: AdamW's update m / sqrt(v) does not depend on the gradient's scale, so for a tensor whose
// gradient is almost zero (the LayerNorm biases of the mergers start at 0 and barely move) the fp32 summation
// order differences of the gradient become relative differences of the update of that same size (~1e-5 after
// 5 steps here), while the whole parameter vector agrees to ~1e-8. Prints the worst differences; exit 1 when a
// bound is exceeded or the runs do not line up.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/check.h"
#include "io/safetensors.h"
#include "io/train_checkpoint.h"

namespace {

using q3vl::Tensor;

std::map<int64_t, double> step_losses(const std::string& run) {
  std::ifstream in(run + "/metrics.jsonl");
  Q3VL_CHECK(in.good(), "compare_runs: cannot read ", run, "/metrics.jsonl");
  std::map<int64_t, double> losses;
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.at("event") == "step") losses[j.at("step").get<int64_t>()] = j.at("loss").get<double>();
  }
  return losses;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Q3VL_CHECK(argc == 5 && std::string(argv[3]) == "--rtol", "usage: q3vl_compare_runs RUN_A RUN_B --rtol X");
    const std::string a = argv[1], b = argv[2];
    const double rtol = std::stod(argv[4]);
    bool ok = true;

    // B's steps (all of them: a resumed run logs only the steps it ran) must be steps of A.
    const std::map<int64_t, double> la = step_losses(a), lb = step_losses(b);
    Q3VL_CHECK(!lb.empty(), "compare_runs: ", b, " logged no steps");
    double worst_loss = 0;
    for (const auto& [step, loss] : lb) {
      Q3VL_CHECK(la.count(step) == 1, "compare_runs: step ", step, " of ", b, " is not in ", a);
      worst_loss = std::max(worst_loss, std::abs(la.at(step) - loss) / std::abs(la.at(step)));
    }
    std::printf("losses of steps %lld..%lld: worst relative difference %.3g (bound %.3g)\n",
                static_cast<long long>(lb.begin()->first), static_cast<long long>(lb.rbegin()->first), worst_loss, rtol);
    ok = ok && worst_loss <= rtol;

    const auto ca = q3vl::io::latest_complete_checkpoint(a + "/checkpoints");
    const auto cb = q3vl::io::latest_complete_checkpoint(b + "/checkpoints");
    Q3VL_CHECK(ca && cb && ca->step == cb->step, "compare_runs: the runs have no complete checkpoints of the same step");
    const q3vl::io::SafetensorsDir wa(ca->path + "/model"), wb(cb->path + "/model");
    Q3VL_CHECK(wa.keys() == wb.keys(), "compare_runs: the checkpoints hold different tensors");
    double worst_param = 0, total_diff = 0, total_norm = 0;
    std::string worst_key;
    for (const std::string& key : wa.keys()) {
      const q3vl::io::StTensorInfo& ia = wa.info(key);
      std::vector<float> va(static_cast<size_t>(ia.numel())), vb(va.size());
      q3vl::Shape shape;
      shape.ndim = static_cast<int>(ia.shape.size());
      for (size_t d = 0; d < ia.shape.size(); ++d) shape.dims[d] = ia.shape[d];
      wa.read(key, Tensor(va.data(), q3vl::DType::f32, shape));
      wb.read(key, Tensor(vb.data(), q3vl::DType::f32, shape));
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
        worst_key = key;
      }
    }
    const double total = total_diff == 0 ? 0 : std::sqrt(total_diff / total_norm);
    std::printf("parameters at step %lld (%zu tensors): relative L2 difference %.3g (bound %.3g); worst tensor %.3g%s%s "
                "(bound %.3g)\n",
                static_cast<long long>(ca->step), wa.keys().size(), total, rtol, worst_param,
                worst_key.empty() ? "" : " in ", worst_key.c_str(), 10 * rtol);
    ok = ok && total <= rtol && worst_param <= 10 * rtol;
    std::printf("%s\n", ok ? "equivalent" : "NOT equivalent");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "q3vl_compare_runs: %s\n", e.what());
    return 1;
  }
}
