// Pieces of the assembled model checked on their own: the vision patch order of the rotary coordinates and
// of the position-table resampling (HF get_vision_position_ids / get_vision_interpolation_indices_and_weights),
// and the attention of padding queries (HF's mask lets them see the real tokens of their row only).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/layers/attention.h"
#include "core/layers/padding_attention.h"
#include "core/layers/vision.h"
#include "core/model/text_decoder.h"
#include "core/model/vision_plan.h"
#include "core/model/vision_tower.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

TEST(ModelParts, VisionRotaryCoordinatesAreMergeBlockMajor) {
  // grid (2, 2, 4): per frame two 2x2 blocks side by side; rows of a block first, the frame repeated.
  std::vector<int64_t> grid = {2, 2, 4}, rows(16), cols(16);
  vision_rotary_coordinates(Tensor(grid.data(), DType::i64, {1, 3}), 2, Tensor(rows.data(), DType::i64, {16}),
                            Tensor(cols.data(), DType::i64, {16}));
  const std::vector<int64_t> r = {0, 0, 1, 1, 0, 0, 1, 1}, c = {0, 1, 0, 1, 2, 3, 2, 3};
  for (int p = 0; p < 16; ++p) {
    EXPECT_EQ(rows[p], r[p % 8]) << p;
    EXPECT_EQ(cols[p], c[p % 8]) << p;
  }
}

TEST(ModelParts, VisionPositionPlanHandComputed) {
  // 3x3 table resampled to a 4x4 grid: src = i * 2 / 3 = 0, 2/3, 4/3, 2 on both axes.
  std::vector<int64_t> grid = {1, 4, 4}, idx(64);
  std::vector<float> w(64);
  vision_pos_embed_plan(Tensor(grid.data(), DType::i64, {1, 3}), 3, 2, Tensor(idx.data(), DType::i64, {16, 4}),
                        Tensor(w.data(), DType::f32, {16, 4}));
  // Patch 3 is row 1, col 1 (block (0,0), in-block (1,1)): taps rows {0,1}, cols {0,1}, d = 2/3 both ways.
  EXPECT_EQ(idx[12], 0);
  EXPECT_EQ(idx[13], 1);
  EXPECT_EQ(idx[14], 3);
  EXPECT_EQ(idx[15], 4);
  const float d = 2.0f / 3.0f, lo = 1.0f - d, hi = 1.0f - (1.0f - d);
  EXPECT_EQ(w[12], lo * lo);
  EXPECT_EQ(w[13], lo * hi);
  EXPECT_EQ(w[15], hi * hi);
  // Patch 15 is row 3, col 3: src = 2 exactly, the upper tap clamps to the edge with weight 0.
  EXPECT_EQ(idx[60], 8);
  EXPECT_EQ(idx[63], 8);
  EXPECT_EQ(w[60], 1.0f);
  EXPECT_EQ(w[63], 0.0f);
}

TEST(ModelParts, PaddingQueriesAttendToTheRealTokensOnly) {
  // Reference: non-causal attention over a document whose queries are all the padding query and whose keys
  // are the real tokens; every output row then is that query's attention over exactly those keys.
  const int64_t real = 5, pads = 2, n = real + pads, hq = 4, hkv = 2, d = 8;
  Tensor q = random_tensor({n, hq, d}, 21), k = random_tensor({n, hkv, d}, 22), v = random_tensor({n, hkv, d}, 23);
  Tensor out = zeros_tensor({pads, hq, d});
  const double scale = 1.0 / std::sqrt(8.0);
  padding_attention(q, k, v, 0, real, scale, out);
  for (int64_t p = 0; p < pads; ++p) {
    Tensor qq = zeros_tensor({real, hq, d}), o = zeros_tensor({real, hq, d}), lse = zeros_tensor({hq, real});
    for (int64_t r = 0; r < real; ++r) copy(qq[r], q[real + p]);
    std::vector<int64_t> cu = {0, real};
    attention_forward(qq, k.narrow(0, 0, real), v.narrow(0, 0, real), Tensor(cu.data(), DType::i64, {2}), false,
                      scale, o, lse);
    // f64, same math in a different order: 1e-12.
    EXPECT_LT(max_abs_diff(o[0], out[p]), 1e-12);
  }
}

}  // namespace
}  // namespace q3vl::test
