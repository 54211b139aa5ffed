// get_rope_index against hand-computed HF positions: text only, one image, a video of two temporal patches,
// a padded image + text batch, packed documents, and the span/grid errors.
#include <gtest/gtest.h>

#include <vector>

#include "core/model/rope_index.h"
#include "tests/model/test_model_tiny.h"

namespace q3vl::test {
namespace {

struct Rows {
  std::vector<int64_t> t, h, w;
};

Rows rope(const std::vector<int64_t>& ids, int64_t rows, const std::vector<int64_t>& mask = {},
          std::vector<int64_t> image_grid = {}, std::vector<int64_t> video_grid = {},
          std::vector<int64_t> cu = {}) {
  const ModelConfig c = tiny_config();
  std::vector<int64_t> ids_copy(ids), mask_copy(mask);
  const int64_t n = static_cast<int64_t>(ids.size()), seq = n / rows;
  std::vector<int64_t> pos(3 * n, -1);
  Tensor grid_i, grid_v, cu_t, mask_t;
  if (!image_grid.empty()) grid_i = Tensor(image_grid.data(), DType::i64, {int64_t(image_grid.size()) / 3, 3});
  if (!video_grid.empty()) grid_v = Tensor(video_grid.data(), DType::i64, {int64_t(video_grid.size()) / 3, 3});
  if (!cu.empty()) cu_t = Tensor(cu.data(), DType::i64, {int64_t(cu.size())});
  if (!mask.empty()) mask_t = Tensor(mask_copy.data(), DType::i64, {rows, seq});
  get_rope_index(c, Tensor(ids_copy.data(), DType::i64, {rows, seq}), mask_t, grid_i, grid_v, cu_t,
                 Tensor(pos.data(), DType::i64, {3, n}));
  return {{pos.begin(), pos.begin() + n}, {pos.begin() + n, pos.begin() + 2 * n}, {pos.begin() + 2 * n, pos.end()}};
}

constexpr int64_t I = kImagePad, V = kVideoPad, S = kVisionStart, E = kVisionEnd;

TEST(ModelRopeIndex, TextOnlyIsArangeOnAllRows) {
  const Rows r = rope({5, 6, 7, 8, 9, 10}, 2);
  const std::vector<int64_t> expected = {0, 1, 2, 0, 1, 2};
  EXPECT_EQ(r.t, expected);
  EXPECT_EQ(r.h, expected);
  EXPECT_EQ(r.w, expected);
}

TEST(ModelRopeIndex, TextOnlyPaddingKeepsArangeLikeHf) {
  // Without grids HF builds no 3-D positions; the text model's arange covers padding too.
  const Rows r = rope({5, 6, 7, 0}, 1, {1, 1, 1, 0});
  EXPECT_EQ(r.t, (std::vector<int64_t>{0, 1, 2, 3}));
}

TEST(ModelRopeIndex, OneImage) {
  // grid (1, 4, 4) -> merged 2x2 = 4 tokens starting at position 2; text resumes at 2 + max(2, 2) = 4.
  const Rows r = rope({1, S, I, I, I, I, E, 9}, 1, {}, {1, 4, 4});
  EXPECT_EQ(r.t, (std::vector<int64_t>{0, 1, 2, 2, 2, 2, 4, 5}));
  EXPECT_EQ(r.h, (std::vector<int64_t>{0, 1, 2, 2, 3, 3, 4, 5}));
  EXPECT_EQ(r.w, (std::vector<int64_t>{0, 1, 2, 3, 2, 3, 4, 5}));
}

TEST(ModelRopeIndex, NonSquareImageAdvancesByTheLongerSide) {
  // grid (1, 2, 6) -> merged 1x3: T = H = 1, W = 1..3; next text at 1 + 3 = 4.
  const Rows r = rope({S, I, I, I, E}, 1, {}, {1, 2, 6});
  EXPECT_EQ(r.t, (std::vector<int64_t>{0, 1, 1, 1, 4}));
  EXPECT_EQ(r.h, (std::vector<int64_t>{0, 1, 1, 1, 4}));
  EXPECT_EQ(r.w, (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

TEST(ModelRopeIndex, VideoSplitsIntoOneSpanPerTemporalPatch) {
  // grid (2, 4, 6) -> two frames of merged 2x3; each frame is its own span after a timestamp token.
  const Rows r = rope({S, V, V, V, V, V, V, E, 7, S, V, V, V, V, V, V, E}, 1, {}, {}, {2, 4, 6});
  EXPECT_EQ(r.t, (std::vector<int64_t>{0, 1, 1, 1, 1, 1, 1, 4, 5, 6, 7, 7, 7, 7, 7, 7, 10}));
  EXPECT_EQ(r.h, (std::vector<int64_t>{0, 1, 1, 1, 2, 2, 2, 4, 5, 6, 7, 7, 7, 8, 8, 8, 10}));
  EXPECT_EQ(r.w, (std::vector<int64_t>{0, 1, 2, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 8, 9, 10}));
}

TEST(ModelRopeIndex, ImageTextAndPaddingInOneBatch) {
  // Row 0: image; row 1: text with two padding tokens. With a grid in the batch HF gives padding 0.
  const Rows r = rope({S, I, I, I, I, E, 3, 4, 5, 6, 7, 0, 0, 0}, 2,
                      {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0}, {1, 4, 4});
  EXPECT_EQ(r.t, (std::vector<int64_t>{0, 1, 1, 1, 1, 3, 4, 0, 1, 2, 3, 4, 0, 0}));
  EXPECT_EQ(r.h, (std::vector<int64_t>{0, 1, 1, 2, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0}));
  EXPECT_EQ(r.w, (std::vector<int64_t>{0, 1, 2, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0}));
}

TEST(ModelRopeIndex, PackedDocumentsRestartPositions) {
  const Rows r = rope({S, I, I, I, I, E, 3, 4, 5}, 1, {}, {1, 4, 4}, {}, {0, 6, 9});
  EXPECT_EQ(r.t, (std::vector<int64_t>{0, 1, 1, 1, 1, 3, 0, 1, 2}));
  EXPECT_EQ(r.w, (std::vector<int64_t>{0, 1, 2, 1, 2, 3, 0, 1, 2}));
}

TEST(ModelRopeIndex, SpanLengthMustMatchItsGrid) {
  try {
    rope({S, I, I, I, E}, 1, {}, {1, 4, 4});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("image span at flat token 1 has 3 tokens, but its grid needs 4"),
              std::string::npos)
        << e.what();
  }
}

TEST(ModelRopeIndex, UnusedAndMissingGridsAreErrors) {
  EXPECT_THROW(rope({S, I, I, I, I, E}, 1, {}, {1, 4, 4, 1, 4, 4}), Error);   // second image unused
  EXPECT_THROW(rope({S, V, V, V, V, E}, 1, {}, {}, {2, 4, 4}), Error);         // second frame unused
  EXPECT_THROW(rope({S, I, I, I, I, E, I, I, I, I}, 1, {}, {1, 4, 4}), Error);  // no grid for the second span
}

TEST(ModelRopeIndex, DocumentsMayNotCrossRows) {
  EXPECT_THROW(rope({1, 2, 3, 4, 5, 6}, 2, {}, {}, {}, {0, 4, 6}), Error);
}

}  // namespace
}  // namespace q3vl::test
