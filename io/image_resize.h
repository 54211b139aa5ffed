// Qwen-VL resizing: smart_resize (the target size, a multiple of `factor` per side, within a pixel budget;
// for videos the budget covers all frames) and PIL's bicubic resampler, bit-exact with Pillow's
// Image.resize(..., BICUBIC): separable convolution with the a = -0.5 cubic, support widened by the scale
// when shrinking (antialiasing), 22-bit fixed-point coefficients, two passes through an 8-bit intermediate
// in Pillow 13's order (horizontal first unless the height shrinks much more than the width).
#pragma once

#include <cstdint>
#include <utility>

#include "io/image.h"

namespace q3vl::io {

// transformers' Qwen2-VL smart_resize: (height, width) rounded to multiples of `factor`, scaled down with
// floor when the area exceeds max_pixels, scaled up with ceil when below min_pixels. Throws when the aspect
// ratio exceeds 200.
std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels,
                                         int64_t max_pixels);

// transformers' Qwen3-VL video smart_resize: as above but the budget is over num_frames * h * w (the frame
// count rounded to a multiple of temporal_factor), sides below `factor` are first scaled up to it, and
// num_frames must be at least temporal_factor.
std::pair<int64_t, int64_t> smart_resize_video(int64_t num_frames, int64_t height, int64_t width,
                                               int64_t temporal_factor, int64_t factor, int64_t min_pixels,
                                               int64_t max_pixels);

// Pillow's BICUBIC resize to height x width. Returns a copy when the size is unchanged.
Image resize_bicubic(const Image& image, int64_t height, int64_t width);

// Pixel budget of the Qwen-VL image processor (Qwen3-VL's preprocessor_config: patch 16, merge 2).
struct ImageSizeOptions {
  int64_t factor = 32;             // patch_size * merge_size
  int64_t min_pixels = 65536;      // size.shortest_edge
  int64_t max_pixels = 16777216;   // size.longest_edge
};

// smart_resize then resize_bicubic, as the processor does before rescaling and patchifying.
Image resize_for_model(const Image& image, const ImageSizeOptions& options = {});

}  // namespace q3vl::io
