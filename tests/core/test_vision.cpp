// Vision-tower pieces: patch embedding against a naive Conv3d, the bilinear position-embedding plan
// against fp32 source points and closed-form interpolation, the patch merger against a direct
// computation; finite-difference gradients for every input and parameter, and argument checks.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/layers/vision.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {


Tensor grid_tensor(std::vector<int64_t>& rows) {
  return Tensor(rows.data(), DType::i64, {static_cast<int64_t>(rows.size() / 3), 3});
}

// ---- Patch embedding ----

TEST(VisionPatchEmbed, EqualsNaiveConv3d) {
  const PatchEmbedGeometry g{3, 2, 4};  // small stand-in for (3, 2, 16): 96 features
  const int64_t d = 5, frames = 4, height = 8, width = 12;
  const int64_t gt = frames / g.temporal_patch, gh = height / g.patch, gw = width / g.patch, n = gt * gh * gw;
  Tensor video = random_tensor({g.in_channels, frames, height, width}, 1);
  Tensor w = random_tensor({d, g.in_channels, g.temporal_patch, g.patch, g.patch}, 2), b = random_tensor({d}, 3);
  const double* vp = video.data<double>();
  auto pixel = [&](int64_t c, int64_t f, int64_t y, int64_t x) { return vp[((c * frames + f) * height + y) * width + x]; };

  // Flatten each (t, h, w) patch in (C, T, Ph, Pw) order as the processor does.
  Tensor pixels = zeros_tensor({n, g.features()});
  double* pp = pixels.data<double>();
  for (int64_t ot = 0, row = 0; ot < gt; ++ot)
    for (int64_t oh = 0; oh < gh; ++oh)
      for (int64_t ow = 0; ow < gw; ++ow, ++row)
        for (int64_t c = 0, k = 0; c < g.in_channels; ++c)
          for (int64_t kt = 0; kt < g.temporal_patch; ++kt)
            for (int64_t kh = 0; kh < g.patch; ++kh)
              for (int64_t kw = 0; kw < g.patch; ++kw, ++k)
                pp[row * g.features() + k] = pixel(c, ot * g.temporal_patch + kt, oh * g.patch + kh, ow * g.patch + kw);

  Tensor y = zeros_tensor({n, d});
  patch_embed_forward(g, pixels, w, b, y);
  Tensor y_flat = zeros_tensor({n, d});
  patch_embed_forward(g, pixels, w.view({d, g.features()}), b, y_flat);

  const double* wp = w.data<double>();
  for (int64_t ot = 0, row = 0; ot < gt; ++ot)
    for (int64_t oh = 0; oh < gh; ++oh)
      for (int64_t ow = 0; ow < gw; ++ow, ++row)
        for (int64_t o = 0; o < d; ++o) {
          double conv = b.data<double>()[o];
          for (int64_t c = 0; c < g.in_channels; ++c)
            for (int64_t kt = 0; kt < g.temporal_patch; ++kt)
              for (int64_t kh = 0; kh < g.patch; ++kh)
                for (int64_t kw = 0; kw < g.patch; ++kw)
                  conv += wp[(((o * g.in_channels + c) * g.temporal_patch + kt) * g.patch + kh) * g.patch + kw] *
                          pixel(c, ot * g.temporal_patch + kt, oh * g.patch + kh, ow * g.patch + kw);
          // 96 f64 products of magnitude <= 1 summed in another order: rounding stays below 1e-13.
          EXPECT_NEAR(y.data<double>()[row * d + o], conv, 1e-12) << "patch " << row << " channel " << o;
          EXPECT_EQ(y.data<double>()[row * d + o], y_flat.data<double>()[row * d + o]);
        }
}

TEST(VisionPatchEmbed, MatchesFiniteDifferences) {
  const PatchEmbedGeometry g{3, 2, 2};
  const int64_t n = 3, d = 5;
  Tensor x = random_tensor({n, g.features()}, 4), w = random_tensor({d, 3, 2, 2, 2}, 5), b = random_tensor({d}, 6);
  Tensor r = random_tensor({n, d}, 7), y = zeros_tensor({n, d});
  auto loss = [&] {
    patch_embed_forward(g, x, w, b, y);
    return dot(y, r);
  };
  Tensor dx = zeros_tensor({n, g.features()}), dw = zeros_tensor({d, 3, 2, 2, 2}), db = zeros_tensor({d});
  patch_embed_backward(g, x, w, r, dx, dw, db);
  expect_gradients("patch_embed", loss, {{"pixels", x, dx}, {"w", w, dw}, {"b", b, db}});
}

TEST(VisionPatchEmbed, RejectsFeatureCountsThatDoNotMatchTheGeometry) {
  const PatchEmbedGeometry g{3, 2, 4};
  Tensor w = zeros_tensor({5, 3, 2, 4, 4}), b = zeros_tensor({5}), y = zeros_tensor({2, 5});
  expect_error([&] { patch_embed_forward(g, zeros_tensor({2, 95}), w, b, y); },
               "patch_embed_forward: pixels has shape [2,95], expected [*,96]");
  expect_error([&] { patch_embed_forward(g, zeros_tensor({2, 96}), zeros_tensor({5, 3, 2, 4, 3}), b, y); },
               "patch_embed_forward: w has shape [5,3,2,4,3], expected [*,3,2,4,4]");
  expect_error([&] { patch_embed_forward(g, zeros_tensor({2, 96}), zeros_tensor({5, 6, 16}), b, y); },
               "patch_embed_forward: w has shape [5,6,16], expected [*,3,2,4,4] or [*,96]");
  expect_error([&] { patch_embed_backward(g, zeros_tensor({2, 96}), w, y, Tensor{}, zeros_tensor({4, 96}), b); },
               "patch_embed_backward: dw has shape [4,96], expected [5,96]");
}

// ---- Position embedding ----

// torch.linspace(0, 3, 6) in fp32 and the corners it falls between (G = 4): step 0.6f; points 0-2 count
// up from 0, points 3-5 count down from 3, so point 3 is 3 - 2*0.6f = 0x1.ccccccp+0, not 3*0.6f =
// 0x1.cccccep+0, and point 4 is 3 - 0.6f, an exact tie in fp32 that rounds to even (0x1.333334p+1). On this
// grid HF 5.x's fp32 quotients i * 3 / 5, which the plan computes, are the same points.
struct Point {
  int64_t lo, hi;
  float frac;
};
const Point kLinspace4x6[6] = {{0, 1, 0.0f},           {0, 1, 0x1.333334p-1f}, {1, 2, 0x1.9999ap-3f},
                               {1, 2, 0x1.999998p-1f}, {2, 3, 0x1.9999ap-2f}, {3, 3, 0.0f}};

TEST(VisionPosEmbed, PlanMatchesTorchFp32LinspaceAndBlockOrder) {
  const int64_t grid_side = 4, merge = 2;
  std::vector<int64_t> rows = {1, 6, 6};
  Tensor idx = Tensor::zeros(test_arena(), {36, 4}, DType::i64);
  Tensor weight = zeros_tensor({36, 4}, DType::f32), weight64 = zeros_tensor({36, 4});
  vision_pos_embed_plan(grid_tensor(rows), grid_side, merge, idx, weight);
  vision_pos_embed_plan(grid_tensor(rows), grid_side, merge, idx, weight64);
  const int64_t* ip = idx.data<int64_t>();
  const float* wp = weight.data<float>();
  int64_t p = 0;
  for (int64_t br = 0; br < 3; ++br)
    for (int64_t bc = 0; bc < 3; ++bc)
      for (int64_t r = 0; r < 2; ++r)
        for (int64_t c = 0; c < 2; ++c, ++p) {
          const Point y = kLinspace4x6[br * 2 + r], x = kLinspace4x6[bc * 2 + c];
          const int64_t want_idx[4] = {y.lo * 4 + x.lo, y.lo * 4 + x.hi, y.hi * 4 + x.lo, y.hi * 4 + x.hi};
          const float want_w[4] = {(1.0f - y.frac) * (1.0f - x.frac), (1.0f - y.frac) * x.frac,
                                   y.frac * (1.0f - x.frac), y.frac * x.frac};
          for (int k = 0; k < 4; ++k) {
            EXPECT_EQ(ip[4 * p + k], want_idx[k]) << "patch " << p << " corner " << k;
            EXPECT_EQ(wp[4 * p + k], want_w[k]) << "patch " << p << " corner " << k;
            EXPECT_EQ(weight64.data<double>()[4 * p + k], static_cast<double>(want_w[k]));
          }
        }
}

TEST(VisionPosEmbed, FullSizeGridReproducesTheTableInBlockOrder) {
  const int64_t grid_side = 4, dim = 3;
  std::vector<int64_t> rows = {1, 4, 4};
  Tensor table = random_tensor({16, dim}, 8), y = zeros_tensor({16, dim});
  Tensor idx = Tensor::zeros(test_arena(), {16, 4}, DType::i64), weight = zeros_tensor({16, 4});
  vision_pos_embed_plan(grid_tensor(rows), grid_side, 2, idx, weight);
  vision_pos_embed_forward(table, idx, weight, y);
  int64_t p = 0;
  for (int64_t br = 0; br < 2; ++br)
    for (int64_t bc = 0; bc < 2; ++bc)
      for (int64_t r = 0; r < 2; ++r)
        for (int64_t c = 0; c < 2; ++c, ++p)
          for (int64_t j = 0; j < dim; ++j)
            EXPECT_EQ(y.data<double>()[p * dim + j], table.data<double>()[((br * 2 + r) * 4 + bc * 2 + c) * dim + j]);
}

TEST(VisionPosEmbed, AffineTableIsInterpolatedExactlyPerItemAndFrame) {
  // table[row * G + col] = a + b * row + c * col: bilinear interpolation reproduces an affine function, so
  // each patch must get a + b * Y + c * X at its align_corners position Y = row * (G-1) / (h-1).
  const int64_t grid_side = 5, dim = 3, merge = 2;
  const double a[dim] = {0.5, -1.0, 0.25}, b[dim] = {1.0, 0.5, -0.75}, c[dim] = {-0.5, 1.0, 0.125};
  Tensor table = zeros_tensor({grid_side * grid_side, dim});
  for (int64_t r = 0; r < grid_side; ++r)
    for (int64_t q = 0; q < grid_side; ++q)
      for (int64_t j = 0; j < dim; ++j) table.data<double>()[(r * grid_side + q) * dim + j] = a[j] + b[j] * r + c[j] * q;

  std::vector<int64_t> rows = {2, 4, 6, 1, 10, 2};  // two items with different grids, the first with 2 frames
  const Tensor grid = grid_tensor(rows);
  const int64_t patches = vision_num_patches(grid);
  ASSERT_EQ(patches, 2 * 4 * 6 + 10 * 2);
  Tensor idx = Tensor::zeros(test_arena(), {patches, 4}, DType::i64), weight = zeros_tensor({patches, 4});
  Tensor y = zeros_tensor({patches, dim});
  vision_pos_embed_plan(grid, grid_side, merge, idx, weight);
  vision_pos_embed_forward(table, idx, weight, y);

  const double* yp = y.data<double>();
  int64_t p = 0;
  for (int item = 0; item < 2; ++item) {
    const int64_t t = rows[3 * item], h = rows[3 * item + 1], w = rows[3 * item + 2];
    const int64_t first = p;
    for (int64_t ti = 0; ti < t; ++ti)
      for (int64_t br = 0; br < h / merge; ++br)
        for (int64_t bc = 0; bc < w / merge; ++bc)
          for (int64_t r = 0; r < merge; ++r)
            for (int64_t q = 0; q < merge; ++q, ++p) {
              const double yy = double(br * merge + r) * (grid_side - 1) / double(h - 1);
              const double xx = double(bc * merge + q) * (grid_side - 1) / double(w - 1);
              for (int64_t j = 0; j < dim; ++j) {
                // The positions are fp32 source points (within 2^-21 of exact below 5) and the four
                // weights fp32 products (each within ~2^-23 relative); with slopes <= 1 and table values
                // <= 5 the result is within 5e-6 of the exact value.
                EXPECT_NEAR(yp[p * dim + j], a[j] + b[j] * yy + c[j] * xx, 1e-5) << "item " << item << " patch " << p;
                if (ti > 0) {
                  EXPECT_EQ(yp[p * dim + j], yp[(p - ti * h * w) * dim + j]) << "frame " << ti;
                }
              }
            }
    EXPECT_EQ(p - first, t * h * w);
  }
}

class VisionPosEmbedGrad : public testing::TestWithParam<int> {};

TEST_P(VisionPosEmbedGrad, TableMatchesFiniteDifferences) {
  const int64_t grid_side = 3, dim = GetParam();
  std::vector<int64_t> rows = {1, 2, 4, 2, 4, 2};
  const Tensor grid = grid_tensor(rows);
  const int64_t patches = vision_num_patches(grid);
  Tensor idx = Tensor::zeros(test_arena(), {patches, 4}, DType::i64), weight = zeros_tensor({patches, 4});
  vision_pos_embed_plan(grid, grid_side, 2, idx, weight);
  Tensor table = random_tensor({grid_side * grid_side, dim}, 9), r = random_tensor({patches, dim}, 10);
  Tensor y = zeros_tensor({patches, dim});
  auto loss = [&] {
    vision_pos_embed_forward(table, idx, weight, y);
    return dot(y, r);
  };
  Tensor dtable = zeros_tensor({grid_side * grid_side, dim});
  vision_pos_embed_backward(idx, weight, r, dtable);
  expect_gradients("vision_pos_embed", loss, {{"table", table, dtable}});
}

// 67 columns spans two of the backward's column blocks.
INSTANTIATE_TEST_SUITE_P(Dims, VisionPosEmbedGrad, testing::Values(1, 4, 67));

TEST(VisionPosEmbed, BackwardIsIndependentOfThreadCount) {
  const int64_t grid_side = 48, dim = 200;
  std::vector<int64_t> rows = {2, 8, 12, 1, 30, 4};
  const Tensor grid = grid_tensor(rows);
  const int64_t patches = vision_num_patches(grid);
  Tensor idx = Tensor::zeros(test_arena(), {patches, 4}, DType::i64);
  Tensor weight = zeros_tensor({patches, 4}, DType::f32), dy = random_tensor({patches, dim}, 11, 1.0, DType::f32);
  vision_pos_embed_plan(grid, grid_side, 2, idx, weight);
  const int threads = omp_get_max_threads();
  Tensor serial = zeros_tensor({grid_side * grid_side, dim}, DType::f32);
  Tensor parallel = zeros_tensor({grid_side * grid_side, dim}, DType::f32);
  omp_set_num_threads(1);
  vision_pos_embed_backward(idx, weight, dy, serial);
  omp_set_num_threads(4);
  vision_pos_embed_backward(idx, weight, dy, parallel);
  omp_set_num_threads(threads);
  EXPECT_EQ(std::memcmp(serial.raw(), parallel.raw(), serial.nbytes()), 0) << "thread count changed the result";
}

TEST(VisionPosEmbed, BackwardAccumulatesIntoTheTableGradient) {
  std::vector<int64_t> rows = {2, 4, 2};
  const Tensor grid = grid_tensor(rows);
  Tensor idx = Tensor::zeros(test_arena(), {16, 4}, DType::i64), weight = zeros_tensor({16, 4});
  vision_pos_embed_plan(grid, 5, 2, idx, weight);
  Tensor dy = random_tensor({16, 3}, 12), fresh = zeros_tensor({25, 3}), primed = random_tensor({25, 3}, 13);
  Tensor start = zeros_tensor({25, 3});
  copy(start, primed);
  vision_pos_embed_backward(idx, weight, dy, fresh);
  vision_pos_embed_backward(idx, weight, dy, primed);
  // f64 sums of a few O(1) terms; starting from a non-zero value only changes the rounding (~1e-16).
  for (int64_t i = 0; i < fresh.numel(); ++i)
    EXPECT_NEAR(primed.data<double>()[i], start.data<double>()[i] + fresh.data<double>()[i], 1e-14) << "element " << i;
}

TEST(VisionPosEmbed, RejectsBadGridsAndIndices) {
  Tensor idx = Tensor::zeros(test_arena(), {6, 4}, DType::i64), weight = zeros_tensor({6, 4});
  std::vector<int64_t> odd = {1, 2, 2, 1, 3, 2}, empty_frame = {0, 2, 2}, good = {1, 2, 2, 1, 2, 2};
  expect_error([&] { vision_pos_embed_plan(grid_tensor(odd), 48, 2, idx, weight); },
               "vision_pos_embed_plan: grid_thw row 1 is (1,3,2), h and w must be multiples of merge 2");
  expect_error([&] { vision_pos_embed_plan(grid_tensor(empty_frame), 48, 2, idx, weight); },
               "vision_pos_embed_plan: grid_thw row 0 is (0,2,2), expected positive sizes");
  expect_error([&] { vision_pos_embed_plan(grid_tensor(good), 48, 2, idx, weight); },
               "vision_pos_embed_plan: idx has shape [6,4], expected [8,4]");
  Tensor table = zeros_tensor({9, 3}), y = zeros_tensor({6, 3});
  idx.data<int64_t>()[4 * 5 + 2] = 9;
  expect_error([&] { vision_pos_embed_forward(table, idx, weight, y); },
               "vision_pos_embed_forward: idx[5,2] = 9 is outside the table's 9 rows");
  expect_error([&] { vision_pos_embed_backward(idx, weight, y, table); },
               "vision_pos_embed_backward: idx[5,2] = 9 is outside the table's 9 rows");
  expect_error([&] { vision_pos_embed_forward(table, idx, zeros_tensor({6, 4}, DType::f32), y); },
               "vision_pos_embed_forward: weight has dtype f32, expected f64");
}

// ---- Patch merger ----

PatchMergerWeights random_merger_weights(const PatchMergerConfig& cfg, uint64_t seed) {
  const int64_t k = cfg.merged();
  return {random_tensor({cfg.norm_dim()}, seed), random_tensor({cfg.norm_dim()}, seed + 1),
          random_tensor({k, k}, seed + 2, 0.5),  random_tensor({k}, seed + 3),
          random_tensor({cfg.out_hidden, k}, seed + 4, 0.5), random_tensor({cfg.out_hidden}, seed + 5)};
}

PatchMergerWeights zero_merger_weights(const PatchMergerConfig& cfg) {
  const int64_t k = cfg.merged();
  return {zeros_tensor({cfg.norm_dim()}), zeros_tensor({cfg.norm_dim()}), zeros_tensor({k, k}),
          zeros_tensor({k}),             zeros_tensor({cfg.out_hidden, k}), zeros_tensor({cfg.out_hidden})};
}

// LayerNorm of n rows of length d in place (biased variance, as torch).
void layernorm_rows(std::vector<double>& v, int64_t n, int64_t d, const double* w, const double* b, double eps) {
  for (int64_t i = 0; i < n; ++i) {
    double mu = 0, var = 0;
    for (int64_t j = 0; j < d; ++j) mu += v[i * d + j] / d;
    for (int64_t j = 0; j < d; ++j) var += (v[i * d + j] - mu) * (v[i * d + j] - mu) / d;
    for (int64_t j = 0; j < d; ++j) v[i * d + j] = (v[i * d + j] - mu) / std::sqrt(var + eps) * w[j] + b[j];
  }
}

// y = x W^T + b over n rows.
std::vector<double> affine(const std::vector<double>& x, int64_t n, int64_t in, const Tensor& w, const Tensor& b) {
  const int64_t out = w.size(0);
  std::vector<double> y(n * out);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t o = 0; o < out; ++o) {
      double s = b.data<double>()[o];
      for (int64_t k = 0; k < in; ++k) s += x[i * in + k] * w.data<double>()[o * in + k];
      y[i * out + o] = s;
    }
  return y;
}

class VisionPatchMergerVariant : public testing::TestWithParam<bool> {};

TEST_P(VisionPatchMergerVariant, ForwardEqualsDirectComputation) {
  const PatchMergerConfig cfg{3, 5, 4, GetParam(), 1e-6};
  const int64_t n = 12, m = 3, k = cfg.merged();
  Tensor x = random_tensor({n, cfg.hidden}, 30, 2.0);
  const PatchMergerWeights w = random_merger_weights(cfg, 31);
  Tensor y = zeros_tensor({m, cfg.out_hidden});
  patch_merger_forward(cfg, w, x, y, test_arena());

  // Row-major [N, D] and [N/4, 4D] share memory: the shuffle is a reinterpretation of the rows.
  std::vector<double> h(x.data<double>(), x.data<double>() + n * cfg.hidden);
  if (cfg.use_postshuffle_norm)
    layernorm_rows(h, m, k, w.norm_w.data<double>(), w.norm_b.data<double>(), cfg.eps);
  else
    layernorm_rows(h, n, cfg.hidden, w.norm_w.data<double>(), w.norm_b.data<double>(), cfg.eps);
  h = affine(h, m, k, w.fc1_w, w.fc1_b);
  for (double& v : h) v = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
  h = affine(h, m, k, w.fc2_w, w.fc2_b);
  for (int64_t i = 0; i < m * cfg.out_hidden; ++i)
    EXPECT_NEAR(y.data<double>()[i], h[i], 1e-12) << "element " << i;  // f64, O(1) values, different order
}

INSTANTIATE_TEST_SUITE_P(Norm, VisionPatchMergerVariant, testing::Values(false, true),
                         [](const testing::TestParamInfo<bool>& info) { return info.param ? "PostShuffle" : "PreShuffle"; });

class VisionPatchMergerGrad : public testing::TestWithParam<std::tuple<bool, int, int, int>> {};

TEST_P(VisionPatchMergerGrad, MatchesFiniteDifferences) {
  const auto [post, hidden, out, tokens] = GetParam();
  const PatchMergerConfig cfg{hidden, out, 4, post, 1e-6};
  const int64_t n = 4 * tokens;
  Tensor x = random_tensor({n, hidden}, 40, 2.0), r = random_tensor({tokens, out}, 41);
  const PatchMergerWeights w = random_merger_weights(cfg, 42);
  Tensor y = zeros_tensor({tokens, out});
  Arena& arena = test_arena();
  auto loss = [&] {
    const size_t mark = arena.mark();
    patch_merger_forward(cfg, w, x, y, arena);
    arena.release(mark);
    return dot(y, r);
  };
  const PatchMergerSaved saved = patch_merger_forward(cfg, w, x, y, arena);
  Tensor dx = zeros_tensor({n, hidden});
  const PatchMergerWeights g = zero_merger_weights(cfg);
  patch_merger_backward(cfg, w, x, saved, r, dx, g, arena);
  expect_gradients(post ? "patch_merger(post-shuffle norm)" : "patch_merger(pre-shuffle norm)", loss,
                   {{"x", x, dx},
                    {"norm_w", w.norm_w, g.norm_w},
                    {"norm_b", w.norm_b, g.norm_b},
                    {"fc1_w", w.fc1_w, g.fc1_w},
                    {"fc1_b", w.fc1_b, g.fc1_b},
                    {"fc2_w", w.fc2_w, g.fc2_w},
                    {"fc2_b", w.fc2_b, g.fc2_b}});
}

INSTANTIATE_TEST_SUITE_P(Shapes, VisionPatchMergerGrad,
                         testing::Values(std::make_tuple(false, 3, 5, 3), std::make_tuple(true, 3, 5, 3),
                                         std::make_tuple(false, 2, 3, 1), std::make_tuple(true, 5, 2, 2)));

TEST(VisionPatchMerger, UsesExactlyTheAdvertisedArenaBytesAndAccumulatesGradients) {
  const PatchMergerConfig cfg{6, 7, 4, false, 1e-6};
  const int64_t n = 20, m = 5;
  const size_t saved_bytes = patch_merger_saved_bytes(cfg, n, DType::f64);
  const size_t scratch_bytes = patch_merger_scratch_bytes(cfg, n, DType::f64);
  // The forward borrows one of the two scratch buffers the backward needs.
  Arena activations("merger activations", saved_bytes + scratch_bytes / 2);
  Arena scratch("merger scratch", scratch_bytes);
  Tensor x = random_tensor({n, 6}, 50), dy = random_tensor({m, 7}, 51), y = zeros_tensor({m, 7});
  const PatchMergerWeights w = random_merger_weights(cfg, 52);
  const PatchMergerSaved saved = patch_merger_forward(cfg, w, x, y, activations);
  EXPECT_EQ(activations.used(), saved_bytes);
  const PatchMergerWeights once = zero_merger_weights(cfg), twice = zero_merger_weights(cfg);
  patch_merger_backward(cfg, w, x, saved, dy, Tensor{}, once, scratch);
  EXPECT_EQ(scratch.used(), 0u);
  patch_merger_backward(cfg, w, x, saved, dy, Tensor{}, twice, scratch);
  patch_merger_backward(cfg, w, x, saved, dy, Tensor{}, twice, scratch);
  const Tensor pairs[6][2] = {{once.norm_w, twice.norm_w}, {once.norm_b, twice.norm_b}, {once.fc1_w, twice.fc1_w},
                              {once.fc1_b, twice.fc1_b},   {once.fc2_w, twice.fc2_w},   {once.fc2_b, twice.fc2_b}};
  // f64 gradients of O(1..10); accumulating onto a non-zero value only changes the rounding (~1e-15).
  for (const auto& pr : pairs)
    for (int64_t i = 0; i < pr[0].numel(); ++i)
      EXPECT_NEAR(pr[1].data<double>()[i], 2 * pr[0].data<double>()[i], 1e-12);
}

TEST(VisionPatchMerger, RejectsBadPatchCountsAndShapes) {
  const PatchMergerConfig pre{3, 5, 4, false, 1e-6}, post{3, 5, 4, true, 1e-6};
  const PatchMergerWeights w = random_merger_weights(pre, 60), w_post = random_merger_weights(post, 70);
  Tensor y = zeros_tensor({3, 5});
  expect_error([&] { patch_merger_forward(pre, w, zeros_tensor({10, 3}), zeros_tensor({2, 5}), test_arena()); },
               "patch_merger_forward: 10 patches is not a multiple of the merge unit 4");
  expect_error([&] { patch_merger_forward(pre, w, zeros_tensor({12, 4}), y, test_arena()); },
               "patch_merger_forward: x has shape [12,4], expected [*,3]");
  expect_error([&] { patch_merger_forward(pre, w_post, zeros_tensor({12, 3}), y, test_arena()); },
               "patch_merger_forward: norm_w has shape [12], expected [3]");
  expect_error([&] { patch_merger_forward(post, w, zeros_tensor({12, 3}), y, test_arena()); },
               "patch_merger_forward: norm_w has shape [3], expected [12]");
  expect_error([&] { patch_merger_forward(pre, w, zeros_tensor({12, 3}), zeros_tensor({3, 4}), test_arena()); },
               "patch_merger_forward: y has shape [3,4], expected [3,5]");
  PatchMergerWeights bad_fc2 = w;
  bad_fc2.fc2_w = zeros_tensor({5, 3});
  expect_error([&] { patch_merger_forward(pre, bad_fc2, zeros_tensor({12, 3}), y, test_arena()); },
               "patch_merger_forward: fc2_w has shape [5,3], expected [5,12]");
  expect_error([&] { patch_merger_saved_bytes(pre, 6, DType::f32); },
               "patch_merger_saved_bytes: 6 patches is not a multiple of the merge unit 4");

  Tensor x = random_tensor({12, 3}, 80);
  const PatchMergerSaved saved = patch_merger_forward(pre, w, x, y, test_arena());
  PatchMergerWeights grads = zero_merger_weights(pre);
  grads.fc1_w = zeros_tensor({12, 3});
  expect_error([&] { patch_merger_backward(pre, w, x, saved, y, Tensor{}, grads, test_arena()); },
               "patch_merger_backward: grads.fc1_w has shape [12,3], expected [12,12]");
  expect_error(
      [&] { patch_merger_backward(post, w_post, x, saved, y, Tensor{}, zero_merger_weights(post), test_arena()); },
      "patch_merger_backward: saved.mean has shape [12], expected [3]");
}

}  // namespace
}  // namespace q3vl::test
