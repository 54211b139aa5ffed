// Tiny Qwen3-VL(-MoE) configurations and batches for the model tests: every feature of the real model
// (dense and MoE layers, GQA, MRoPE sections, vision blocks, two DeepStack taps, images, videos with two
// temporal patches, padding) at sizes where a whole f64 forward takes about a millisecond.
#pragma once

#include <cstdint>
#include <vector>

#include "core/arena.h"
#include "core/model/model.h"
#include "core/rng.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {

// Special token ids of the tiny vocabulary (64 tokens).
constexpr int64_t kImagePad = 60, kVideoPad = 61, kVisionStart = 62, kVisionEnd = 63;

inline ModelConfig tiny_config(bool moe = true) {
  ModelConfig c;
  c.model_type = moe ? "qwen3_vl_moe" : "qwen3_vl";
  TextConfig& t = c.text;
  t.vocab_size = 64;
  t.hidden_size = 32;
  t.intermediate_size = 40;
  t.num_hidden_layers = 3;
  t.num_attention_heads = 4;
  t.num_key_value_heads = 2;
  t.head_dim = 8;
  t.mrope_section = {2, 1, 1};
  t.rope_theta = 10000.0;
  t.num_experts = moe ? 4 : 0;
  t.num_experts_per_tok = moe ? 2 : 0;
  t.moe_intermediate_size = moe ? 12 : 0;
  t.mlp_only_layers = {0};          // layer 0 dense, layers 1-2 MoE
  t.router_aux_loss_coef = 0.1;     // large enough that the aux gradient is visible in FD checks
  VisionConfig& v = c.vision;
  v.depth = 3;
  v.hidden_size = 16;
  v.intermediate_size = 24;
  v.num_heads = 2;
  v.patch_size = 2;
  v.temporal_patch_size = 2;
  v.spatial_merge_size = 2;
  v.in_channels = 3;
  v.out_hidden_size = 32;
  v.num_position_embeddings = 16;
  v.deepstack_visual_indexes = {0, 2};
  c.image_token_id = kImagePad;
  c.video_token_id = kVideoPad;
  c.vision_start_token_id = kVisionStart;
  c.vision_end_token_id = kVisionEnd;
  c.tie_word_embeddings = false;
  return c;
}

// Weights with O(1) signals for gradient checks: matrices, embeddings and experts normal(0, scale), norm
// weights 1 + 0.2 * normal, biases 0.2 * normal (HF's init would make most gradients tiny).
inline void fill_test_weights(Model& model, uint64_t seed, double scale = 0.4) {
  ParamStore& w = model.weights();
  for (size_t i = 0; i < w.size(); ++i) {
    const Philox rng(seed, i);
    switch (w.specs()[i].kind) {
      case ParamKind::norm: fill_normal(w.tensor(i), rng, 1.0, 0.2); break;
      case ParamKind::bias: fill_normal(w.tensor(i), rng, 0.0, 0.2); break;
      default: fill_normal(w.tensor(i), rng, 0.0, scale); break;
    }
  }
}

// Owns the tensors of a Batch.
struct TestBatch {
  std::vector<int64_t> ids, mask, labels, image_grid, video_grid, cu;
  std::vector<double> image_px, video_px;
  std::vector<float> image_px32, video_px32;
  int64_t rows = 0, seq = 0;
  Batch view(DType dtype);
};

inline Batch TestBatch::view(DType dtype) {
  Batch b;
  b.input_ids = Tensor(ids.data(), DType::i64, {rows, seq});
  if (!mask.empty()) b.attention_mask = Tensor(mask.data(), DType::i64, {rows, seq});
  if (!labels.empty()) b.labels = Tensor(labels.data(), DType::i64, {rows, seq});
  if (!cu.empty()) b.cu_seqlens = Tensor(cu.data(), DType::i64, {static_cast<int64_t>(cu.size())});
  const int64_t f = 24;  // tiny patch features: 3 * 2 * 2 * 2
  auto pixels = [&](std::vector<double>& px64, std::vector<float>& px32) {
    const int64_t rows_px = static_cast<int64_t>(px64.size()) / f;
    if (dtype == DType::f64) return Tensor(px64.data(), DType::f64, {rows_px, f});
    px32.assign(px64.begin(), px64.end());
    return Tensor(px32.data(), DType::f32, {rows_px, f});
  };
  if (!image_grid.empty()) {
    b.image_grid_thw = Tensor(image_grid.data(), DType::i64, {static_cast<int64_t>(image_grid.size()) / 3, 3});
    b.pixel_values = pixels(image_px, image_px32);
  }
  if (!video_grid.empty()) {
    b.video_grid_thw = Tensor(video_grid.data(), DType::i64, {static_cast<int64_t>(video_grid.size()) / 3, 3});
    b.pixel_values_videos = pixels(video_px, video_px32);
  }
  return b;
}

inline std::vector<double> random_pixels(int64_t rows, uint64_t seed) {
  std::vector<double> v(rows * 24);
  const Philox rng(seed);
  for (size_t i = 0; i < v.size(); ++i) v[i] = rng.uniform(i) * 2 - 1;
  return v;
}

// Labels = the ids, with -100 at padding and at visual placeholder tokens.
inline std::vector<int64_t> labels_for(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask) {
  std::vector<int64_t> l(ids);
  for (size_t i = 0; i < l.size(); ++i)
    if ((!mask.empty() && mask[i] == 0) || l[i] == kImagePad || l[i] == kVideoPad) l[i] = -100;
  return l;
}

// Two rows of 18 tokens: row 0 text + one 4x4-patch image (4 merged tokens) + text; row 1 text + a video of
// two temporal patches of 4x4 (each frame its own span, separated by a timestamp token) + text + 3 padding.
inline TestBatch image_video_batch() {
  TestBatch b;
  b.rows = 2;
  b.seq = 18;
  const int64_t I = kImagePad, V = kVideoPad, S = kVisionStart, E = kVisionEnd;
  b.ids = {1, S, I, I, I, I, E, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25,
           2, S, V, V, V, V, E, 4, S, V, V, V, V, E, 8, 0, 0, 0};
  b.mask = std::vector<int64_t>(36, 1);
  for (int i = 33; i < 36; ++i) b.mask[i] = 0;
  b.labels = labels_for(b.ids, b.mask);
  b.image_grid = {1, 4, 4};
  b.video_grid = {2, 4, 4};
  b.image_px = random_pixels(16, 901);
  b.video_px = random_pixels(32, 902);
  return b;
}

}  // namespace q3vl::test
