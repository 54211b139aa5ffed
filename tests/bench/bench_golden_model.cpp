// Forward + backward of a whole golden model on its golden batch (the same model, batch and thread count
// that tests/golden/generate.py times in HF transformers, recorded in tests/golden/hf_timing.json), so the
// ratio to PyTorch can be quoted. Reports the arenas' bytes (weights, gradients, activations, scratch) and
// the process's peak resident set.
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "io/hdf5_batch.h"
#include "io/model_io.h"

namespace {

void BM_GoldenModelForwardBackward(benchmark::State& state) {
  using namespace q3vl;
  std::ifstream timing(std::string(Q3VL_SOURCE_DIR) + "/tests/golden/hf_timing.json");
  const nlohmann::json hf = nlohmann::json::parse(timing);
  const std::string dir = std::string(Q3VL_SOURCE_DIR) + "/tests/golden/fixtures/" + hf.at("model").get<std::string>();
  auto model = io::load_hf_model(dir);
  const io::HostBatch host =
      io::read_hdf5_batch(dir + "/" + hf.at("case").get<std::string>() + "/batch.h5", io::batch_limits(model->config()));
  io::BatchTensors tensors(host, DType::f32);
  Workspace ws(*model, BatchShape::of(tensors.batch()));
  for (auto _ : state) {
    model->zero_grads();
    // Planned every step, as the trainer does (and as HF's forward computes its position ids).
    const BatchPlan plan = plan_batch(model->config(), model->dtype(), tensors.batch());
    const ForwardResult r = model->forward(plan, tensors.batch(), ws);
    model->backward(plan, ws);
    benchmark::DoNotOptimize(r.loss);
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const double hf_median = hf.at("seconds_median").get<double>(), hf_min = hf.at("seconds_min").get<double>();
  state.counters["tokens"] = static_cast<double>(host.batch * host.seq_len);
  state.counters["weights_B"] = static_cast<double>(ParamStore::bytes(model->config(), DType::f32));
  state.counters["acts_B"] = static_cast<double>(ws.activations().high_water());
  state.counters["scratch_B"] = static_cast<double>(ws.scratch().high_water());
  state.counters["max_rss_KiB"] = static_cast<double>(ru.ru_maxrss);
  state.counters["hf_median_s"] = hf_median;
  state.counters["hf_min_s"] = hf_min;
}
BENCHMARK(BM_GoldenModelForwardBackward)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
