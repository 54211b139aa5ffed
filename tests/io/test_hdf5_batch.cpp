// HDF5 batch files: round trip of the input schema, an error naming file and dataset for every schema
// violation, and the output writer (arrays, scalars, groups, atomic close).
#include <gtest/gtest.h>

#include <cmath>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>

#include "core/check.h"
#include "io/hdf5_batch.h"
#include "tests/support/gradcheck.h"
#include "tests/support/test_files.h"

namespace q3vl::io {
namespace {

namespace fs = std::filesystem;
using test::TempDir;


constexpr int64_t kF = 1536;
constexpr int64_t kImage = 151655, kVideo = 151656;

// Two rows of 12 tokens: row 0 holds one 1x4x4 image (4 merged tokens), row 1 one 2x2x2 video (2 tokens) and
// right padding.
HostBatch sample_batch() {
  HostBatch b;
  b.batch = 2;
  b.seq_len = 12;
  b.input_ids = {1, 2,      kImage, kImage, kImage, kImage, 3,  4, 5, 6, 7, 8,
                 9, kVideo, kVideo, 10,     11,     12,     13, 0, 0, 0, 0, 0};
  b.attention_mask = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0};
  b.labels = {-100, -100, -100, -100, -100, -100, 3,  4,    5,    6,    7,    8,
              -100, -100, -100, 10,   11,   12,   13, -100, -100, -100, -100, -100};
  b.patch_features = kF;
  b.image_grid_thw = {1, 4, 4};
  b.video_grid_thw = {2, 2, 2};
  b.pixel_values.resize(16 * kF);
  b.pixel_values_videos.resize(8 * kF);
  for (size_t i = 0; i < b.pixel_values.size(); ++i) b.pixel_values[i] = static_cast<float>(i % 997) / 997.0f - 0.5f;
  for (size_t i = 0; i < b.pixel_values_videos.size(); ++i) b.pixel_values_videos[i] = -static_cast<float>(i % 13);
  return b;
}

BatchLimits qwen_limits() {
  BatchLimits l;
  l.vocab_size = 151936;
  l.image_token_id = kImage;
  l.video_token_id = kVideo;
  return l;
}

TEST(Hdf5Batch, BatchRoundTrips) {
  TempDir tmp;
  const HostBatch b = sample_batch();
  write_hdf5_batch(tmp / "in.h5", b);
  const HostBatch r = read_hdf5_batch(tmp / "in.h5", qwen_limits());
  EXPECT_EQ(r.batch, 2);
  EXPECT_EQ(r.seq_len, 12);
  EXPECT_EQ(r.input_ids, b.input_ids);
  EXPECT_EQ(r.attention_mask, b.attention_mask);
  EXPECT_EQ(r.labels, b.labels);
  EXPECT_EQ(r.pixel_values, b.pixel_values);
  EXPECT_EQ(r.image_grid_thw, b.image_grid_thw);
  EXPECT_EQ(r.pixel_values_videos, b.pixel_values_videos);
  EXPECT_EQ(r.video_grid_thw, b.video_grid_thw);
  EXPECT_EQ(r.num_images(), 1);
  EXPECT_EQ(r.image_patches(), 16);
  EXPECT_EQ(r.video_patches(), 8);
}

TEST(Hdf5Batch, OptionalDatasetsMayBeAbsent) {
  TempDir tmp;
  HostBatch b;
  b.batch = 1;
  b.seq_len = 3;
  b.input_ids = {5, 6, 7};
  write_hdf5_batch(tmp / "text.h5", b);
  const HostBatch r = read_hdf5_batch(tmp / "text.h5", qwen_limits());
  EXPECT_EQ(r.input_ids, b.input_ids);
  EXPECT_TRUE(r.attention_mask.empty());
  EXPECT_TRUE(r.labels.empty());
  EXPECT_EQ(r.num_images(), 0);
  EXPECT_EQ(r.num_videos(), 0);
}

struct BadCase {
  std::string name;
  std::function<void(Hdf5Writer&, const HostBatch&)> write;  // writes the whole file
  std::string message;
};

// Writes the sample batch's datasets except those `skip` names, then `extra`.
std::function<void(Hdf5Writer&, const HostBatch&)> sample_except(
    std::vector<std::string> skip, std::function<void(Hdf5Writer&, const HostBatch&)> extra) {
  return [skip, extra](Hdf5Writer& w, const HostBatch& b) {
    auto keep = [&](const char* n) { return std::find(skip.begin(), skip.end(), n) == skip.end(); };
    const std::vector<int64_t> bs{b.batch, b.seq_len};
    if (keep("input_ids")) w.write("input_ids", b.input_ids.data(), bs);
    if (keep("attention_mask")) w.write("attention_mask", b.attention_mask.data(), bs);
    if (keep("labels")) w.write("labels", b.labels.data(), bs);
    if (keep("pixel_values")) w.write("pixel_values", b.pixel_values.data(), {16, kF});
    if (keep("image_grid_thw")) w.write("image_grid_thw", b.image_grid_thw.data(), {1, 3});
    if (keep("pixel_values_videos")) w.write("pixel_values_videos", b.pixel_values_videos.data(), {8, kF});
    if (keep("video_grid_thw")) w.write("video_grid_thw", b.video_grid_thw.data(), {1, 3});
    if (extra) extra(w, b);
  };
}

TEST(Hdf5Batch, SchemaViolationsAreErrorsNamingFileAndDataset) {
  TempDir tmp;
  const HostBatch b = sample_batch();
  std::vector<int64_t> mask2 = b.attention_mask, gap = b.attention_mask, empty_row = b.attention_mask;
  mask2[3] = 2;
  gap[20] = 1;  // row 1: ones, zero at 19, one at 20
  for (int i = 12; i < 24; ++i) empty_row[static_cast<size_t>(i)] = 0;
  std::vector<int64_t> bad_labels = b.labels, bad_ids = b.input_ids;
  bad_labels[7] = -5;
  bad_ids[1] = 200000;
  std::vector<int32_t> ids32(b.input_ids.begin(), b.input_ids.end());
  std::vector<double> pix64(b.pixel_values.begin(), b.pixel_values.end());
  std::vector<float> pix_nan = b.pixel_values;
  pix_nan[kF + 5] = std::nanf("");
  const std::vector<int64_t> grid_zero{1, 0, 4}, grid_odd{1, 3, 4}, grid_big{1, 4, 6}, grid2{1, 4, 4, 1};
  // t*h*w = (2^62+1)*16 wraps to exactly the 16 pixel rows: it used to pass every check and crash the forward.
  const std::vector<int64_t> grid_wraps{(int64_t{1} << 62) + 1, 4, 4};
  auto with = [](const char* name, const std::vector<int64_t>* data, std::vector<int64_t> shape) {
    return [=](Hdf5Writer& w, const HostBatch&) { w.write(name, data->data(), shape); };
  };
  const std::vector<BadCase> cases{
      {"missing_ids", sample_except({"input_ids"}, nullptr), "required dataset 'input_ids' is missing"},
      {"unknown", sample_except({}, [](Hdf5Writer& w, const HostBatch&) { w.write_scalar("pixel_value", 1.0); }),
       "unknown dataset 'pixel_value'"},
      {"ids_int32",
       sample_except({"input_ids"},
                     [&](Hdf5Writer& w, const HostBatch&) {
                       w.write("input_ids", ids32.data(), {2, 12});
                     }),
       "dataset 'input_ids' has integer32 elements, expected int64"},
      {"pixels_f64",
       sample_except({"pixel_values"},
                     [&](Hdf5Writer& w, const HostBatch&) {
                       w.write("pixel_values", pix64.data(), {16, kF});
                     }),
       "dataset 'pixel_values' has float64 elements, expected float32"},
      {"ids_rank1", sample_except({"input_ids"}, with("input_ids", &b.input_ids, {24})),
       "dataset 'input_ids' has rank 1, expected 2"},
      {"mask_shape", sample_except({"attention_mask"}, with("attention_mask", &b.attention_mask, {1, 24})),
       "dataset 'attention_mask' has shape [1,24], expected [2,12] like input_ids"},
      {"mask_value", sample_except({"attention_mask"}, with("attention_mask", &mask2, {2, 12})),
       "dataset 'attention_mask' has value 2 at [0,3], expected 0 or 1"},
      {"mask_gap", sample_except({"attention_mask"}, with("attention_mask", &gap, {2, 12})),
       "dataset 'attention_mask' row 1 is not right-padded (a 1 follows a 0 at position 8)"},
      {"mask_empty_row", sample_except({"attention_mask"}, with("attention_mask", &empty_row, {2, 12})),
       "dataset 'attention_mask' row 1 has no tokens"},
      {"labels_value", sample_except({"labels"}, with("labels", &bad_labels, {2, 12})),
       "dataset 'labels' has value -5 at [0,7], expected -100 or a token id"},
      {"ids_vocab", sample_except({"input_ids"}, with("input_ids", &bad_ids, {2, 12})),
       "dataset 'input_ids' has token 200000 at [0,1], not a token id of the vocabulary of 151936"},
      {"pixels_alone", sample_except({"image_grid_thw"}, nullptr), "dataset 'pixel_values' needs 'image_grid_thw' too"},
      {"grid_alone", sample_except({"pixel_values_videos"}, nullptr),
       "dataset 'video_grid_thw' needs 'pixel_values_videos' too"},
      {"grid_cols", sample_except({"image_grid_thw"}, with("image_grid_thw", &grid2, {1, 4})),
       "dataset 'image_grid_thw' has shape [1,4], expected [n,3]"},
      {"grid_zero", sample_except({"image_grid_thw"}, with("image_grid_thw", &grid_zero, {1, 3})),
       "dataset 'image_grid_thw' row 0 = [1,0,4] has an entry below 1"},
      {"grid_odd", sample_except({"image_grid_thw"}, with("image_grid_thw", &grid_odd, {1, 3})),
       "h and w must be multiples of the spatial merge size 2"},
      {"grid_rows", sample_except({"image_grid_thw"}, with("image_grid_thw", &grid_big, {1, 3})),
       "dataset 'pixel_values' has 16 rows but 'image_grid_thw' sums to 24 patches"},
      {"pixels_nan",
       sample_except({"pixel_values"},
                     [&](Hdf5Writer& w, const HostBatch&) {
                       w.write("pixel_values", pix_nan.data(), {16, kF});
                     }),
       "dataset 'pixel_values' has value nan at [1,5], expected a finite number"},
      {"grid_overflow", sample_except({"image_grid_thw"}, with("image_grid_thw", &grid_wraps, {1, 3})),
       "dataset 'image_grid_thw' row 0 = [4611686018427387905,4,4]: the patch count t*h*w (summed over rows) "
       "overflows int64"},
      {"features",
       sample_except({"pixel_values"},
                     [&](Hdf5Writer& w, const HostBatch& s) {
                       w.write("pixel_values", s.pixel_values.data(), {24, 1024});
                     }),
       "dataset 'pixel_values' has shape [24,1024], expected [N,1536]"},
  };
  for (const BadCase& c : cases) {
    const std::string path = tmp / (c.name + ".h5");
    Hdf5Writer w(path);
    c.write(w, b);
    w.close();
    SCOPED_TRACE(c.name);
    test::expect_error([&] { read_hdf5_batch(path, qwen_limits()); }, "hdf5 " + path + ": ");
    test::expect_error([&] { read_hdf5_batch(path, qwen_limits()); }, c.message);
  }
}

TEST(Hdf5Batch, VisualTokenCountsMustMatchTheGrids) {
  TempDir tmp;
  HostBatch b = sample_batch();
  b.input_ids[2] = 42;  // one image token fewer than the 1x4x4 grid needs
  write_hdf5_batch(tmp / "in.h5", b);
  test::expect_error([&] { read_hdf5_batch(tmp / "in.h5", qwen_limits()); },
                     "input_ids holds 3 tokens 151655 but 'image_grid_thw' needs 4 (patches / 4)");
  read_hdf5_batch(tmp / "in.h5");  // without token ids in the limits the counts are not checked
}

TEST(Hdf5Batch, UnreadableFilesAreErrors) {
  TempDir tmp;
  test::expect_error([&] { read_hdf5_batch(tmp / "none.h5"); }, "none.h5 does not exist");
  std::ofstream(tmp / "text.h5") << "not hdf5";
  test::expect_error([&] { read_hdf5_batch(tmp / "text.h5"); }, "text.h5 is not an HDF5 file");
  write_hdf5_batch(tmp / "full.h5", sample_batch());
  std::ifstream in(tmp / "full.h5", std::ios::binary);
  const std::string bytes{std::istreambuf_iterator<char>(in), {}};
  std::ofstream(tmp / "cut.h5", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  test::expect_error([&] { read_hdf5_batch(tmp / "cut.h5"); }, tmp / "cut.h5");
}

TEST(Hdf5Writer, WritesArraysScalarsAndGroups) {
  TempDir tmp;
  std::vector<float> logits(2 * 3 * 5);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.25f * static_cast<float>(i) - 3.0f;
  std::vector<double> grad{1.0 / 3.0, -2.5};
  {
    Hdf5Writer w(tmp / "out.h5");
    w.write("logits", logits.data(), {2, 3, 5});
    w.write("grads/model.visual.pos_embed.weight", Tensor(grad.data(), DType::f64, {2}));
    w.write_scalar("loss", 1.2345678901234);
    w.write_scalar("tokens", int64_t{17});
    EXPECT_FALSE(fs::exists(tmp / "out.h5"));  // only the temporary exists until close()
    test::expect_error([&] { w.write("logits", logits.data(), {30}); }, "cannot create dataset 'logits'");
    w.close();
  }
  EXPECT_FALSE(fs::exists(tmp / "out.h5.tmp"));
  const F32Array l = read_hdf5_f32(tmp / "out.h5", "logits");
  EXPECT_EQ(l.shape, (std::vector<int64_t>{2, 3, 5}));
  EXPECT_EQ(l.data, logits);
  const F32Array g = read_hdf5_f32(tmp / "out.h5", "grads/model.visual.pos_embed.weight");
  EXPECT_EQ(g.data, (std::vector<float>{static_cast<float>(1.0 / 3.0), -2.5f}));
  EXPECT_EQ(read_hdf5_scalar(tmp / "out.h5", "loss"), 1.2345678901234);
  EXPECT_EQ(read_hdf5_scalar(tmp / "out.h5", "tokens"), 17.0);
  test::expect_error([&] { read_hdf5_f32(tmp / "out.h5", "tokens"); }, "dataset 'tokens' has integer64 elements");
  test::expect_error([&] { read_hdf5_scalar(tmp / "out.h5", "logits"); }, "dataset 'logits' is not a scalar");
  test::expect_error([&] { read_hdf5_f32(tmp / "out.h5", "nope"); }, "cannot open dataset 'nope'");
}

TEST(Hdf5Writer, AnUnclosedWriterLeavesNoFile) {
  TempDir tmp;
  {
    Hdf5Writer w(tmp / "partial.h5");
    w.write_scalar("loss", 1.0);
  }
  EXPECT_FALSE(fs::exists(tmp / "partial.h5"));
  EXPECT_FALSE(fs::exists(tmp / "partial.h5.tmp"));
}

}  // namespace
}  // namespace q3vl::io
