// Rotary: hand-computed tables and rotations, the MRoPE frequency-to-row mapping, the vision table layout,
// finite-difference gradients of the rotation, and argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "core/layers/rotary.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

Tensor positions_tensor(std::initializer_list<int64_t> values, Shape shape) {
  Tensor t = Tensor::empty(test_arena(), shape, DType::i64);
  int64_t i = 0;
  for (int64_t v : values) t.data<int64_t>()[i++] = v;
  return t;
}

double at(const Tensor& t, int64_t i, int64_t j) { return t.data<double>()[i * t.size(1) + j]; }

TEST(Rotary, RopeTableHandComputed) {
  // head_dim 4, theta 100: inv_freq = [1, 1/100^(2/4)] = [1, 0.1f]. Angles 0, 1*1 = 1, 5 * 0.1f.
  Tensor pos = positions_tensor({0, 1, 5}, {3});
  Tensor cos = zeros_tensor({3, 4}), sin = zeros_tensor({3, 4});
  rope_cos_sin(pos, 4, 100.0, cos, sin);
  for (int64_t j = 0; j < 4; ++j) {
    EXPECT_EQ(at(cos, 0, j), 1.0);
    EXPECT_EQ(at(sin, 0, j), 0.0);
  }
  // Angles that are exact in fp32 (1 and 0.5: 5 * 0.1f rounds to 0.5f) give exact f64 cos/sin.
  EXPECT_EQ(at(cos, 1, 0), std::cos(1.0));
  EXPECT_EQ(at(sin, 1, 2), std::sin(1.0));
  EXPECT_EQ(at(cos, 2, 1), std::cos(0.5));
  EXPECT_EQ(at(sin, 2, 3), std::sin(0.5));
  EXPECT_EQ(at(cos, 2, 0), std::cos(5.0));
  // Second half repeats the first (cat(freqs, freqs)).
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 2; ++j) {
      EXPECT_EQ(at(cos, i, j), at(cos, i, j + 2));
      EXPECT_EQ(at(sin, i, j), at(sin, i, j + 2));
    }
}

TEST(Rotary, AnglesAreComputedInFp32) {
  // inv_freq[1] for head_dim 4, theta 10: 1 / 10^0.5 in fp32. At position 1e6 the fp32 product differs
  // from the f64 one by far more than f64 rounding, so this pins the fp32 angle HF uses.
  Tensor pos = positions_tensor({1000000}, {1});
  Tensor cos = zeros_tensor({1, 4}), sin = zeros_tensor({1, 4});
  rope_cos_sin(pos, 4, 10.0, cos, sin);
  const float inv = 1.0f / std::pow(10.0f, 0.5f);
  const float angle = 1000000.0f * inv;
  EXPECT_EQ(at(cos, 0, 1), std::cos(static_cast<double>(angle)));
  EXPECT_EQ(at(sin, 0, 1), std::sin(static_cast<double>(angle)));
  EXPECT_GT(std::abs(at(sin, 0, 1) - std::sin(1000000.0 / std::sqrt(10.0))), 1e-6);
}

TEST(Rotary, F32TablesMatchF64TablesToFp32Rounding) {
  Tensor pos = positions_tensor({0, 3, 17, 4000}, {4});
  Tensor c64 = zeros_tensor({4, 8}), s64 = zeros_tensor({4, 8});
  Tensor c32 = zeros_tensor({4, 8}, DType::f32), s32 = zeros_tensor({4, 8}, DType::f32);
  rope_cos_sin(pos, 8, 1e4, c64, s64);
  rope_cos_sin(pos, 8, 1e4, c32, s32);
  // Same fp32 angles; only the final cos/sin rounding differs: |err| <= 1 fp32 ulp of values in [-1, 1].
  for (int64_t i = 0; i < 32; ++i) {
    EXPECT_NEAR(c32.data<float>()[i], c64.data<double>()[i], 1.2e-7);
    EXPECT_NEAR(s32.data<float>()[i], s64.data<double>()[i], 1.2e-7);
  }
}

// Which row (0 = T, 1 = H, 2 = W) each frequency of an MRoPE table used, found by comparing with 1-D
// tables built from each row's position alone.
std::vector<int> mrope_rows(int64_t head_dim, std::array<int64_t, 3> sections) {
  const int64_t t = 11, h = 222, w = 3333;
  Tensor pos = positions_tensor({t, h, w}, {3, 1});
  Tensor cos = zeros_tensor({1, head_dim}), sin = zeros_tensor({1, head_dim});
  mrope_cos_sin(pos, head_dim, 5e6, sections, cos, sin);
  Tensor one[3], c1[3], s1[3];
  const int64_t per_row[3] = {t, h, w};
  for (int r = 0; r < 3; ++r) {
    one[r] = positions_tensor({per_row[r]}, {1});
    c1[r] = zeros_tensor({1, head_dim});
    s1[r] = zeros_tensor({1, head_dim});
    rope_cos_sin(one[r], head_dim, 5e6, c1[r], s1[r]);
  }
  std::vector<int> rows;
  for (int64_t j = 0; j < head_dim / 2; ++j) {
    int found = -1;
    for (int r = 0; r < 3; ++r)
      if (at(cos, 0, j) == at(c1[r], 0, j) && at(sin, 0, j) == at(s1[r], 0, j) &&
          at(cos, 0, j + head_dim / 2) == at(c1[r], 0, j) && at(sin, 0, j + head_dim / 2) == at(s1[r], 0, j))
        found = r;
    rows.push_back(found);
  }
  return rows;
}

TEST(Rotary, MropeInterleavesQwen3VlSections) {
  const std::vector<int> rows = mrope_rows(128, {24, 20, 20});
  ASSERT_EQ(rows.size(), 64u);
  int count[3] = {0, 0, 0};
  for (int j = 0; j < 64; ++j) {
    const int expected = j < 60 ? j % 3 : 0;
    EXPECT_EQ(rows[j], expected) << "frequency " << j;
    if (rows[j] >= 0) ++count[rows[j]];
  }
  EXPECT_EQ(count[0], 24);
  EXPECT_EQ(count[1], 20);
  EXPECT_EQ(count[2], 20);
}

TEST(Rotary, MropeGeneralSections) {
  // sections (4, 3, 3), 10 frequencies: H at 1, 4, 7 (< 9), W at 2, 5, 8 (< 9), T elsewhere.
  const std::vector<int> rows = mrope_rows(20, {4, 3, 3});
  EXPECT_EQ(rows, (std::vector<int>{0, 1, 2, 0, 1, 2, 0, 1, 2, 0}));
  // sections (6, 2, 1), 9 frequencies: H at 1, 4 (< 6), W at 2 (< 3), T elsewhere.
  EXPECT_EQ(mrope_rows(18, {6, 2, 1}), (std::vector<int>{0, 1, 2, 0, 1, 0, 0, 0, 0}));
}

TEST(Rotary, MropeMultipleTokensUseTheirOwnPositions) {
  // Both tokens have equal T, H and W positions, so MRoPE must reduce to the 1-D table.
  Tensor pos = positions_tensor({5, 9, 5, 9, 5, 9}, {3, 2});
  Tensor cos = zeros_tensor({2, 16}), sin = zeros_tensor({2, 16});
  mrope_cos_sin(pos, 16, 1e4, {4, 2, 2}, cos, sin);
  Tensor p1 = positions_tensor({5, 9}, {2});
  Tensor c1 = zeros_tensor({2, 16}), s1 = zeros_tensor({2, 16});
  rope_cos_sin(p1, 16, 1e4, c1, s1);
  EXPECT_EQ(max_abs_diff(cos, c1), 0.0);
  EXPECT_EQ(max_abs_diff(sin, s1), 0.0);
}

TEST(Rotary, VisionTableLayout) {
  // head_dim 8 -> rotary dim 4 -> inv_freq [1, 1/100] (theta 1e4): per patch [row, row/100, col, col/100],
  // doubled. Patch (row 3, col 5) and patch (0, 0).
  Tensor rows = positions_tensor({3, 0}, {2}), cols = positions_tensor({5, 0}, {2});
  Tensor cos = zeros_tensor({2, 8}), sin = zeros_tensor({2, 8});
  vision_rope_cos_sin(rows, cols, 8, 1e4, cos, sin);
  const double angles[4] = {3.0, double(3.0f * (1.0f / 100.0f)), 5.0, double(5.0f * (1.0f / 100.0f))};
  for (int64_t j = 0; j < 8; ++j) {
    EXPECT_EQ(at(cos, 0, j), std::cos(angles[j % 4])) << j;
    EXPECT_EQ(at(sin, 0, j), std::sin(angles[j % 4])) << j;
    EXPECT_EQ(at(cos, 1, j), 1.0);
    EXPECT_EQ(at(sin, 1, j), 0.0);
  }
}

TEST(Rotary, VisionQwen3VlHeadDim) {
  // head_dim 72: 18 frequencies over dim 36; entries 0..17 use the row, 18..35 the column, 36..71 repeat.
  Tensor rows = positions_tensor({7}, {1}), cols = positions_tensor({2}, {1});
  Tensor cos = zeros_tensor({1, 72}), sin = zeros_tensor({1, 72});
  vision_rope_cos_sin(rows, cols, 72, 1e4, cos, sin);
  for (int64_t j = 0; j < 18; ++j) {
    const float inv = 1.0f / std::pow(1e4f, static_cast<float>(2 * j) / 36.0f);
    EXPECT_EQ(at(sin, 0, j), std::sin(static_cast<double>(7.0f * inv))) << j;
    EXPECT_EQ(at(sin, 0, j + 18), std::sin(static_cast<double>(2.0f * inv))) << j;
  }
  for (int64_t j = 0; j < 36; ++j) EXPECT_EQ(at(cos, 0, j), at(cos, 0, j + 36));
}

TEST(Rotary, ForwardHandComputed) {
  // head_dim 2: one frequency with inv_freq 1, so position p rotates (x0, x1) by p radians.
  Tensor pos = positions_tensor({0, 1}, {2});
  Tensor cos = zeros_tensor({2, 2}), sin = zeros_tensor({2, 2});
  rope_cos_sin(pos, 2, 1e4, cos, sin);
  double xv[] = {0.5, -2, 3, 4, 1, 2, -1, 0.25};
  Tensor x(xv, DType::f64, {2, 2, 2});
  Tensor y = zeros_tensor({2, 2, 2});
  rotary_forward(x, cos, sin, y);
  const double* yp = y.data<double>();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(yp[i], xv[i]);  // position 0 is the identity
  const double c = std::cos(1.0), s = std::sin(1.0);
  EXPECT_DOUBLE_EQ(yp[4], 1 * c - 2 * s);
  EXPECT_DOUBLE_EQ(yp[5], 2 * c + 1 * s);
  EXPECT_DOUBLE_EQ(yp[6], -1 * c - 0.25 * s);
  EXPECT_DOUBLE_EQ(yp[7], 0.25 * c + -1 * s);
}

TEST(Rotary, InPlaceMatchesOutOfPlace) {
  Tensor x = random_tensor({5, 3, 6}, 1), cos = random_tensor({5, 6}, 2), sin = random_tensor({5, 6}, 3);
  Tensor y = zeros_tensor({5, 3, 6}), x_copy = zeros_tensor({5, 3, 6});
  copy(x_copy, x);
  rotary_forward(x, cos, sin, y);
  rotary_forward(x_copy, cos, sin, x_copy);
  EXPECT_EQ(max_abs_diff(x_copy, y), 0.0);
  Tensor dx = zeros_tensor({5, 3, 6});
  rotary_backward(y, cos, sin, dx);
  rotary_backward(x_copy, cos, sin, x_copy);
  EXPECT_EQ(max_abs_diff(x_copy, dx), 0.0);
}

class RotaryGrad : public testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(RotaryGrad, MatchesFiniteDifferences) {
  const auto [n, heads, d] = GetParam();
  // Arbitrary tables (not unit cos^2 + sin^2, halves not equal) so the transpose is checked in general.
  Tensor x = random_tensor({n, heads, d}, 10), cos = random_tensor({n, d}, 11), sin = random_tensor({n, d}, 12);
  Tensor r = random_tensor({n, heads, d}, 13);
  Tensor y = zeros_tensor({n, heads, d});
  auto loss = [&] {
    rotary_forward(x, cos, sin, y);
    return dot(y, r);
  };
  Tensor dx = zeros_tensor({n, heads, d});
  rotary_backward(r, cos, sin, dx);
  expect_gradients("rotary", loss, {{"x", x, dx}});
}

INSTANTIATE_TEST_SUITE_P(Shapes, RotaryGrad,
                         testing::Values(std::make_tuple(1, 1, 2), std::make_tuple(3, 2, 6), std::make_tuple(7, 3, 10),
                                         std::make_tuple(4, 1, 72)));


TEST(Rotary, RejectsBadArguments) {
  Tensor pos = positions_tensor({0, 1, 2}, {3});
  Tensor cos = zeros_tensor({3, 8}), sin = zeros_tensor({3, 8});
  expect_error([&] { rope_cos_sin(pos, 7, 1e4, cos, sin); }, "rope_cos_sin: head_dim must be positive and even");
  expect_error([&] { rope_cos_sin(pos, 6, 1e4, cos, sin); }, "rope_cos_sin: cos has shape [3,8], expected [3,6]");
  Tensor pos3 = positions_tensor({0, 1, 2, 0, 1, 2, 0, 1, 2}, {3, 3});
  expect_error([&] { mrope_cos_sin(pos3, 8, 1e4, {2, 1, 2}, cos, sin); }, "mrope_cos_sin: sections (2, 1, 2)");
  expect_error([&] { mrope_cos_sin(pos, 8, 1e4, {2, 1, 1}, cos, sin); }, "mrope_cos_sin: positions has shape [3]");
  Tensor cos6 = zeros_tensor({3, 6}), sin6 = zeros_tensor({3, 6});
  expect_error([&] { vision_rope_cos_sin(pos, pos, 6, 1e4, cos6, sin6); }, "vision_rope_cos_sin: head_dim must be a positive multiple of 4");
  Tensor x = zeros_tensor({3, 2, 8}), y = zeros_tensor({3, 2, 8});
  Tensor cos_short = zeros_tensor({2, 8});
  expect_error([&] { rotary_forward(x, cos_short, sin, y); }, "rotary_forward: cos has shape [2,8], expected [3,8]");
  Tensor dx_bad = zeros_tensor({3, 1, 8});
  expect_error([&] { rotary_backward(x, cos, sin, dx_bad); }, "rotary_backward: dx has shape [3,1,8], expected [3,2,8]");
  Tensor x_odd = zeros_tensor({3, 2, 7}), cos7 = zeros_tensor({3, 7});
  expect_error([&] { rotary_forward(x_odd, cos7, cos7, x_odd); }, "rotary_forward: head_dim must be even");
}

}  // namespace
}  // namespace q3vl::test
