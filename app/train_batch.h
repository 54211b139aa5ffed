// One loader batch (packed sequences, items in sequence order) as the model's Batch: tokens and labels as
// one row of i64, cu_seqlens per document, images and videos split into the model's two pixel/grid lists
// (each keeps its order of appearance, which is the order their pad tokens are filled); planned for the
// model on construction (batch_plan.h), so that a bad batch fails before any computation.
#pragma once

#include <cstdint>
#include <vector>

#include "core/model/model.h"
#include "io/loader.h"

namespace q3vl::app {

class TrainBatch {
 public:
  TrainBatch(const io::Batch& source, const ModelConfig& config, DType dtype);
  TrainBatch(const TrainBatch&) = delete;
  TrainBatch& operator=(const TrainBatch&) = delete;

  const Batch& batch() const { return batch_; }
  const BatchPlan& plan() const { return plan_; }
  const BatchShape& shape() const { return plan_.shape; }
  int64_t tokens() const { return static_cast<int64_t>(ids_.size()); }
  // Positions whose next label (inside the same document) is trained: the model's ce_tokens.
  int64_t target_tokens() const { return plan_.target_count; }
  int64_t images() const { return static_cast<int64_t>(image_grid_.size() / 3); }
  int64_t videos() const { return static_cast<int64_t>(video_grid_.size() / 3); }
  int64_t patches() const;
  // Document token counts and item patch counts (the FLOP model's inputs).
  const std::vector<int64_t>& document_tokens() const { return document_tokens_; }
  const std::vector<int64_t>& item_patches() const { return item_patches_; }

 private:
  std::vector<int64_t> ids_, labels_, cu_, image_grid_, video_grid_;
  std::vector<float> image_pixels_, video_pixels_;
  std::vector<int64_t> document_tokens_, item_patches_;
  Batch batch_;
  BatchPlan plan_;
};

// True when every dimension of `shape` is within `capacity`.
bool batch_fits(const BatchShape& shape, const BatchShape& capacity);
// The elementwise maximum of two shapes (a workspace that holds both).
BatchShape batch_shape_max(const BatchShape& a, const BatchShape& b);

}  // namespace q3vl::app
