// plan_vision: the vision tower's grids, attention blocks, position-table resampling plan and rotary
// coordinates of one batch.
#include "core/model/vision_plan.h"

#include <optional>

#include "core/arena_layout.h"
#include "core/checked_math.h"
#include "core/layer_checks.h"
#include "core/layers/vision.h"

namespace q3vl {

namespace {

// Patches of one grid tensor (undefined: none), each item checked.
int64_t check_grid(const char* L, const char* what, const VisionConfig& c, const Tensor& grid) {
  if (!grid.defined()) return 0;
  require(L, what, grid, DType::i64, {-1, 3});
  const int64_t* g = grid.data<int64_t>();
  int64_t patches = 0;
  for (int64_t i = 0; i < grid.size(0); ++i) {
    Q3VL_CHECK(g[3 * i] > 0 && g[3 * i + 1] > 0 && g[3 * i + 2] > 0 && g[3 * i + 1] % c.spatial_merge_size == 0 &&
                   g[3 * i + 2] % c.spatial_merge_size == 0,
               L, ": ", what, "[", i, "] = (", g[3 * i], ", ", g[3 * i + 1], ", ", g[3 * i + 2],
               ") must be positive with h and w multiples of spatial_merge_size ", c.spatial_merge_size);
    const std::optional<int64_t> item = checked_product({g[3 * i], g[3 * i + 1], g[3 * i + 2]});
    const std::optional<int64_t> sum = item ? checked_sum(patches, *item) : std::nullopt;
    Q3VL_CHECK(sum, L, ": ", what, "[", i, "] = (", g[3 * i], ", ", g[3 * i + 1], ", ", g[3 * i + 2],
               "): the patch count t*h*w (summed over items) overflows int64");
    patches = *sum;
  }
  return patches;
}

int64_t items_of(const Tensor& grid) { return grid.defined() ? grid.size(0) : 0; }

}  // namespace

size_t vision_plan_bytes(const VisionShape& s, DType dt) {
  return arena_bytes(3 * s.items, DType::i64) + arena_bytes(s.frames + 1, DType::i64) + arena_bytes(4 * s.patches, DType::i64) +
         arena_bytes(4 * s.patches, dt) + 2 * arena_bytes(s.patches, DType::i64);
}

VisionPlan plan_vision(const VisionConfig& c, const Tensor& image_grid, const Tensor& video_grid, DType dt,
                       Arena& storage) {
  const char* L = "plan_vision";
  const int64_t image_patches = check_grid(L, "image_grid", c, image_grid);
  const std::optional<int64_t> patches = checked_sum(image_patches, check_grid(L, "video_grid", c, video_grid));
  Q3VL_CHECK(patches, L, ": the patch count of all items overflows int64");
  const int64_t images = items_of(image_grid), items = images + items_of(video_grid);
  VisionPlan plan;
  plan.grid = Tensor::empty(storage, {items, 3}, DType::i64);
  if (images > 0) copy(plan.grid.narrow(0, 0, images), image_grid);
  if (items > images) copy(plan.grid.narrow(0, images, items - images), video_grid);
  const int64_t* g = plan.grid.data<int64_t>();
  int64_t frames = 0;
  for (int64_t i = 0; i < items; ++i) frames += g[3 * i];
  plan.cu_seqlens = Tensor::empty(storage, {frames + 1}, DType::i64);
  int64_t* cu = plan.cu_seqlens.data<int64_t>();
  int64_t f = 0;
  cu[0] = 0;
  for (int64_t i = 0; i < items; ++i)
    for (int64_t t = 0; t < g[3 * i]; ++t, ++f) cu[f + 1] = cu[f] + g[3 * i + 1] * g[3 * i + 2];

  plan.pos_idx = Tensor::empty(storage, {*patches, 4}, DType::i64);
  plan.pos_weight = Tensor::empty(storage, {*patches, 4}, dt);
  vision_pos_embed_plan(plan.grid, c.num_grid_per_side(), c.spatial_merge_size, plan.pos_idx, plan.pos_weight);
  plan.rotary_rows = Tensor::empty(storage, {*patches}, DType::i64);
  plan.rotary_cols = Tensor::empty(storage, {*patches}, DType::i64);
  vision_rotary_coordinates(plan.grid, c.spatial_merge_size, plan.rotary_rows, plan.rotary_cols);
  return plan;
}

void vision_rotary_coordinates(const Tensor& grid, int64_t merge, const Tensor& rows, const Tensor& cols) {
  const char* L = "vision_rotary_coordinates";
  require(L, "grid", grid, DType::i64, {-1, 3});
  require(L, "rows", rows, DType::i64, {-1});
  require(L, "cols", cols, DType::i64, {rows.size(0)});
  const int64_t* g = grid.data<int64_t>();
  int64_t patches = 0;
  for (int64_t i = 0; i < grid.size(0); ++i) patches += g[3 * i] * g[3 * i + 1] * g[3 * i + 2];
  Q3VL_CHECK(patches == rows.size(0), L, ": grid has ", patches, " patches, rows has ", rows.size(0));
  int64_t *rp = rows.data<int64_t>(), *cp = cols.data<int64_t>();
  // Pixel-row order: per item, per t, merge blocks row-major, patches row-major inside a block.
  int64_t p = 0;
  for (int64_t i = 0; i < grid.size(0); ++i) {
    const int64_t t = g[3 * i], h = g[3 * i + 1], w = g[3 * i + 2];
    for (int64_t tt = 0; tt < t; ++tt)
      for (int64_t br = 0; br < h / merge; ++br)
        for (int64_t bc = 0; bc < w / merge; ++bc)
          for (int64_t ir = 0; ir < merge; ++ir)
            for (int64_t ic = 0; ic < merge; ++ic, ++p) {
              rp[p] = br * merge + ir;
              cp[p] = bc * merge + ic;
            }
  }
}

}  // namespace q3vl
