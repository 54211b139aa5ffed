// The assembled model against Hugging Face transformers, tensor by tensor, on every golden fixture under
// tests/golden/fixtures (written by tests/golden/generate.py with pinned torch/transformers, fp32, eager
// attention and experts). Tolerances are the model issue's acceptance bounds: logits 1e-4 max absolute
// difference, CE loss and aux loss 1e-5 relative, every parameter gradient 1e-4 relative L2 error (a tensor
// whose HF gradient is exactly zero, e.g. the vision tower on a text-only batch, must be zero here too, to
// 1e-7 absolute L2). fp32 summation order (GEMM blocking, expert sum order) is the only expected difference.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <iostream>
#include <vector>

#include "io/hdf5_batch.h"
#include "io/model_io.h"
#include "io/safetensors.h"

namespace q3vl::test {
namespace {

namespace fs = std::filesystem;

struct GoldenCase {
  std::string model_dir, case_dir, name;
};

void PrintTo(const GoldenCase& c, std::ostream* os) { *os << c.name; }

std::vector<GoldenCase> golden_cases() {
  std::vector<GoldenCase> cases;
  const fs::path root = fs::path(Q3VL_SOURCE_DIR) / "tests" / "golden" / "fixtures";
  if (!fs::is_directory(root)) return cases;
  for (const auto& model : fs::directory_iterator(root)) {
    if (!fs::exists(model.path() / "config.json")) continue;
    for (const auto& c : fs::directory_iterator(model.path()))
      if (fs::exists(c.path() / "batch.h5"))
        cases.push_back({model.path().string(), c.path().string(),
                         model.path().filename().string() + "_" + c.path().filename().string()});
  }
  std::sort(cases.begin(), cases.end(), [](const GoldenCase& a, const GoldenCase& b) { return a.name < b.name; });
  return cases;
}

class Golden : public testing::TestWithParam<GoldenCase> {};

TEST(GoldenFixtures, ArePresent) { EXPECT_GE(golden_cases().size(), 10u); }

TEST_P(Golden, MatchesHuggingFace) {
  const GoldenCase& gc = GetParam();
  auto model = io::load_hf_model(gc.model_dir);
  const io::HostBatch host = io::read_hdf5_batch(gc.case_dir + "/batch.h5", io::batch_limits(model->config()));
  io::BatchTensors tensors(host, DType::f32);
  const BatchPlan plan = plan_batch(model->config(), model->dtype(), tensors.batch());
  Workspace ws(*model, plan.shape);
  const ForwardResult r = model->forward(plan, tensors.batch(), ws);

  const std::string expected = gc.case_dir + "/expected.h5";
  const io::F32Array logits = io::read_hdf5_f32(expected, "logits");
  ASSERT_EQ(static_cast<int64_t>(logits.data.size()), r.logits.numel());
  double max_logit = 0;
  const float* lp = r.logits.data<float>();
  for (size_t i = 0; i < logits.data.size(); ++i) max_logit = std::max(max_logit, double(std::abs(lp[i] - logits.data[i])));
  EXPECT_LE(max_logit, 1e-4) << "logits";

  const double hf_loss = io::read_hdf5_f32(expected, "loss").data.at(0);
  const double hf_aux = io::read_hdf5_f32(expected, "aux_loss").data.at(0);
  EXPECT_LE(std::abs(r.ce_loss - hf_loss), 1e-5 * std::abs(hf_loss)) << "loss " << r.ce_loss << " vs " << hf_loss;
  EXPECT_LE(std::abs(r.aux_loss - hf_aux), 1e-5 * std::abs(hf_aux)) << "aux " << r.aux_loss << " vs " << hf_aux;

  model->zero_grads();
  model->backward(plan, ws);
  const io::SafetensorsFile ref(gc.case_dir + "/grads.safetensors");
  Arena buf("golden grads", size_t(64) << 20);
  double worst = 0;
  std::string worst_key;
  int compared = 0;
  for (const ParamSpec& spec : model->grads().specs()) {
    const Tensor g = model->grads().at(spec.hf_key);
    const size_t mark = buf.mark();
    Tensor h = Tensor::empty(buf, g.shape(), DType::f32);
    ref.read(spec.hf_key, h);
    const float* gp = g.data<float>();
    const float* hp = h.data<float>();
    double diff = 0, norm = 0;
    for (int64_t i = 0; i < g.numel(); ++i) {
      diff += double(gp[i] - hp[i]) * (gp[i] - hp[i]);
      norm += double(hp[i]) * hp[i];
    }
    buf.release(mark);
    if (norm == 0) {
      EXPECT_LE(std::sqrt(diff), 1e-7) << spec.hf_key << ": HF gradient is zero";
      continue;
    }
    const double rel = std::sqrt(diff / norm);
    EXPECT_LE(rel, 1e-4) << spec.hf_key << " relative L2 error";
    if (rel > worst) {
      worst = rel;
      worst_key = spec.hf_key;
    }
    ++compared;
  }
  EXPECT_EQ(ref.tensors().size(), model->grads().specs().size()) << "grads.safetensors has other keys than the model";
  std::cout << gc.name << ": max |logit diff| " << max_logit << ", loss rel " << std::abs(r.ce_loss - hf_loss) / std::abs(hf_loss)
            << ", aux " << r.aux_loss << " vs " << hf_aux << ", " << compared << " nonzero gradients, worst rel L2 "
            << worst << " (" << worst_key << ")\n";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Golden, testing::ValuesIn(golden_cases()),
                         [](const testing::TestParamInfo<GoldenCase>& i) { return i.param.name; });

}  // namespace
}  // namespace q3vl::test
