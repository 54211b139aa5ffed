// Whole-model behaviour: padding and packing change nothing for the real tokens (logits, losses and every
// gradient), DeepStack taps map to mergers as in HF, f32 agrees with f64, runs are deterministic, the
// workspace is sized up front, and bad batches fail with errors naming the problem.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>

#include "io/hdf5_batch.h"
#include "tests/model/test_model_tiny.h"
#include "tests/support/test_files.h"

namespace q3vl::test {
namespace {

// Tolerance of f64 comparisons between two computations of the same values that differ only in GEMM
// blocking and summation order over different token counts: rounding ~1e-16 relative per operation
// through ~100 sequential operations stays far below 1e-10.
constexpr double kSameMathTol = 1e-10;

struct RunOutput {
  ForwardResult result;
  std::vector<double> logits;  // copied before the backward overwrites them
};

RunOutput run(Model& model, const Batch& batch, bool backward = true) {
  const BatchPlan plan = plan_batch(model.config(), model.dtype(), batch);
  Workspace ws(model, plan.shape);
  RunOutput r;
  r.result = model.forward(plan, batch, ws);
  const double* p = r.result.logits.data<double>();
  r.logits.assign(p, p + r.result.logits.numel());
  if (backward) model.backward(plan, ws);
  return r;
}

double max_grad_diff(const ParamStore& a, const ParamStore& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double* x = a.tensor(i).data<double>();
    const double* y = b.tensor(i).data<double>();
    for (int64_t k = 0; k < a.tensor(i).numel(); ++k)
      worst = std::max(worst, std::abs(x[k] - y[k]) / (1e-3 + std::abs(x[k])));
  }
  return worst;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

// Row 1 of image_video_batch (a video, 15 real tokens) alone, optionally without its 3 padding tokens.
TestBatch video_row(bool padded) {
  TestBatch full = image_video_batch();
  TestBatch b;
  b.rows = 1;
  b.seq = padded ? 18 : 15;
  b.ids.assign(full.ids.begin() + 18, full.ids.begin() + 18 + b.seq);
  if (padded) b.mask.assign(full.mask.begin() + 18, full.mask.end());
  b.labels = labels_for(b.ids, b.mask);
  b.video_grid = full.video_grid;
  b.video_px = full.video_px;
  return b;
}

TEST(ModelForward, PaddingChangesNothingForRealTokens) {
  Model a(tiny_config(true), DType::f64), b(tiny_config(true), DType::f64);
  fill_test_weights(a, 3);
  fill_test_weights(b, 3);
  TestBatch padded = video_row(true), plain = video_row(false);
  const RunOutput ra = run(a, padded.view(DType::f64)), rb = run(b, plain.view(DType::f64));
  const int64_t vocab = 64;
  for (int64_t i = 0; i < 15 * vocab; ++i) ASSERT_NEAR(ra.logits[i], rb.logits[i], kSameMathTol) << i;
  EXPECT_EQ(ra.result.ce_tokens, rb.result.ce_tokens);
  EXPECT_NEAR(ra.result.ce_loss, rb.result.ce_loss, kSameMathTol);
  EXPECT_NEAR(ra.result.aux_loss, rb.result.aux_loss, kSameMathTol);  // padding is out of the routing stats
  EXPECT_LT(max_grad_diff(a.grads(), b.grads()), kSameMathTol);
}

TEST(ModelForward, PackedDocumentsEqualSeparateRows) {
  Model a(tiny_config(true), DType::f64), b(tiny_config(true), DType::f64);
  fill_test_weights(a, 4);
  fill_test_weights(b, 4);
  TestBatch packed;
  packed.rows = 1;
  packed.seq = 9;
  packed.ids = {3, 9, 12, 40, 7, 1, 2, 33, 21};
  packed.labels = packed.ids;
  packed.labels[5] = -100;  // the first document must not predict the second one's first token
  packed.cu = {0, 5, 9};
  TestBatch rows;
  rows.rows = 2;
  rows.seq = 5;
  rows.ids = {3, 9, 12, 40, 7, 1, 2, 33, 21, 0};
  rows.mask = {1, 1, 1, 1, 1, 1, 1, 1, 1, 0};
  rows.labels = labels_for(rows.ids, rows.mask);
  const RunOutput ra = run(a, packed.view(DType::f64)), rb = run(b, rows.view(DType::f64));
  for (int64_t i = 0; i < 9 * 64; ++i) ASSERT_NEAR(ra.logits[i], rb.logits[i], kSameMathTol) << i;
  EXPECT_EQ(ra.result.ce_tokens, rb.result.ce_tokens);
  EXPECT_NEAR(ra.result.loss, rb.result.loss, kSameMathTol);
  EXPECT_LT(max_grad_diff(a.grads(), b.grads()), kSameMathTol);
}

TEST(ModelForward, DeepStackTapsFollowTheIndexList) {
  // HF: the merger of a tap is deepstack_visual_indexes.index(block) and taps feed decoder layers in block
  // order. Listing the indexes the other way round with the merger weights swapped is the same model.
  ModelConfig ca = tiny_config(true), cb = tiny_config(true);
  cb.vision.deepstack_visual_indexes = {2, 0};
  Model a(ca, DType::f64), b(cb, DType::f64);
  fill_test_weights(a, 5);
  fill_test_weights(b, 5);
  for (size_t i = 0; i < b.weights().size(); ++i) {
    std::string key = b.weights().specs()[i].hf_key;
    const std::string list = "deepstack_merger_list.";
    const size_t at = key.find(list);
    if (at != std::string::npos) key[at + list.size()] = key[at + list.size()] == '0' ? '1' : '0';
    copy(b.weights().tensor(i), a.weights().at(key));
  }
  TestBatch tb = image_video_batch();
  const RunOutput ra = run(a, tb.view(DType::f64), false), rb = run(b, tb.view(DType::f64), false);
  for (size_t i = 0; i < ra.logits.size(); ++i) ASSERT_NEAR(ra.logits[i], rb.logits[i], kSameMathTol) << i;
}

TEST(ModelForward, Float32AgreesWithFloat64) {
  Model m64(tiny_config(true), DType::f64), m32(tiny_config(true), DType::f32);
  fill_test_weights(m64, 6);
  for (size_t i = 0; i < m64.weights().size(); ++i) {
    const Tensor& src = m64.weights().tensor(i);
    float* dst = m32.weights().tensor(i).data<float>();
    for (int64_t k = 0; k < src.numel(); ++k) dst[k] = static_cast<float>(src.data<double>()[k]);
  }
  TestBatch tb = image_video_batch();
  const Batch b64 = tb.view(DType::f64);
  const Batch b32 = tb.view(DType::f32);
  const BatchPlan p64 = plan_batch(m64.config(), m64.dtype(), b64), p32 = plan_batch(m32.config(), m32.dtype(), b32);
  Workspace w64(m64, p64.shape), w32(m32, p32.shape);
  const ForwardResult r64 = m64.forward(p64, b64, w64), r32 = m32.forward(p32, b32, w32);
  // The parity budget against HF (1e-4 on logits): fp32 rounding through this tiny stack is ~1e-6.
  double worst = 0;
  for (int64_t i = 0; i < r64.logits.numel(); ++i)
    worst = std::max(worst, std::abs(r64.logits.data<double>()[i] - r32.logits.data<float>()[i]));
  EXPECT_LT(worst, 1e-4);
  EXPECT_NEAR(r32.loss, r64.loss, 1e-5 * r64.loss);
}

TEST(ModelForward, RepeatedStepsGiveBitwiseEqualGradients) {
  Model m(tiny_config(true), DType::f32);
  m.init_weights(9);
  TestBatch tb = image_video_batch();
  const Batch b = tb.view(DType::f32);
  const BatchPlan plan = plan_batch(m.config(), m.dtype(), b);
  Workspace ws(m, plan.shape);
  std::vector<std::vector<float>> first;
  for (int rep = 0; rep < 2; ++rep) {
    m.zero_grads();
    m.forward(plan, b, ws);
    m.backward(plan, ws);
    for (size_t i = 0; i < m.grads().size(); ++i) {
      const Tensor& g = m.grads().tensor(i);
      std::vector<float> v(g.data<float>(), g.data<float>() + g.numel());
      if (rep == 0) first.push_back(v);
      else ASSERT_EQ(v, first[i]) << m.grads().specs()[i].hf_key;
    }
  }
}

TEST(ModelForward, WorkspaceIsSizedUpFront) {
  Model m(tiny_config(true), DType::f32);
  m.init_weights(9);
  TestBatch tb = image_video_batch();
  const Batch b = tb.view(DType::f32);
  const BatchPlan plan = plan_batch(m.config(), m.dtype(), b);
  Workspace ws(m, plan.shape);
  m.forward(plan, b, ws);
  m.backward(plan, ws);
  EXPECT_LE(ws.activations().high_water(), ws.activations().capacity());
  EXPECT_LE(ws.scratch().high_water(), ws.scratch().capacity());
  // The estimate is an upper bound that wastes little (transients are counted once).
  EXPECT_GT(ws.activations().high_water(), ws.activations().capacity() * 8 / 10);
  // A smaller batch fits the same workspace; a larger one is refused before any computation.
  TestBatch small = video_row(true);
  const Batch small_b = small.view(DType::f32);
  EXPECT_NO_THROW(m.forward(plan_batch(m.config(), m.dtype(), small_b), small_b, ws));
  TestBatch big = image_video_batch();
  big.rows = 3;  // a third row of text: more tokens than the workspace holds
  for (int64_t i = 0; i < 18; ++i) {
    big.ids.push_back(10 + i);
    big.mask.push_back(1);
  }
  big.labels = labels_for(big.ids, big.mask);
  const Batch big_b = big.view(DType::f32);
  EXPECT_NE(error_of([&] { m.forward(plan_batch(m.config(), m.dtype(), big_b), big_b, ws); }).find("exceeds the workspace"),
            std::string::npos);
}

TEST(ModelForward, PadTokenRowTakesNoEmbeddingGradient) {
  // HF: nn.Embedding(padding_idx = text_config.pad_token_id). Padding carries no loss gradient anyway, so
  // the pad id also appears as a real token (HF batches do that when the pad token is, e.g., <|endoftext|>).
  ModelConfig with_pad = tiny_config(true);
  with_pad.text.pad_token_id = 0;
  Model a(tiny_config(true), DType::f64), b(with_pad, DType::f64);
  fill_test_weights(a, 8);
  fill_test_weights(b, 8);
  TestBatch tb = image_video_batch();
  tb.ids[7] = 0;
  tb.labels = labels_for(tb.ids, tb.mask);
  const RunOutput ra = run(a, tb.view(DType::f64)), rb = run(b, tb.view(DType::f64));
  EXPECT_EQ(ra.logits, rb.logits);
  const Tensor ga = a.grads().at("model.language_model.embed_tokens.weight");
  const Tensor gb = b.grads().at("model.language_model.embed_tokens.weight");
  const int64_t h = ga.size(1);
  double row0 = 0;
  for (int64_t k = 0; k < h; ++k) {
    row0 += std::abs(ga.data<double>()[k]);
    EXPECT_EQ(gb.data<double>()[k], 0.0);
  }
  EXPECT_GT(row0, 0.0);  // without padding_idx the padding row does get a gradient
  for (int64_t k = h; k < ga.numel(); ++k) ASSERT_EQ(ga.data<double>()[k], gb.data<double>()[k]) << k;
}

TEST(ModelForward, PlaceholderCountMismatchIsAnError) {
  Model m(tiny_config(true), DType::f64);
  TestBatch tb = image_video_batch();
  tb.ids[3] = 5;  // one <|image_pad|> too few for the 4 merged image tokens
  const std::string e = error_of([&] { run(m, tb.view(DType::f64)); });
  EXPECT_NE(e.find("image features and image tokens do not match: 3 <|image_pad|> tokens (id 60), 4 features"),
            std::string::npos)
      << e;
  TestBatch tv = image_video_batch();
  tv.ids[20] = 5;
  EXPECT_NE(error_of([&] { run(m, tv.view(DType::f64)); }).find("video features and video tokens do not match"),
            std::string::npos);
}

TEST(ModelForward, BadBatchesAreErrorsNamingTheProblem) {
  Model m(tiny_config(true), DType::f64);
  {
    TestBatch tb = image_video_batch();
    tb.labels[34] = 5;
    EXPECT_NE(error_of([&] { run(m, tb.view(DType::f64)); }).find("labels[1, 16] = 5 at a padding position"),
              std::string::npos);
  }
  {
    TestBatch tb = image_video_batch();
    tb.mask[18] = 0;  // left padding
    EXPECT_NE(error_of([&] { run(m, tb.view(DType::f64)); }).find("only right padding is supported"),
              std::string::npos);
  }
  {
    TestBatch tb = image_video_batch();
    Batch b = tb.view(DType::f64);
    b.image_grid_thw = Tensor{};
    EXPECT_NE(error_of([&] { run(m, b); }).find("pixel_values and image_grid_thw must be given together"),
              std::string::npos);
  }
  {
    TestBatch tb = image_video_batch();
    tb.ids[7] = 64;
    EXPECT_NE(error_of([&] { run(m, tb.view(DType::f64)); }).find("input_ids[0, 7] = 64 outside the vocabulary"),
              std::string::npos);
  }
  {
    TestBatch tb = image_video_batch();
    const Batch b32 = tb.view(DType::f32);
    EXPECT_NE(error_of([&] { run(m, b32); }).find("pixel_values"), std::string::npos);  // f32 pixels, f64 model
  }
  {
    TestBatch tb = image_video_batch();
    const Batch b = tb.view(DType::f64);
    const BatchPlan plan = plan_batch(m.config(), m.dtype(), b);
    Workspace ws(m, plan.shape);
    EXPECT_NE(error_of([&] { m.backward(plan, ws); }).find("no forward to differentiate"), std::string::npos);
  }
}

// `q3vl forward` on non-finite numbers: a copy of the golden MoE checkpoint with the float32 values of tensor `key`
// edited in its safetensors.
std::string golden_moe() { return std::string(Q3VL_SOURCE_DIR) + "/tests/golden/fixtures/moe"; }

std::string checkpoint_with(const TempDir& tmp, const std::string& key, const std::function<void(float*, int64_t)>& edit) {
  const std::string dir = tmp / "model";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(golden_moe() + "/config.json", dir + "/config.json");
  std::string bytes = read_all(golden_moe() + "/model.safetensors");
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  const nlohmann::json header = nlohmann::json::parse(bytes.substr(8, header_len));
  const auto offsets = header.at(key).at("data_offsets");
  EXPECT_EQ(header.at(key).at("dtype"), "F32");
  float* data = reinterpret_cast<float*>(bytes.data() + 8 + header_len + offsets[0].get<size_t>());
  edit(data, (offsets[1].get<int64_t>() - offsets[0].get<int64_t>()) / 4);
  write_all(dir + "/model.safetensors", bytes);
  return dir;
}

CommandRun run_forward(const std::string& model, const std::string& batch, const std::string& out) {
  return run_command(std::string("'") + Q3VL_CLI + "' forward --model " + model + " --batch " + batch + " --out " + out);
}

TEST(ForwardCli, NaNWeightIsAnErrorNamingTheTensor) {
  TempDir tmp;
  const std::string model = checkpoint_with(tmp, "model.language_model.layers.1.post_attention_layernorm.weight",
                                            [](float* w, int64_t) { w[3] = std::nanf(""); });
  const CommandRun run = run_forward(model, golden_moe() + "/image_single/batch.h5", tmp / "out.h5");
  EXPECT_NE(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("q3vl forward: "), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("checkpoint " + model + ": tensor model.language_model.layers.1.post_attention_layernorm"
                            ".weight holds nan at element 3"),
            std::string::npos)
      << run.output;
  EXPECT_EQ(run.output.find("\"loss\":-nan"), std::string::npos) << run.output;
}

TEST(ForwardCli, NaNPixelIsAnErrorNamingIt) {
  TempDir tmp;
  io::HostBatch batch = io::read_hdf5_batch(golden_moe() + "/image_single/batch.h5");
  ASSERT_FALSE(batch.pixel_values.empty());
  batch.pixel_values[7] = std::nanf("");
  io::write_hdf5_batch(tmp / "batch.h5", batch);
  const CommandRun run = run_forward(golden_moe(), tmp / "batch.h5", tmp / "out.h5");
  EXPECT_NE(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("dataset 'pixel_values' has value nan at [0,7], expected a finite number"),
            std::string::npos)
      << run.output;
}

// Finite weights whose logits overflow: the loss comes out non-finite; the event line stays JSON (null) and the
// command fails naming the loss.
TEST(ForwardCli, NonFiniteLossIsJsonNullAndAnError) {
  TempDir tmp;
  const std::string model = checkpoint_with(tmp, "lm_head.weight", [](float* w, int64_t n) {
    for (int64_t i = 0; i < n; ++i) w[i] = (i % 2 ? -1.0f : 1.0f) * std::numeric_limits<float>::max();
  });
  const CommandRun run = run_forward(model, golden_moe() + "/image_single/batch.h5", tmp / "out.h5");
  EXPECT_NE(run.exit_code, 0) << run.output;
  const size_t at = run.output.find("{\"event\":\"forward\"");
  ASSERT_NE(at, std::string::npos) << run.output;
  const nlohmann::json event = nlohmann::json::parse(run.output.substr(at, run.output.find('\n', at) - at));
  EXPECT_TRUE(event.at("loss").is_null()) << run.output;
  EXPECT_NE(run.output.find("is not finite (an overflow in the forward; written as null)"), std::string::npos)
      << run.output;
}

}  // namespace
}  // namespace q3vl::test
