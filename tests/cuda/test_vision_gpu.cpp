// The vision tower's position embedding (bilinear gather and its deterministic scatter-add backward) and the
// whole patch merger (final and post-shuffle variants) on the CUDA device against the CPU reference, f32 and
// bf16, gradients accumulated into random starting values.
#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <vector>

#include "core/layers/vision.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct PosEmbedCase {
  int64_t grid_side, dim;
  std::vector<std::array<int64_t, 3>> items;  // (t, h, w) in patches
};

// Table rows vs (patch, corner) entries: 9 < 16, 2304 > 96, 2304 < 8320 (both owner searches of the backward),
// and more columns than one block covers.
const PosEmbedCase kPosCases[] = {{3, 5, {{1, 2, 2}}},
                                  {7, 1, {{1, 2, 4}}},
                                  {48, 1152, {{1, 4, 6}}},
                                  {48, 1100, {{2, 28, 28}, {1, 16, 32}}}};

void check_pos_embed(const PosEmbedCase& c, DType dt, DType gdt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " grid_side=" + std::to_string(c.grid_side) +
               " dim=" + std::to_string(c.dim) + " " + std::string(dtype_name(dt)) + " grads " +
               std::string(dtype_name(gdt)));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  auto grad_values = [&](Tensor t) { return gdt == DType::bf16 ? rounded_to_bf16(t) : t; };
  const auto items = static_cast<int64_t>(c.items.size());
  Tensor grid = Tensor::empty(host_arena(), {items, 3}, DType::i64);
  std::memcpy(grid.raw(), c.items.data(), grid.nbytes());
  const int64_t patches = vision_num_patches(grid), rows = c.grid_side * c.grid_side;
  Tensor idx = Tensor::empty(host_arena(), {patches, 4}, DType::i64);
  Tensor weight = Tensor::empty(host_arena(), {patches, 4}, DType::f32);
  vision_pos_embed_plan(grid, c.grid_side, 2, idx, weight);
  const Tensor table = in_values(host_random({rows, c.dim}, seed, 1.0));
  const Tensor dy = in_values(host_random({patches, c.dim}, seed + 1, 1.0));
  Tensor y = Tensor::empty(host_arena(), {patches, c.dim}, DType::f32);
  vision_pos_embed_forward(table, idx, weight, y);
  Tensor dtable = grad_values(host_random({rows, c.dim}, seed + 2, 0.5));
  const Tensor dtable_d = to_device(dtable, gdt);
  vision_pos_embed_backward(idx, weight, dy, dtable);
  const double tol = bf ? kTolBf16 : kTolF32;

  // Device: weights f32 as the plan makes them.
  const Tensor idxd = to_device_raw(idx), wd = to_device(weight, DType::f32);
  const Tensor yd = poisoned({patches, c.dim}, dt);
  vision_pos_embed_forward(to_device(table, dt), idxd, wd, yd);
  expect_rel("y", yd, y, tol);
  vision_pos_embed_backward(idxd, wd, to_device(dy, dt), dtable_d);
  expect_rel("dtable", dtable_d, dtable, tol);
}

TEST(GpuVisionPosEmbed, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kPosCases) check_pos_embed(c, DType::f32, DType::f32);
}

TEST(GpuVisionPosEmbed, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kPosCases) {
    check_pos_embed(c, DType::bf16, DType::f32);
    check_pos_embed(c, DType::bf16, DType::bf16);
  }
}

TEST(GpuVisionPosEmbed, BadInputIsNamed) {
  Q3VL_REQUIRE_GPU();
  const Tensor table = to_device(host_random({9, 4}, 1), DType::bf16);
  Tensor idx = Tensor::empty(host_arena(), {2, 4}, DType::i64);
  std::memset(idx.raw(), 0, idx.nbytes());
  const Tensor idxd = to_device_raw(idx);
  expect_error([&] {
    vision_pos_embed_forward(table, idxd, to_device(host_random({2, 4}, 2), DType::f32), poisoned({2, 5}, DType::bf16));
  }, "vision_pos_embed_forward: y has shape [2,5], expected [2,4]");
  expect_error([&] { vision_pos_embed_forward(table, idx, host_random({2, 4}, 2), poisoned({2, 4}, DType::bf16)); },
               "vision_pos_embed_forward: idx i64[2,4] is in host memory");
  expect_error([&] {
    vision_pos_embed_backward(idxd, to_device(host_random({2, 4}, 2), DType::f32), poisoned({2, 4}, DType::f32),
                              poisoned({9, 4}, DType::bf16));
  }, "vision_pos_embed_backward: dtable has dtype bf16");
}

// ---- Patch merger ----

struct MergerCase {
  int64_t hidden, out_hidden, patches;
  bool postshuffle;
};

const MergerCase kMergerCases[] = {{8, 12, 12, false}, {8, 20, 8, true}, {72, 40, 36, false}, {72, 40, 4, true}};

PatchMergerWeights random_merger(const PatchMergerConfig& cfg, uint64_t seed, double scale, bool bf) {
  auto v = [&](Shape s, uint64_t k, double sc) {
    const Tensor t = host_random(s, seed + k, sc);
    return bf ? rounded_to_bf16(t) : t;
  };
  const int64_t k = cfg.merged();
  return {v({cfg.norm_dim()}, 0, scale), v({cfg.norm_dim()}, 1, scale), v({k, k}, 2, scale / 4),
          v({k}, 3, scale),              v({cfg.out_hidden, k}, 4, scale / 4), v({cfg.out_hidden}, 5, scale)};
}

PatchMergerWeights on_device(const PatchMergerWeights& w, DType dt) {
  return {to_device(w.norm_w, dt), to_device(w.norm_b, dt), to_device(w.fc1_w, dt),
          to_device(w.fc1_b, dt),  to_device(w.fc2_w, dt),  to_device(w.fc2_b, dt)};
}

void check_merger(const MergerCase& c, DType dt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " hidden=" + std::to_string(c.hidden) + " out=" +
               std::to_string(c.out_hidden) + " patches=" + std::to_string(c.patches) +
               (c.postshuffle ? " postshuffle " : " final ") + std::string(dtype_name(dt)));
  const bool bf = dt == DType::bf16;
  PatchMergerConfig cfg;
  cfg.hidden = c.hidden;
  cfg.out_hidden = c.out_hidden;
  cfg.use_postshuffle_norm = c.postshuffle;
  const int64_t tokens = c.patches / cfg.merge_unit;
  const PatchMergerWeights w = random_merger(cfg, seed, 1.0, bf);
  const PatchMergerWeights grads = random_merger(cfg, seed + 10, 0.2, false);  // f32 gradients, accumulated into
  const Tensor x = bf ? rounded_to_bf16(host_random({c.patches, c.hidden}, seed + 20, 2.0))
                      : host_random({c.patches, c.hidden}, seed + 20, 2.0);
  const Tensor dy = bf ? rounded_to_bf16(host_random({tokens, c.out_hidden}, seed + 21, 1.0))
                       : host_random({tokens, c.out_hidden}, seed + 21, 1.0);
  const PatchMergerWeights gd = on_device(grads, DType::f32);
  // CPU reference in f32.
  Tensor y = Tensor::empty(host_arena(), {tokens, c.out_hidden}, DType::f32);
  const PatchMergerSaved saved = patch_merger_forward(cfg, w, x, y, host_arena());
  Tensor dx = Tensor::empty(host_arena(), {c.patches, c.hidden}, DType::f32);
  patch_merger_backward(cfg, w, x, saved, dy, dx, grads, host_arena());
  // Device: activations and weights in dt, gradients f32, saved tensors and scratch from the device arena.
  const PatchMergerWeights wd = on_device(w, dt);
  const Tensor xd = to_device(x, dt);
  const Tensor yd = poisoned({tokens, c.out_hidden}, dt);
  const PatchMergerSaved saved_d = patch_merger_forward(cfg, wd, xd, yd, device_arena());
  const double tol = bf ? kTolBf16 : kTolF32;
  expect_rel("y", yd, y, tol);
  const Tensor dxd = poisoned({c.patches, c.hidden}, dt);
  patch_merger_backward(cfg, wd, xd, saved_d, to_device(dy, dt), dxd, gd, device_arena());
  // Gradients below fc2 pass through four layers, each rounding in its own order (bf16: rounding to bf16 after
  // each): bounds of 1e-4 in f32 and twice the single layer's in bf16.
  const double chain_tol = bf ? 2 * kTolBf16 : 1e-4;
  expect_rel("dx", dxd, dx, chain_tol);
  expect_rel("norm_w grad", gd.norm_w, grads.norm_w, chain_tol);
  expect_rel("norm_b grad", gd.norm_b, grads.norm_b, chain_tol);
  expect_rel("fc1_w grad", gd.fc1_w, grads.fc1_w, chain_tol);
  expect_rel("fc1_b grad", gd.fc1_b, grads.fc1_b, chain_tol);
  expect_rel("fc2_w grad", gd.fc2_w, grads.fc2_w, tol);
  expect_rel("fc2_b grad", gd.fc2_b, grads.fc2_b, tol);
}

TEST(GpuPatchMerger, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kMergerCases) check_merger(c, DType::f32);
}

TEST(GpuPatchMerger, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kMergerCases) check_merger(c, DType::bf16);
}

TEST(GpuPatchMerger, HostWeightIsRefusedWithTheArgumentNamed) {
  Q3VL_REQUIRE_GPU();
  PatchMergerConfig cfg;
  cfg.hidden = 4;
  cfg.out_hidden = 3;
  PatchMergerWeights w = on_device(random_merger(cfg, 1, 1.0, false), DType::f32);
  w.fc2_b = host_random({3}, 2);
  const Tensor x = to_device(host_random({4, 4}, 3), DType::f32);
  expect_error([&] { patch_merger_forward(cfg, w, x, poisoned({1, 3}, DType::f32), device_arena()); },
               "patch_merger_forward: fc2_b f32[3] is in host memory");
}

}  // namespace
}  // namespace q3vl::test
