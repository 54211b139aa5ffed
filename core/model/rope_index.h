// Token layout of a batch for the text decoder: documents (cu_seqlens over the flattened tokens), the
// real-token mask, and the 3-row (T, H, W) MRoPE position ids of HF's Qwen3-VL get_rope_index.
//
// Positions follow HF Qwen3VLMoeModel.get_rope_index / compute_3d_position_ids (transformers 5.x) within
// each document (a row of a padded [B, S] batch is one document):
// - without any image or video grid in the batch HF builds no 3-D positions and the text model uses
//   arange(S) on all three rows, for padding too;
// - otherwise, over the real tokens (attention_mask = 1) only: maximal runs of text tokens get
//   arange on all three rows continuing from the running position; each maximal run of <|image_pad|>
//   (or <|video_pad|>) tokens is one visual span that takes the next image grid (or the next video frame:
//   HF splits every video (t, h, w) into t grids (1, h, w)) in batch order, with merged grid
//   (h', w') = (h, w) / spatial_merge_size and start s: T = s, H = s + row, W = s + col in row-major
//   order, and the running position continues at s + max(h', w'). Padding tokens get 0.
// Unlike HF, a span whose length differs from its grid's token count, or grids left unused, are errors.
#pragma once

#include <cstdint>

#include "core/model/config.h"
#include "core/tensor.h"

namespace q3vl {

// input_ids i64 [B, S]; attention_mask i64 [B, S] of 0/1 or undefined (all real); image_grid_thw /
// video_grid_thw i64 [n, 3] or undefined; cu_seqlens i64 [D + 1] over the B*S flattened tokens (documents,
// each inside one row) or undefined for one document per row. positions i64 [3, B*S] is written.
void get_rope_index(const ModelConfig& config, const Tensor& input_ids, const Tensor& attention_mask,
                    const Tensor& image_grid_thw, const Tensor& video_grid_thw, const Tensor& cu_seqlens,
                    const Tensor& positions);

// Checks document boundaries: i64 [D + 1], 0 = c0 < c1 < ... < cD = B*S, and every row start b*S is a
// boundary (a document never spans two rows). Throws naming the first violation.
void check_document_boundaries(const Tensor& cu_seqlens, int64_t batch, int64_t seq);

// Checks the attention mask is 0/1 with right padding inside every document (real tokens first, then
// padding) and at least one real token per document.
void check_attention_mask(const Tensor& attention_mask, const Tensor& cu_seqlens);

}  // namespace q3vl
