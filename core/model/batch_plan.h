// A batch (the tensors of one forward) and its plan: one host pass that validates the whole batch (ids, masks,
// labels, grids, pixels, document boundaries) and computes everything that depends only on its metadata
// (documents, real-token mask, shifted targets, MRoPE position ids, the visual token rows, the vision tower's
// plan), so that Model::forward and backward only compute. A plan's tensors live in one host block it owns,
// which a device backend can upload whole.
//
// Usage:
//   const BatchPlan plan = plan_batch(model.config(), model.dtype(), batch);  // throws naming any bad input
//   Workspace ws(model, plan.shape);
//   model.forward(plan, batch, ws);  model.backward(plan, ws);  // batch and plan alive until the backward
#pragma once

#include <cstdint>
#include <memory>

#include "core/arena.h"
#include "core/model/config.h"
#include "core/model/vision_plan.h"
#include "core/tensor.h"

namespace q3vl {

struct Batch {
  Tensor input_ids;            // i64 [B, S]
  Tensor attention_mask;       // i64 [B, S] 0/1, right padding per document; undefined = all real
  Tensor labels;               // i64 [B, S] unshifted, -100 = ignored; undefined = no loss (ce_loss 0)
  Tensor pixel_values;         // [image patches, patch_features] of the model dtype, rows per image_grid_thw
  Tensor image_grid_thw;       // i64 [images, 3]
  Tensor pixel_values_videos;  // [video patches, patch_features]
  Tensor video_grid_thw;       // i64 [videos, 3]
  Tensor cu_seqlens;           // i64 [D + 1] packed documents over the B*S tokens; undefined = one per row
};

// The sizes a Workspace is built for; a batch fits when each field is at most the workspace's.
struct BatchShape {
  int64_t batch = 0, seq = 0;
  int64_t image_patches = 0, video_patches = 0;
  int64_t items = 0;   // images + videos
  int64_t frames = 0;  // sum of t over all items
  static BatchShape of(const Batch& batch);
  int64_t tokens() const { return batch * seq; }
  int64_t patches() const { return image_patches + video_patches; }
};

// The tensors are host tensors in `storage`; N = B*S tokens, D documents.
struct BatchPlan {
  BatchShape shape;
  DType dtype = DType::f32;  // the model dtype planned for (pixels, position-table weights)
  bool has_labels = false;   // the batch has labels (else the forward computes no cross-entropy)
  bool has_vision = false;   // the batch has images or videos (the vision tower runs)
  int64_t target_count = 0;  // targets that are not -100: the forward's ce_tokens
  Tensor cu_seqlens;         // i64 [D + 1] documents over the N tokens (a row each when the batch has none)
  Tensor doc_real;           // i64 [D] real tokens at the start of each document; the rest is padding
  Tensor valid;              // u8 [N] 1 = real token
  Tensor targets;            // i64 [N] the next label inside the same document, -100 where none
  Tensor positions;          // i64 [3, N] MRoPE position ids (T, H, W) of get_rope_index
  Tensor visual_rows;        // i64 [image tokens + video tokens] rows taking the merged visual features, in order
  VisionPlan vision;         // the vision tower's plan when has_vision
  std::unique_ptr<Arena> storage;
};

// Validates `batch` for a model of `config` and `dtype` and plans it; the errors name the offending tensor
// and element (as Model::forward, whose checks these are).
BatchPlan plan_batch(const ModelConfig& config, DType dtype, const Batch& batch);

}  // namespace q3vl
