// Video decoding and Qwen3-VL frame sampling against tests/io/media_reference: sampling indices and per-pair
// timestamps from transformers' own sample_frames / _calculate_timestamps (exact), video smart_resize (exact),
// and on every real video in ../shared/data/mllm-demo the frame count, frame rate, indices, timestamps, resized
// size, grid_thw, and 8x8 block means of every sampled frame against PyAV's decode (transformers' pyav backend).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "io/image_resize.h"
#include "io/patchify.h"
#include "io/video.h"
#include "tests/support/gradcheck.h"

namespace q3vl::io {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::expect_error;

const std::string kReference = std::string(Q3VL_SOURCE_DIR) + "/tests/io/media_reference";
const std::string kData = std::string(Q3VL_SHARED_DIR) + "/data";

json load_reference() {
  std::ifstream in(kReference + "/reference.json");
  EXPECT_TRUE(in) << "missing " << kReference << "/reference.json";
  return json::parse(in);
}

TEST(MediaVideo, SamplingMatchesHf) {
  const json ref = load_reference();
  ASSERT_GT(ref["sampling"].size(), 40u);
  for (const json& c : ref["sampling"]) {
    SCOPED_TRACE(c.dump());
    const double fps = static_cast<double>(c["fps_num"].get<int64_t>()) / c["fps_den"].get<int64_t>();
    VideoOptions o;
    o.fps = c["sample_fps"];
    const std::vector<int64_t> indices = sample_frame_indices(c["total"], fps, o);
    EXPECT_EQ(indices, c["indices"].get<std::vector<int64_t>>());
    // Same double operations in the same order as Python: exact equality.
    EXPECT_EQ(frame_pair_timestamps(indices, fps, 2), c["timestamps"].get<std::vector<double>>());
  }
}

TEST(MediaVideo, SmartResizeVideoMatchesHf) {
  const json ref = load_reference();
  for (const json& c : ref["smart_resize_video"]) {
    const auto in = c["in"].get<std::vector<int64_t>>();
    SCOPED_TRACE(c.dump());
    if (c["out"].is_null()) {
      expect_error([&] { smart_resize_video(in[0], in[1], in[2], in[3], in[4], in[5], in[6]); }, "aspect ratio");
    } else {
      const auto [h, w] = smart_resize_video(in[0], in[1], in[2], in[3], in[4], in[5], in[6]);
      EXPECT_EQ(std::vector<int64_t>({h, w}), c["out"].get<std::vector<int64_t>>());
    }
  }
  expect_error([] { smart_resize_video(1, 64, 64, 2, 32, 1, 1 << 30); }, "1 frames, must be at least");
}

// Block means of a frame over the generator's 8x8 grid (numpy linspace bounds, truncated).
std::vector<double> block_means(const Image& f) {
  std::vector<double> means;
  for (int i = 0; i < 8; ++i) {
    const int64_t y0 = f.height * i / 8, y1 = f.height * (i + 1) / 8;
    for (int j = 0; j < 8; ++j) {
      const int64_t x0 = f.width * j / 8, x1 = f.width * (j + 1) / 8;
      for (int c = 0; c < 3; ++c) {
        double sum = 0;
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t x = x0; x < x1; ++x) sum += f.row(y)[x * 3 + c];
        }
        means.push_back(sum / static_cast<double>((y1 - y0) * (x1 - x0)));
      }
    }
  }
  return means;
}

TEST(MediaVideo, RealVideosMatchHf) {
  const json ref = load_reference();
  ASSERT_EQ(ref["videos"].size(), 4u);
  double worst = 0;
  for (const json& v : ref["videos"]) {
    const std::string path = kData + "/" + v["file"].get<std::string>();
    SCOPED_TRACE(path);
    const VideoInfo info = probe_video(path);
    EXPECT_EQ(info.total_frames, v["total_frames"].get<int64_t>());
    EXPECT_EQ(info.fps, static_cast<double>(v["fps_num"].get<int64_t>()) / v["fps_den"].get<int64_t>());
    EXPECT_EQ(info.height, v["size"][0].get<int64_t>());
    EXPECT_EQ(info.width, v["size"][1].get<int64_t>());

    const VideoClip clip = decode_video(path);
    std::vector<int64_t> expected_indices = v["indices"].get<std::vector<int64_t>>();
    const size_t sampled = expected_indices.size();
    if (sampled % 2) expected_indices.push_back(expected_indices.back());
    EXPECT_EQ(clip.indices, expected_indices);
    EXPECT_EQ(clip.timestamps, v["timestamps"].get<std::vector<double>>());
    EXPECT_EQ(clip.total_frames, info.total_frames);
    ASSERT_EQ(clip.frames.size(), expected_indices.size());
    for (const Image& f : clip.frames) {
      EXPECT_EQ(f.height, v["resized"][0].get<int64_t>());
      EXPECT_EQ(f.width, v["resized"][1].get<int64_t>());
    }
    const PatchGrid grid = patch_grid(static_cast<int64_t>(clip.frames.size()), clip.frames[0].height,
                                      clip.frames[0].width);
    EXPECT_EQ(std::vector<int64_t>({grid.t, grid.h, grid.w}), v["grid_thw"].get<std::vector<int64_t>>());

    // Decoded (not resized) frames against PyAV's rgb24 frames, compared through 8x8 block means.
    VideoOptions raw_options;
    raw_options.resize = false;
    const VideoClip raw = decode_video(path, raw_options);
    ASSERT_GE(raw.frames.size(), sampled);
    for (size_t k = 0; k < sampled; ++k) {
      const std::vector<double> mine = block_means(raw.frames[k]);
      std::vector<double> theirs;
      for (const json& row : v["block_means"][k]) {
        for (const json& cell : row) {
          for (const json& value : cell) theirs.push_back(value.get<double>());
        }
      }
      ASSERT_EQ(mine.size(), theirs.size());
      for (size_t i = 0; i < mine.size(); ++i) worst = std::max(worst, std::abs(mine[i] - theirs[i]));
    }
  }
  std::printf("media: 4 videos; largest 8x8 block-mean difference to PyAV's rgb24 frames: %.4f levels\n", worst);
  // Block means are stored rounded to 1e-3; a wrong frame or colour matrix moves them by whole levels. Half a
  // level allows FFmpeg-version differences in YUV->RGB rounding (PyAV bundles its own FFmpeg build).
  EXPECT_LT(worst, 0.5);
}

TEST(MediaVideo, OptionsChangeSamplingAndSize) {
  const std::string path = kData + "/mllm-demo/4.mp4";  // 150 frames at 30 fps, 224x224
  VideoOptions o;
  o.fps = 1.0;
  const VideoClip one = decode_video(path, o);
  // linspace(0, 149, 5) = 0, 37.25, 74.5, 111.75, 149; numpy rounds the tie 74.5 to even. 5 sampled, padded to 6.
  EXPECT_EQ(one.indices, std::vector<int64_t>({0, 37, 74, 112, 149, 149}));
  ASSERT_EQ(one.timestamps.size(), 3u);
  EXPECT_DOUBLE_EQ(one.timestamps[0], (0 + 37) / 30.0 / 2);
  EXPECT_DOUBLE_EQ(one.timestamps[1], (74 + 112) / 30.0 / 2);
  EXPECT_DOUBLE_EQ(one.timestamps[2], 149 / 30.0);
  // The last frame is repeated, not re-decoded.
  EXPECT_EQ(one.frames[4].pixels, one.frames[5].pixels);

  o = VideoOptions{};
  o.max_frames = 6;
  EXPECT_EQ(decode_video(path, o).indices.size(), 6u);
  // A tight budget shrinks every frame: 10 frames x 128 x 128 = 163840 pixels.
  o = VideoOptions{};
  o.max_pixels = 10 * 128 * 128;
  const VideoClip small = decode_video(path, o);
  EXPECT_EQ(small.frames[0].height, 128);
  EXPECT_EQ(small.frames[0].width, 128);
  // transformers' per-frame cap: min(768 tokens * 32^2, budget / frames) per frame, floored at 1.05 * min_pixels.
  o = VideoOptions{};
  o.cap_pixels_per_frame = true;
  o.max_pixels = 10 * 64 * 64;
  EXPECT_EQ(video_frame_size(10, 224, 224, o), std::make_pair(int64_t{64}, int64_t{64}));
}

TEST(MediaVideo, ErrorsNameTheFile) {
  const std::string missing = kData + "/mllm-demo/missing.mp4";
  expect_error([&] { decode_video(missing); }, "video " + missing + ": cannot open");
  const fs::path dir = fs::temp_directory_path() / ("q3vl_media_video_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string junk = (dir / "junk.mp4").string();
  std::ofstream(junk, std::ios::binary) << std::string(4096, '\x5a');
  expect_error([&] { decode_video(junk); }, "video " + junk + ": ");
  // A file cut in half: the container index promises frames that are not there.
  std::ifstream in(kData + "/mllm-demo/2.avi", std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string cut = (dir / "cut.avi").string();
  std::ofstream(cut, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  try {
    const VideoClip clip = decode_video(cut);
    // If FFmpeg reads a shorter stream cleanly, the frame count must reflect what is really there.
    EXPECT_LT(clip.total_frames, 270);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("video " + cut), std::string::npos) << e.what();
  }
  expect_error([] { sample_frame_indices(0, 30, {}); }, "total_frames 0 must be positive");
  expect_error([] { frame_pair_timestamps({}, 30, 2); }, "no indices");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace q3vl::io
