// Video decoding (FFmpeg's libavformat/libavcodec/libswscale) and Qwen3-VL's frame sampling, as transformers'
// Qwen3VLVideoProcessor and Qwen3VLProcessor do it:
// - frame count n = int(total_frames / video_fps * fps), clamped to [min_frames, max_frames] and to
//   total_frames; indices = round-half-even(linspace(0, total_frames - 1, n)) in numpy's arithmetic;
// - every sampled frame resized (Pillow bicubic) to smart_resize_video(n, h, w) under the total pixel budget;
// - frames padded to a multiple of temporal_patch_size by repeating the last one (indices likewise);
// - one timestamp per frame pair: the mean of index / video_fps over the pair (`<%.1f seconds>` in the text).
// total_frames counts the video packets of the stream (torchcodec's exact scan; equal to the container's frame
// count on well-formed files) and video_fps is the stream's average frame rate (PyAV's average_rate).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "io/image.h"

namespace q3vl::io {

struct VideoOptions {
  double fps = 2.0;                // frames sampled per second of video
  int64_t min_frames = 4;
  int64_t max_frames = 768;
  bool resize = true;              // false keeps the decoded size (no smart_resize)
  int64_t temporal_patch_size = 2;
  int64_t factor = 32;             // patch_size * merge_size
  int64_t min_pixels = 4096;       // size.shortest_edge of Qwen3-VL's video_preprocessor_config
  int64_t max_pixels = 25165824;   // size.longest_edge: budget over all sampled frames
  // transformers' cap_pixels_per_frame (qwen-vl-utils' behaviour), off by default as in transformers.
  bool cap_pixels_per_frame = false;
  int64_t max_video_tokens = 768;
};

struct VideoInfo {
  int64_t total_frames = 0;
  double fps = 0.0;
  int64_t height = 0;
  int64_t width = 0;
};

struct VideoClip {
  std::vector<Image> frames;        // sampled, resized, padded to a multiple of temporal_patch_size
  std::vector<int64_t> indices;     // source frame index of each entry of `frames`
  std::vector<double> timestamps;   // seconds, one per temporal patch (frame pair)
  double fps = 0.0;                 // the source's average frame rate
  int64_t total_frames = 0;         // frames in the source
};

// Frame count, average frame rate and size of the first video stream; errors name the file.
VideoInfo probe_video(const std::string& path);

// Qwen3VLVideoProcessor.sample_frames: the source indices to decode.
std::vector<int64_t> sample_frame_indices(int64_t total_frames, double video_fps, const VideoOptions& options = {});

// Qwen3VLProcessor._calculate_timestamps: pads `indices` to a multiple of temporal_patch_size with the last
// index, then averages index / video_fps over each group.
std::vector<double> frame_pair_timestamps(const std::vector<int64_t>& indices, double video_fps,
                                          int64_t temporal_patch_size);

// The per-frame target size for `num_frames` sampled frames of height x width (smart_resize_video with the
// options' budget, including the optional per-frame cap).
std::pair<int64_t, int64_t> video_frame_size(int64_t num_frames, int64_t height, int64_t width,
                                             const VideoOptions& options = {});

VideoClip decode_video(const std::string& path, const VideoOptions& options = {});

}  // namespace q3vl::io
