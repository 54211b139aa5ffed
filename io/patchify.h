// Patchify: resized RGB8 frames -> the vision tower's pixel_values, as Qwen2-VL's image processor and
// Qwen3-VL's video processor build them, matching transformers' numerics bit for bit: the (PIL) image
// processor rescales (x * 1/255 in double, rounded to float) then normalises ((x - mean) / std in float); the
// (torch) video processor fuses both into (x - mean * 255) / (std * 255) in float (`fused_rescale`). The frame count is
// padded to a multiple of temporal_patch by repeating the last frame (an image, one frame, becomes T = 2).
// Rows are ordered (t, block_row, block_col, row_in_block, col_in_block) with merge x merge blocks; the
// C * T * P * P features of a row are ordered (channel, frame, y, x).
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "core/tensor.h"
#include "io/image.h"

namespace q3vl::io {

struct PatchOptions {
  int64_t patch_size = 16;
  int64_t temporal_patch_size = 2;
  int64_t merge_size = 2;
  std::array<float, 3> mean = {0.5f, 0.5f, 0.5f};
  std::array<float, 3> std = {0.5f, 0.5f, 0.5f};
  bool fused_rescale = false;  // true for videos (Qwen3VLVideoProcessor), false for images
};

struct PatchGrid {
  int64_t t = 0, h = 0, w = 0;  // grid_thw: temporal patches, patch rows, patch columns

  int64_t patches() const { return t * h * w; }
  // LLM tokens after the merger: one per merge x merge block.
  int64_t tokens(int64_t merge_size) const { return patches() / (merge_size * merge_size); }
};

// The grid for `frames` frames of height x width; the sides must be multiples of patch_size * merge_size.
PatchGrid patch_grid(int64_t frames, int64_t height, int64_t width, const PatchOptions& options = {});
// Features per patch row: 3 * temporal_patch_size * patch_size^2 (1536 for Qwen3-VL).
int64_t patch_features(const PatchOptions& options = {});

// Writes the patches of `frames` (all the same size) into `out`, a contiguous host f32 tensor of shape
// [grid.patches(), patch_features()], and returns the grid.
PatchGrid patchify_into(std::span<const Image> frames, const PatchOptions& options, const Tensor& out);

struct Patches {
  std::vector<float> values;  // grid.patches() x patch_features(), row-major
  PatchGrid grid;
};

Patches patchify(std::span<const Image> frames, const PatchOptions& options = {});

}  // namespace q3vl::io
