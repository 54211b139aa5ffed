// plan_batch against direct computations from the batch: documents, real tokens, shifted targets and their
// count (the forward's ce_tokens), position ids (get_rope_index), visual rows, the vision plan; and the model
// refusing a plan that is not its batch's, not its dtype's, or not the last forward's.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "core/layers/cross_entropy.h"
#include "core/model/rope_index.h"
#include "tests/model/test_model_tiny.h"

namespace q3vl::test {
namespace {

std::vector<int64_t> values(const Tensor& t) { return {t.data<int64_t>(), t.data<int64_t>() + t.numel()}; }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(BatchPlan, RowsAreDocumentsAndTargetsAreTheNextLabelInside) {
  const ModelConfig c = tiny_config(true);
  TestBatch tb = image_video_batch();
  const Batch b = tb.view(DType::f64);
  const BatchPlan plan = plan_batch(c, DType::f64, b);
  const int64_t S = tb.seq, n = tb.rows * S;
  EXPECT_EQ(values(plan.cu_seqlens), (std::vector<int64_t>{0, S, 2 * S}));
  int64_t targets = 0;
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(plan.valid.data<uint8_t>()[i], tb.mask[i]) << i;
    const int64_t want = (i + 1) % S == 0 ? kIgnoreIndex : tb.labels[i + 1];
    EXPECT_EQ(plan.targets.data<int64_t>()[i], want) << i;
    targets += want != kIgnoreIndex;
  }
  EXPECT_EQ(plan.target_count, targets);
  EXPECT_EQ(values(plan.doc_real), (std::vector<int64_t>{18, 15}));

  std::vector<int64_t> positions(3 * n);
  get_rope_index(c, b.input_ids, b.attention_mask, b.image_grid_thw, b.video_grid_thw, Tensor{},
                 Tensor(positions.data(), DType::i64, {3, n}));
  EXPECT_EQ(values(plan.positions), positions);

  std::vector<int64_t> image_rows, video_rows;
  for (int64_t i = 0; i < n; ++i) {
    if (tb.ids[i] == kImagePad) image_rows.push_back(i);
    if (tb.ids[i] == kVideoPad) video_rows.push_back(i);
  }
  image_rows.insert(image_rows.end(), video_rows.begin(), video_rows.end());
  EXPECT_EQ(values(plan.visual_rows), image_rows);
  EXPECT_TRUE(plan.has_vision);
  EXPECT_EQ(values(plan.vision.grid), (std::vector<int64_t>{1, 4, 4, 2, 4, 4}));
  EXPECT_EQ(values(plan.vision.cu_seqlens), (std::vector<int64_t>{0, 16, 32, 48}));  // one block per frame
  EXPECT_EQ(plan.vision.pos_weight.dtype(), DType::f64);
}

TEST(BatchPlan, PackedDocumentsEndTheirTargets) {
  TestBatch tb;
  tb.rows = 1;
  tb.seq = 9;
  tb.ids = {3, 9, 12, 40, 7, 1, 2, 33, 21};
  tb.labels = tb.ids;
  tb.cu = {0, 5, 9};
  const BatchPlan plan = plan_batch(tiny_config(true), DType::f32, tb.view(DType::f32));
  EXPECT_EQ(values(plan.cu_seqlens), tb.cu);
  EXPECT_EQ(values(plan.doc_real), (std::vector<int64_t>{5, 4}));
  EXPECT_EQ(values(plan.targets), (std::vector<int64_t>{9, 12, 40, 7, kIgnoreIndex, 2, 33, 21, kIgnoreIndex}));
  EXPECT_EQ(plan.target_count, 7);
  EXPECT_FALSE(plan.has_vision);
  EXPECT_EQ(plan.visual_rows.numel(), 0);
}

TEST(BatchPlan, TargetCountIsTheForwardsCeTokens) {
  Model m(tiny_config(true), DType::f64);
  fill_test_weights(m, 3);
  TestBatch tb = image_video_batch();
  const Batch b = tb.view(DType::f64);
  const BatchPlan plan = plan_batch(m.config(), m.dtype(), b);
  Workspace ws(m, plan.shape);
  EXPECT_EQ(m.forward(plan, b, ws).ce_tokens, plan.target_count);
}

TEST(BatchPlan, TheModelRefusesAPlanOfAnotherBatchDtypeOrForward) {
  Model m(tiny_config(true), DType::f64);
  fill_test_weights(m, 3);
  TestBatch tb = image_video_batch();
  const Batch b = tb.view(DType::f64);
  const BatchPlan plan = plan_batch(m.config(), m.dtype(), b);
  Workspace ws(m, plan.shape);

  TestBatch text;
  text.rows = 1;
  text.seq = 5;
  text.ids = {3, 9, 12, 40, 7};
  const BatchPlan text_plan = plan_batch(m.config(), m.dtype(), text.view(DType::f64));
  EXPECT_NE(error_of([&] { m.forward(text_plan, b, ws); }).find("Model::forward: the plan (1x5 tokens, 0+0 patches) "
                                                              "is not the plan of this batch"),
            std::string::npos);
  const BatchPlan f32_plan = plan_batch(m.config(), DType::f32, tb.view(DType::f32));
  EXPECT_NE(error_of([&] { m.forward(f32_plan, b, ws); }).find("the plan was made for f32, the model is f64"),
            std::string::npos);

  m.forward(plan, b, ws);
  const BatchPlan same_batch_plan = plan_batch(m.config(), m.dtype(), b);
  EXPECT_NE(error_of([&] { m.backward(same_batch_plan, ws); }).find("the plan is not the last forward's"),
            std::string::npos);
  EXPECT_NO_THROW(m.backward(plan, ws));
}

}  // namespace
}  // namespace q3vl::test
