// The vision patch embedding (a Conv3d whose kernel equals its stride) on the CUDA device against the CPU, with
// the checkpoint's 5-D weight, f32 and bf16 (f32 weight gradients under bf16).
#include <gtest/gtest.h>

#include "core/layers/vision.h"
#include "tests/cuda/gpu_test_support.h"

namespace q3vl::test {
namespace {

void check_patch_embed(int64_t n, int64_t d, DType dt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n=" + std::to_string(n) + " " + std::string(dtype_name(dt)));
  PatchEmbedGeometry g;
  g.patch = 4;  // 3 x 2 x 4 x 4 = 96 features
  const bool bf = dt == DType::bf16;
  auto in = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  const Tensor pixels = in(host_random({n, g.features()}, seed));
  const Tensor w = in(host_random({d, g.in_channels, g.temporal_patch, g.patch, g.patch}, seed + 1, 0.2));
  const Tensor b = in(host_random({d}, seed + 2, 0.2));
  const Tensor dy = in(host_random({n, d}, seed + 3));
  Tensor y = Tensor::empty(host_arena(), {n, d}, DType::f32);
  patch_embed_forward(g, pixels, w, b, y);
  Tensor dpix = Tensor::empty(host_arena(), {n, g.features()}, DType::f32);
  Tensor dw = host_random(w.shape(), seed + 4, 0.1), db = host_random({d}, seed + 5, 0.1);
  const Tensor dw_dev = to_device(dw, DType::f32), db_dev = to_device(db, DType::f32);
  patch_embed_backward(g, pixels, w, dy, dpix, dw, db);

  const Tensor pd = to_device(pixels, dt), wd = to_device(w, dt), bd = to_device(b, dt);
  const Tensor yd = poisoned({n, d}, dt);
  patch_embed_forward(g, pd, wd, bd, yd);
  const double tol = bf ? kTolBf16 : kTolF32;
  expect_rel("y", yd, y, tol);
  const Tensor dpd = poisoned({n, g.features()}, dt);
  patch_embed_backward(g, pd, wd, to_device(dy, dt), dpd, dw_dev, db_dev);
  expect_rel("dpixels", dpd, dpix, tol);
  expect_rel("dw", dw_dev, dw, tol);
  expect_rel("db", db_dev, db, tol);
}

TEST(GpuPatchEmbed, MatchesCpu) {
  Q3VL_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16}) {
    check_patch_embed(1, 8, dt);
    check_patch_embed(37, 40, dt);
    check_patch_embed(256, 64, dt);
  }
}

}  // namespace
}  // namespace q3vl::test
