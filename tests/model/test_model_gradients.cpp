// Whole-model gradient checks in f64: the analytic gradient of the training loss (CE + coef * aux) with
// respect to sampled elements of EVERY parameter tensor against central finite differences. Perturbing
// every element of the model would take hours, so each tensor contributes 3 elements at Philox-chosen
// indices (all tensors together cover patch embed, position table, every vision block, both DeepStack
// mergers, the final merger, embeddings, dense and MoE layers, the final norm and lm_head). Also the per-layer
// aux loss (each MoE layer its own row of d aux / d probs) with a router score bias choosing the experts.
#include <gtest/gtest.h>

#include <string>

#include "tests/model/test_model_tiny.h"

namespace q3vl::test {
namespace {

constexpr int kSamplesPerTensor = 3;

// bias: the router score bias of every MoE layer, alternating +-bias over the experts (0: none).
void check_model_gradients(const std::string& name, const ModelConfig& config, TestBatch& tb,
                           const ForwardOptions& options = {}, float bias = 0) {
  Model model(config, DType::f64);
  fill_test_weights(model, 7);
  if (bias != 0) {
    model.enable_router_bias();
    const Tensor& b = model.router_bias();
    for (int64_t i = 0; i < b.numel(); ++i) b.data<float>()[i] = i % 2 ? bias : -bias;
  }
  const Batch batch = tb.view(DType::f64);
  const BatchPlan plan = plan_batch(model.config(), model.dtype(), batch);
  Workspace ws(model, plan.shape);
  model.zero_grads();
  const ForwardResult r = model.forward(plan, batch, ws, options);
  ASSERT_GT(r.ce_tokens, 0);
  model.backward(plan, ws);

  auto loss = [&] { return model.forward(plan, batch, ws, options).loss; };
  std::vector<GradTarget> targets;
  const ParamStore& w = model.weights();
  const ParamStore& g = model.grads();
  for (size_t i = 0; i < w.size(); ++i) {
    const int64_t numel = w.tensor(i).numel();
    const Philox pick(11, i);
    for (int s = 0; s < kSamplesPerTensor; ++s) {
      const auto k = static_cast<int64_t>(pick.uniform(s) * static_cast<double>(numel));
      targets.push_back({w.specs()[i].hf_key, w.tensor(i).view({numel}).narrow(0, k, 1),
                         g.tensor(i).view({numel}).narrow(0, k, 1)});
    }
  }
  expect_gradients(name, loss, targets);
}

TEST(ModelGradients, MoeWithImageVideoAndPadding) {
  TestBatch tb = image_video_batch();
  check_model_gradients("model(moe, image+video+padding)", tiny_config(true), tb);
}

TEST(ModelGradients, DenseTiedWithImage) {
  ModelConfig c = tiny_config(false);
  c.tie_word_embeddings = true;
  TestBatch tb = image_video_batch();
  tb.video_grid.clear();
  // Row 1 without video: its placeholder tokens become ordinary text.
  for (int64_t& id : tb.ids)
    if (id == kVideoPad) id = 3;
  tb.labels = labels_for(tb.ids, tb.mask);
  check_model_gradients("model(dense tied, image)", c, tb);
}

TEST(ModelGradients, TextOnlyPackedDocuments) {
  TestBatch tb;
  tb.rows = 1;
  tb.seq = 14;
  tb.ids = {3, 9, 12, 40, 7, 1, 2, 33, 21, 5, 6, 8, 10, 11};
  tb.labels = labels_for(tb.ids, {});
  tb.cu = {0, 5, 9, 14};
  check_model_gradients("model(moe, packed text)", tiny_config(true), tb);
}

TEST(ModelGradients, MoePerLayerAuxLossWithRouterBias) {
  TestBatch tb = image_video_batch();
  ForwardOptions options;
  options.aux_per_layer = true;
  check_model_gradients("model(moe, per-layer aux, router bias)", tiny_config(true), tb, options, 0.05f);
}

}  // namespace
}  // namespace q3vl::test
