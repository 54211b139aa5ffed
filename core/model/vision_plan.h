// The vision tower's per-batch metadata, computed on the host from the items' grids alone before the tower
// runs: the items' grids, the attention blocks (one per temporal patch of each item), the bilinear resampling
// plan of the position table (core/layers/vision.h vision_pos_embed_plan) and the patches' 2-D rotary
// coordinates. The tower (vision_tower.h) only computes from it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/arena.h"
#include "core/model/config.h"
#include "core/tensor.h"

namespace q3vl {

// Sizes of one vision batch.
struct VisionShape {
  int64_t patches = 0;  // rows of all pixel tensors
  int64_t items = 0;    // images + videos
  int64_t frames = 0;   // sum of t over items (attention blocks)
};

// Host tensors in the storage arena given to plan_vision; P = patches.
struct VisionPlan {
  Tensor grid;                      // i64 [items, 3] (t, h, w) in patches, images then videos
  Tensor cu_seqlens;                // i64 [frames + 1] patch offsets of the attention blocks
  Tensor pos_idx, pos_weight;       // i64 [P, 4] position-table rows and [P, 4] weights (model dtype, fp32 values)
  Tensor rotary_rows, rotary_cols;  // i64 [P] each patch's row and column in its item's patch grid
};

// Storage bytes plan_vision takes for a batch of `shape`.
size_t vision_plan_bytes(const VisionShape& shape, DType dtype);

// The plan of the items of image_grid then video_grid (i64 [n, 3] each, either undefined), every (t, h, w)
// positive with h and w multiples of spatial_merge_size; pos_weight in `dtype`. Carved from `storage`.
VisionPlan plan_vision(const VisionConfig& config, const Tensor& image_grid, const Tensor& video_grid, DType dtype,
                       Arena& storage);

// Rotary coordinates of every patch in the merge-block order of the pixel rows (HF get_vision_position_ids):
// rows[p], cols[p] i64 [P] written.
void vision_rotary_coordinates(const Tensor& grid, int64_t merge, const Tensor& rows, const Tensor& cols);

}  // namespace q3vl
