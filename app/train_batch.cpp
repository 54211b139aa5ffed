// Loader batch -> model Batch (train_batch.h).
#include "app/train_batch.h"

#include <algorithm>

#include "core/check.h"

namespace q3vl::app {

namespace {

Tensor host_tensor(std::vector<int64_t>& v, Shape shape) { return Tensor(v.data(), DType::i64, shape); }

}  // namespace

TrainBatch::TrainBatch(const io::Batch& s, const ModelConfig& config, DType dtype) {
  const int64_t n = s.num_tokens();
  Q3VL_CHECK(n > 0, "train: empty batch");
  Q3VL_CHECK(s.labels.size() == s.tokens.size(), "train: batch has ", s.labels.size(), " labels for ", n, " tokens");
  Q3VL_CHECK(s.cu_seqlens.size() >= 2 && s.cu_seqlens.front() == 0 && s.cu_seqlens.back() == n,
             "train: batch document boundaries do not cover its ", n, " tokens");
  ids_.assign(s.tokens.begin(), s.tokens.end());
  labels_.assign(s.labels.begin(), s.labels.end());
  cu_.assign(s.cu_seqlens.begin(), s.cu_seqlens.end());
  for (size_t d = 0; d + 1 < cu_.size(); ++d) document_tokens_.push_back(cu_[d + 1] - cu_[d]);

  const size_t items = s.item_kind.size();
  Q3VL_CHECK(s.grid_thw.size() == 3 * items, "train: batch has ", s.grid_thw.size() / 3, " grids for ", items, " items");
  int64_t total_patches = 0;
  for (size_t k = 0; k < items; ++k) total_patches += int64_t{s.grid_thw[3 * k]} * s.grid_thw[3 * k + 1] * s.grid_thw[3 * k + 2];
  const int64_t features = total_patches > 0 ? static_cast<int64_t>(s.pixel_values.size()) / total_patches : 0;
  Q3VL_CHECK(features * total_patches == static_cast<int64_t>(s.pixel_values.size()), "train: batch has ",
             s.pixel_values.size(), " pixel values for ", total_patches, " patches");
  int64_t row = 0;
  for (size_t k = 0; k < items; ++k) {
    const int64_t p = int64_t{s.grid_thw[3 * k]} * s.grid_thw[3 * k + 1] * s.grid_thw[3 * k + 2];
    item_patches_.push_back(p);
    const bool video = s.item_kind[k] == 1;
    std::vector<int64_t>& grid = video ? video_grid_ : image_grid_;
    std::vector<float>& pixels = video ? video_pixels_ : image_pixels_;
    grid.insert(grid.end(), {s.grid_thw[3 * k], s.grid_thw[3 * k + 1], s.grid_thw[3 * k + 2]});
    pixels.insert(pixels.end(), s.pixel_values.begin() + row * features, s.pixel_values.begin() + (row + p) * features);
    row += p;
  }

  batch_.input_ids = host_tensor(ids_, {1, n});
  batch_.labels = host_tensor(labels_, {1, n});
  batch_.cu_seqlens = host_tensor(cu_, {static_cast<int64_t>(cu_.size())});
  if (!image_grid_.empty()) {
    batch_.image_grid_thw = host_tensor(image_grid_, {images(), 3});
    batch_.pixel_values =
        Tensor(image_pixels_.data(), DType::f32, {static_cast<int64_t>(image_pixels_.size()) / features, features});
  }
  if (!video_grid_.empty()) {
    batch_.video_grid_thw = host_tensor(video_grid_, {videos(), 3});
    batch_.pixel_values_videos =
        Tensor(video_pixels_.data(), DType::f32, {static_cast<int64_t>(video_pixels_.size()) / features, features});
  }
  plan_ = plan_batch(config, dtype, batch_);
}

int64_t TrainBatch::patches() const {
  int64_t total = 0;
  for (const int64_t p : item_patches_) total += p;
  return total;
}

bool batch_fits(const BatchShape& s, const BatchShape& c) {
  return s.batch <= c.batch && s.seq <= c.seq && s.image_patches <= c.image_patches &&
         s.video_patches <= c.video_patches && s.items <= c.items && s.frames <= c.frames;
}

BatchShape batch_shape_max(const BatchShape& a, const BatchShape& b) {
  BatchShape m;
  m.batch = std::max(a.batch, b.batch);
  m.seq = std::max(a.seq, b.seq);
  m.image_patches = std::max(a.image_patches, b.image_patches);
  m.video_patches = std::max(a.video_patches, b.video_patches);
  m.items = std::max(a.items, b.items);
  m.frames = std::max(a.frames, b.frames);
  return m;
}

}  // namespace q3vl::app
