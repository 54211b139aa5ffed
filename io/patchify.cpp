// Rescale, normalise and reorder RGB8 frames into Qwen-VL patch rows.
#include "io/patchify.h"

#include "core/check.h"
#include "core/layer_checks.h"

namespace q3vl::io {

PatchGrid patch_grid(int64_t frames, int64_t height, int64_t width, const PatchOptions& o) {
  Q3VL_CHECK(o.patch_size > 0 && o.temporal_patch_size > 0 && o.merge_size > 0, "patchify: patch_size ",
             o.patch_size, ", temporal_patch_size ", o.temporal_patch_size, " and merge_size ", o.merge_size,
             " must be positive");
  Q3VL_CHECK(frames > 0, "patchify: no frames");
  const int64_t block = o.patch_size * o.merge_size;
  Q3VL_CHECK(height > 0 && width > 0 && height % block == 0 && width % block == 0, "patchify: frame size ", height,
             "x", width, " is not a positive multiple of patch_size * merge_size = ", block);
  const int64_t t = (frames + o.temporal_patch_size - 1) / o.temporal_patch_size;
  return {t, height / o.patch_size, width / o.patch_size};
}

int64_t patch_features(const PatchOptions& o) { return 3 * o.temporal_patch_size * o.patch_size * o.patch_size; }

PatchGrid patchify_into(std::span<const Image> frames, const PatchOptions& o, const Tensor& out) {
  Q3VL_CHECK(!frames.empty(), "patchify: no frames");
  const int64_t height = frames[0].height, width = frames[0].width;
  for (size_t i = 0; i < frames.size(); ++i) {
    Q3VL_CHECK(frames[i].height == height && frames[i].width == width, "patchify: frame ", i, " is ",
               frames[i].height, "x", frames[i].width, ", frame 0 is ", height, "x", width);
    Q3VL_CHECK(static_cast<int64_t>(frames[i].pixels.size()) == height * width * 3, "patchify: frame ", i,
               " holds ", frames[i].pixels.size(), " bytes, expected ", height * width * 3);
  }
  const PatchGrid grid = patch_grid(static_cast<int64_t>(frames.size()), height, width, o);
  const int64_t features = patch_features(o);
  require("patchify", "out", out, DType::f32, {grid.patches(), features});

  // Per channel, the 256 possible outputs, computed with transformers' operations in its order.
  float table[3][256];
  for (int c = 0; c < 3; ++c) {
    const float mean255 = o.mean[c] * 255.0f, std255 = o.std[c] * 255.0f;
    for (int v = 0; v < 256; ++v) {
      if (o.fused_rescale) {
        table[c][v] = (static_cast<float>(v) - mean255) / std255;
      } else {
        const float rescaled = static_cast<float>(static_cast<double>(v) * (1.0 / 255.0));
        table[c][v] = (rescaled - o.mean[c]) / o.std[c];
      }
    }
  }

  const int64_t p = o.patch_size, m = o.merge_size, tp = o.temporal_patch_size;
  const int64_t blocks_w = grid.w / m, blocks_h = grid.h / m;
  const int64_t last_frame = static_cast<int64_t>(frames.size()) - 1;
  float* dst = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < grid.patches(); ++row) {
    // row = ((t * blocks_h + bh) * blocks_w + bw) * m * m + ih * m + iw
    const int64_t iw = row % m, ih = (row / m) % m;
    const int64_t block = row / (m * m);
    const int64_t bw = block % blocks_w, bh = (block / blocks_w) % blocks_h, t = block / (blocks_w * blocks_h);
    const int64_t y0 = (bh * m + ih) * p, x0 = (bw * m + iw) * p;
    float* f = dst + row * features;
    for (int64_t c = 0; c < 3; ++c) {
      for (int64_t dt = 0; dt < tp; ++dt) {
        const Image& frame = frames[std::min(t * tp + dt, last_frame)];
        for (int64_t y = 0; y < p; ++y) {
          const uint8_t* px = frame.row(y0 + y) + x0 * 3 + c;
          for (int64_t x = 0; x < p; ++x) *f++ = table[c][px[x * 3]];
        }
      }
    }
  }
  return grid;
}

Patches patchify(std::span<const Image> frames, const PatchOptions& o) {
  Q3VL_CHECK(!frames.empty(), "patchify: no frames");
  const PatchGrid grid = patch_grid(static_cast<int64_t>(frames.size()), frames[0].height, frames[0].width, o);
  Patches result;
  result.grid = grid;
  result.values.resize(static_cast<size_t>(grid.patches() * patch_features(o)));
  patchify_into(frames, o, Tensor(result.values.data(), DType::f32, {grid.patches(), patch_features(o)}));
  return result;
}

}  // namespace q3vl::io
