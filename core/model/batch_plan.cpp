// plan_batch: every check of a batch and its metadata-only computations (batch_plan.h).
#include "core/model/batch_plan.h"

#include <optional>

#include "core/arena_layout.h"
#include "core/checked_math.h"
#include "core/layer_checks.h"
#include "core/layers/cross_entropy.h"
#include "core/model/rope_index.h"

namespace q3vl {

namespace {

// The messages name Model::forward: these are its checks, and callers match them.
constexpr const char* kForward = "Model::forward";


// Merged tokens and frames of the items of one grid tensor (undefined: none).
struct GridTotals {
  int64_t items = 0, patches = 0, frames = 0;
};
GridTotals grid_totals(const char* what, const Tensor& grid) {
  GridTotals t;
  if (!grid.defined()) return t;
  require(kForward, what, grid, DType::i64, {-1, 3});
  const int64_t* g = grid.data<int64_t>();
  t.items = grid.size(0);
  for (int64_t i = 0; i < t.items; ++i) {
    Q3VL_CHECK(g[3 * i] > 0 && g[3 * i + 1] > 0 && g[3 * i + 2] > 0, kForward, ": ", what, "[", i, "] = (", g[3 * i],
               ", ", g[3 * i + 1], ", ", g[3 * i + 2], ") must be positive");
    const std::optional<int64_t> patches = checked_product({g[3 * i], g[3 * i + 1], g[3 * i + 2]});
    const std::optional<int64_t> sum = patches ? checked_sum(t.patches, *patches) : std::nullopt;
    Q3VL_CHECK(sum, kForward, ": ", what, "[", i, "] = (", g[3 * i], ", ", g[3 * i + 1], ", ", g[3 * i + 2],
               "): the patch count t*h*w (summed over items) overflows int64");
    t.patches = *sum;
    t.frames += g[3 * i];
  }
  return t;
}

void check_pixels(const ModelConfig& c, const char* pixels_name, const Tensor& pixels, const char* grid_name,
                  const Tensor& grid, DType dt) {
  Q3VL_CHECK(pixels.defined() == grid.defined(), kForward, ": ", pixels_name, " and ", grid_name,
             " must be given together");
  if (!pixels.defined()) return;
  const GridTotals t = grid_totals(grid_name, grid);
  require(kForward, pixels_name, pixels, dt, {t.patches, c.vision.patch_features()});
}

// Token ids inside the vocabulary, and the placeholder counts against the visual features (HF's message).
void check_tokens(const ModelConfig& c, const Batch& batch, const BatchShape& shape) {
  const int64_t n = shape.tokens(), S = shape.seq;
  const int64_t* ids = batch.input_ids.data<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    Q3VL_CHECK(ids[i] >= 0 && ids[i] < c.text.vocab_size, kForward, ": input_ids[", i / S, ", ", i % S, "] = ",
               ids[i], " outside the vocabulary of ", c.text.vocab_size);
  int64_t image_tokens = 0, video_tokens = 0;
  for (int64_t i = 0; i < n; ++i) {
    image_tokens += ids[i] == c.image_token_id;
    video_tokens += ids[i] == c.video_token_id;
  }
  const int64_t merge_unit = c.vision.merge_unit();
  if (batch.pixel_values.defined())
    Q3VL_CHECK(image_tokens == shape.image_patches / merge_unit, kForward,
               ": image features and image tokens do not match: ", image_tokens, " <|image_pad|> tokens (id ",
               c.image_token_id, "), ", shape.image_patches / merge_unit, " features from ",
               batch.image_grid_thw.size(0), " images");
  if (batch.pixel_values_videos.defined())
    Q3VL_CHECK(video_tokens == shape.video_patches / merge_unit, kForward,
               ": video features and video tokens do not match: ", video_tokens, " <|video_pad|> tokens (id ",
               c.video_token_id, "), ", shape.video_patches / merge_unit, " features from ",
               batch.video_grid_thw.size(0), " videos");
}

// Documents, the real-token mask and the real tokens per document.
void plan_documents(const Batch& batch, BatchPlan& plan) {
  const int64_t B = plan.shape.batch, S = plan.shape.seq, n = plan.shape.tokens();
  const int64_t docs = plan.cu_seqlens.size(0) - 1;
  if (batch.cu_seqlens.defined()) {
    copy(plan.cu_seqlens, batch.cu_seqlens);
  } else {
    for (int64_t b = 0; b <= B; ++b) plan.cu_seqlens.data<int64_t>()[b] = b * S;
  }
  const int64_t* cu = plan.cu_seqlens.data<int64_t>();
  uint8_t* valid = plan.valid.data<uint8_t>();
  const int64_t* mask = nullptr;
  if (batch.attention_mask.defined()) {
    check_attention_mask(batch.attention_mask, plan.cu_seqlens);
    mask = batch.attention_mask.data<int64_t>();
  }
  for (int64_t i = 0; i < n; ++i) valid[i] = mask ? static_cast<uint8_t>(mask[i]) : 1;
  for (int64_t d = 0; d < docs; ++d) {
    int64_t real = 0;
    for (int64_t i = cu[d]; i < cu[d + 1]; ++i) real += valid[i];
    plan.doc_real.data<int64_t>()[d] = real;
  }
}

// The labels checked and shifted into targets inside each document.
void plan_targets(const ModelConfig& c, const Batch& batch, BatchPlan& plan) {
  const int64_t S = plan.shape.seq, n = plan.shape.tokens(), docs = plan.cu_seqlens.size(0) - 1;
  const int64_t* cu = plan.cu_seqlens.data<int64_t>();
  int64_t* tg = plan.targets.data<int64_t>();
  const int64_t* lab = batch.labels.defined() ? batch.labels.data<int64_t>() : nullptr;
  const uint8_t* valid = plan.valid.data<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (lab != nullptr) {
      Q3VL_CHECK(valid[i] || lab[i] == kIgnoreIndex, kForward, ": labels[", i / S, ", ", i % S, "] = ", lab[i],
                 " at a padding position; padding must be labelled -100");
      Q3VL_CHECK(lab[i] == kIgnoreIndex || (lab[i] >= 0 && lab[i] < c.text.vocab_size), kForward, ": labels[",
                 i / S, ", ", i % S, "] = ", lab[i], " is neither -100 nor inside the vocabulary");
    }
    tg[i] = (lab != nullptr && i + 1 < n) ? lab[i + 1] : kIgnoreIndex;
  }
  // A position predicts the next label of its own document: the last token of a row or packed document
  // has no target (its successor starts another sample).
  for (int64_t d = 0; d < docs; ++d) tg[cu[d + 1] - 1] = kIgnoreIndex;
  for (int64_t i = 0; i < n; ++i) plan.target_count += tg[i] != kIgnoreIndex;
}

// The token rows of the visual features: the <|image_pad|> rows, then the <|video_pad|> rows.
void plan_visual_rows(const ModelConfig& c, const Batch& batch, BatchPlan& plan) {
  const int64_t n = plan.shape.tokens();
  const int64_t* ids = batch.input_ids.data<int64_t>();
  int64_t* rows = plan.visual_rows.data<int64_t>();
  int64_t next_image = 0, next_video = plan.shape.image_patches / c.vision.merge_unit();
  for (int64_t i = 0; i < n; ++i) {
    if (batch.pixel_values.defined() && ids[i] == c.image_token_id) rows[next_image++] = i;
    if (batch.pixel_values_videos.defined() && ids[i] == c.video_token_id) rows[next_video++] = i;
  }
}

}  // namespace

BatchShape BatchShape::of(const Batch& b) {
  require("BatchShape::of", "input_ids", b.input_ids, DType::i64, {-1, -1});
  BatchShape s;
  s.batch = b.input_ids.size(0);
  s.seq = b.input_ids.size(1);
  const GridTotals img = grid_totals("image_grid_thw", b.image_grid_thw);
  const GridTotals vid = grid_totals("video_grid_thw", b.video_grid_thw);
  s.image_patches = img.patches;
  s.video_patches = vid.patches;
  s.items = img.items + vid.items;
  s.frames = img.frames + vid.frames;
  return s;
}

BatchPlan plan_batch(const ModelConfig& c, DType dt, const Batch& batch) {
  require(kForward, "input_ids", batch.input_ids, DType::i64, {-1, -1});
  const int64_t B = batch.input_ids.size(0), S = batch.input_ids.size(1), n = B * S;
  Q3VL_CHECK(B > 0 && S > 0, kForward, ": input_ids is empty ", batch.input_ids.str());
  if (batch.attention_mask.defined()) require(kForward, "attention_mask", batch.attention_mask, DType::i64, {B, S});
  if (batch.labels.defined()) require(kForward, "labels", batch.labels, DType::i64, {B, S});
  check_pixels(c, "pixel_values", batch.pixel_values, "image_grid_thw", batch.image_grid_thw, dt);
  check_pixels(c, "pixel_values_videos", batch.pixel_values_videos, "video_grid_thw", batch.video_grid_thw, dt);
  BatchPlan plan;
  plan.shape = BatchShape::of(batch);
  plan.dtype = dt;
  plan.has_labels = batch.labels.defined();
  plan.has_vision = batch.pixel_values.defined() || batch.pixel_values_videos.defined();
  check_tokens(c, batch, plan.shape);
  int64_t docs = B;
  if (batch.cu_seqlens.defined()) {
    check_document_boundaries(batch.cu_seqlens, B, S);
    docs = batch.cu_seqlens.size(0) - 1;
  }

  const int64_t visual = plan.shape.patches() / c.vision.merge_unit();
  const VisionShape vision{plan.shape.patches(), plan.shape.items, plan.shape.frames};
  plan.storage = std::make_unique<Arena>(
      "batch plan", arena_bytes(docs + 1, DType::i64) + arena_bytes(docs, DType::i64) + arena_bytes(n, DType::u8) +
                        arena_bytes(n, DType::i64) + arena_bytes(3 * n, DType::i64) + arena_bytes(visual, DType::i64) +
                        (plan.has_vision ? vision_plan_bytes(vision, dt) : 0));
  Arena& storage = *plan.storage;
  plan.cu_seqlens = Tensor::empty(storage, {docs + 1}, DType::i64);
  plan.doc_real = Tensor::empty(storage, {docs}, DType::i64);
  plan.valid = Tensor::empty(storage, {n}, DType::u8);
  plan.targets = Tensor::empty(storage, {n}, DType::i64);
  plan.positions = Tensor::empty(storage, {3, n}, DType::i64);
  plan.visual_rows = Tensor::empty(storage, {visual}, DType::i64);
  plan_documents(batch, plan);
  plan_targets(c, batch, plan);
  get_rope_index(c, batch.input_ids, batch.attention_mask, batch.image_grid_thw, batch.video_grid_thw,
                 batch.cu_seqlens, plan.positions);
  if (plan.has_vision) {
    plan_visual_rows(c, batch, plan);
    plan.vision = plan_vision(c.vision, batch.image_grid_thw, batch.video_grid_thw, dt, storage);
  }
  return plan;
}

}  // namespace q3vl
