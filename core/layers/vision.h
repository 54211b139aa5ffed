// Vision-tower pieces around the transformer blocks of Qwen3-VL: the patch embedding (a Conv3d whose
// kernel equals its stride, hence a Linear over flattened patches), the learned position embedding
// resampled bilinearly to each item's patch grid, and the patch merger that turns each 2x2 block of
// patches into one text-width token (final merger and DeepStack mergers), optionally tensor-parallel.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/arena.h"
#include "core/layers/tensor_parallel.h"
#include "core/tensor.h"

namespace q3vl {

// ---- Patch embedding ----

// Patch size of the Conv3d; a flattened patch has in_channels * temporal_patch * patch * patch features
// in (C, T, Ph, Pw) order (1536 for Qwen3-VL).
struct PatchEmbedGeometry {
  int64_t in_channels = 3;
  int64_t temporal_patch = 2;
  int64_t patch = 16;
  int64_t features() const { return in_channels * temporal_patch * patch * patch; }
};

// pixels [N, F] with F = geometry.features(); w is the conv weight [D, C, T, P, P] as stored in the
// checkpoint or the same memory flattened to [D, F]; b [D]; y [N, D] written.
void patch_embed_forward(const PatchEmbedGeometry& geometry, const Tensor& pixels, const Tensor& w, const Tensor& b,
                         const Tensor& y);
// dpixels [N, F] written when defined; dw (shaped like w) and db [D] accumulate.
void patch_embed_backward(const PatchEmbedGeometry& geometry, const Tensor& pixels, const Tensor& w, const Tensor& dy,
                          const Tensor& dpixels, const Tensor& dw, const Tensor& db);

// ---- Bilinearly resampled position embedding ----

// Patches of all items: sum over rows of grid_thw (i64 [n, 3] = (t, h, w) in patches) of t * h * w. Each
// of t, h, w must be positive.
int64_t vision_num_patches(const Tensor& grid_thw);

// For every patch, the four table rows and weights that bilinearly sample the G x G table (G =
// grid_side, rows indexed row * G + col) at the patch's position, as HF transformers 5.x
// get_vision_interpolation_indices_and_weights (align_corners=True) computes them in fp32: per axis src =
// index * (G-1) / max(size-1, 1), taps floor and min(floor + 1, G-1), axis weights 1 - d and 1 - |d - 1|
// (d = src - floor), each corner weight the fp32 product of its two axis weights; corners ordered
// (top-left, top-right, bottom-left, bottom-right). Patches come in the order of the pixel rows: per item,
// (t, block_row, block_col, row_in_block, col_in_block) with merge x merge blocks, the same grid repeated for
// every t. h and w must be multiples of merge. idx i64 [P, 4] and weight [P, 4] (f32, or f64 holding the same
// fp32 values) are written.
void vision_pos_embed_plan(const Tensor& grid_thw, int64_t grid_side, int64_t merge, const Tensor& idx,
                           const Tensor& weight);

// y[p] = sum_c weight[p, c] * table[idx[p, c]] summed in corner order c = 0..3 as HF does (the compiler
// may fuse products and sums into FMAs, so fp32 results can differ from torch's by an ulp).
// table [R, D] (R = G * G), idx i64 [P, 4] in [0, R), weight [P, 4], y [P, D] written.
void vision_pos_embed_forward(const Tensor& table, const Tensor& idx, const Tensor& weight, const Tensor& y);
// dtable[idx[p, c]] += weight[p, c] * dy[p], deterministically (each table element has one writer and
// sums its terms in patch order).
void vision_pos_embed_backward(const Tensor& idx, const Tensor& weight, const Tensor& dy, const Tensor& dtable);

// ---- Patch merger ----

// use_postshuffle_norm = false (final merger): LayerNorm(hidden) per patch, then view(-1, merged).
// use_postshuffle_norm = true (DeepStack mergers): view(-1, merged), then LayerNorm(merged).
// Both continue fc1 (merged -> merged, bias) -> GELU (exact erf) -> fc2 (merged -> out_hidden, bias),
// where merged = hidden * merge_unit and merge_unit = spatial_merge_size^2 consecutive patches.
struct PatchMergerConfig {
  int64_t hidden = 0;
  int64_t out_hidden = 0;
  int64_t merge_unit = 4;
  bool use_postshuffle_norm = false;
  double eps = 1e-6;
  int64_t merged() const { return hidden * merge_unit; }
  int64_t norm_dim() const { return use_postshuffle_norm ? merged() : hidden; }
};

// Parameters (and, with the same shapes, their gradients): norm_w/norm_b [norm_dim], fc1_w [merged,
// merged], fc1_b [merged], fc2_w [out_hidden, merged], fc2_b [out_hidden]. Under tensor parallelism over P
// ranks fc1 is column-parallel and fc2 row-parallel: fc1_w [merged / P, merged], fc1_b [merged / P], fc2_w
// [out_hidden, merged / P]; the norm and fc2_b are replicated.
struct PatchMergerWeights {
  Tensor norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b;
};

// What the backward needs besides x, carved from the forward's arena. M = N / merge_unit tokens;
// the LayerNorm runs over `norm_rows` = N (pre-shuffle) or M (post-shuffle) rows.
struct PatchMergerSaved {
  Tensor normed;   // [M, merged] LayerNorm output, the fc1 input
  Tensor mean;     // [norm_rows]
  Tensor rstd;     // [norm_rows]
  Tensor fc1_out;  // [M, merged / P] before the GELU (recomputed activation feeds fc2's weight gradient)
};

// Arena bytes the saved activations of N patches occupy after the forward returns (for the whole merger, an
// upper bound under tensor parallelism).
size_t patch_merger_saved_bytes(const PatchMergerConfig& config, int64_t num_patches, DType dtype);
// Extra arena bytes the forward or the backward borrows while running (released before returning; an upper
// bound under tensor parallelism).
size_t patch_merger_scratch_bytes(const PatchMergerConfig& config, int64_t num_patches, DType dtype);

// x [N, hidden] with N a multiple of merge_unit; y [N / merge_unit, out_hidden] written. With tp (null: the
// whole merger), w holds this rank's slices: fc2's partial output, its bias added by tp rank 0 only, is summed
// over the ranks, so y is whole and bitwise equal on every rank.
PatchMergerSaved patch_merger_forward(const PatchMergerConfig& config, const PatchMergerWeights& w, const Tensor& x,
                                      const Tensor& y, Arena& arena, TensorParallel* tp = nullptr);
// dx [N, hidden] written when defined; every tensor of grads accumulates. scratch lends temporary space. With
// tp, dy must be the same on every rank; the gradient of the LayerNorm output (partial after fc1's backward) is
// summed over the ranks, so dx and the replicated tensors' gradients come out equal on every rank, and the split
// ones are this rank's slices.
void patch_merger_backward(const PatchMergerConfig& config, const PatchMergerWeights& w, const Tensor& x,
                           const PatchMergerSaved& saved, const Tensor& dy, const Tensor& dx,
                           const PatchMergerWeights& grads, Arena& scratch, TensorParallel* tp = nullptr);

}  // namespace q3vl
