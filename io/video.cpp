// FFmpeg-based video decoding with Qwen3-VL's frame sampling, sizing and timestamps.
#include "io/video.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/imgutils.h>
#include <libswscale/swscale.h>
}

#include "core/check.h"
#include "io/image_resize.h"

namespace q3vl::io {

namespace {

std::string av_error(int code) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {};
  av_strerror(code, buf, sizeof(buf));
  return buf;
}

struct FormatCloser {
  void operator()(AVFormatContext* ctx) const { avformat_close_input(&ctx); }
};
struct CodecCloser {
  void operator()(AVCodecContext* ctx) const { avcodec_free_context(&ctx); }
};
struct PacketFreer {
  void operator()(AVPacket* p) const { av_packet_free(&p); }
};
struct FrameFreer {
  void operator()(AVFrame* f) const { av_frame_free(&f); }
};
struct SwsFreer {
  void operator()(SwsContext* s) const { sws_freeContext(s); }
};

using FormatPtr = std::unique_ptr<AVFormatContext, FormatCloser>;

// FFmpeg logs its own lines to stderr (a damaged file's warnings, one per packet); our errors already name the
// file and what failed, so they are kept quiet unless Q3VL_DEBUG=1 (also set by --debug) asks for them.
void quiet_ffmpeg_unless_debugging() {
  const char* debug = std::getenv("Q3VL_DEBUG");
  av_log_set_level(debug != nullptr && std::strcmp(debug, "1") == 0 ? AV_LOG_INFO : AV_LOG_QUIET);
}

// Opens `path` and finds its first video stream (FFmpeg's "best" video stream).
FormatPtr open_video(const std::string& path, int& stream_index) {
  quiet_ffmpeg_unless_debugging();
  AVFormatContext* raw = nullptr;
  int rc = avformat_open_input(&raw, path.c_str(), nullptr, nullptr);
  Q3VL_CHECK(rc >= 0, "video ", path, ": cannot open: ", av_error(rc));
  FormatPtr ctx(raw);
  rc = avformat_find_stream_info(ctx.get(), nullptr);
  Q3VL_CHECK(rc >= 0, "video ", path, ": cannot read stream information: ", av_error(rc));
  stream_index = av_find_best_stream(ctx.get(), AVMEDIA_TYPE_VIDEO, -1, -1, nullptr, 0);
  Q3VL_CHECK(stream_index >= 0, "video ", path, ": no video stream");
  return ctx;
}

// PyAV's average_rate (the stream's avg_frame_rate); falls back to the guessed rate when the container has none.
double stream_fps(AVFormatContext* ctx, int stream_index, const std::string& path) {
  AVStream* stream = ctx->streams[stream_index];
  AVRational rate = stream->avg_frame_rate;
  if (rate.num <= 0 || rate.den <= 0) rate = av_guess_frame_rate(ctx, stream, nullptr);
  Q3VL_CHECK(rate.num > 0 && rate.den > 0, "video ", path, ": unknown frame rate");
  return static_cast<double>(rate.num) / static_cast<double>(rate.den);
}

int64_t count_packets(AVFormatContext* ctx, int stream_index, const std::string& path) {
  std::unique_ptr<AVPacket, PacketFreer> packet(av_packet_alloc());
  int64_t count = 0;
  for (;;) {
    const int rc = av_read_frame(ctx, packet.get());
    if (rc == AVERROR_EOF) break;
    Q3VL_CHECK(rc >= 0, "video ", path, ": cannot read: ", av_error(rc));
    if (packet->stream_index == stream_index) ++count;
    av_packet_unref(packet.get());
  }
  return count;
}

// numpy.round (half to even), as applied to linspace's doubles.
int64_t round_half_even(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

}  // namespace

VideoInfo probe_video(const std::string& path) {
  int stream_index = -1;
  FormatPtr ctx = open_video(path, stream_index);
  VideoInfo info;
  info.fps = stream_fps(ctx.get(), stream_index, path);
  info.height = ctx->streams[stream_index]->codecpar->height;
  info.width = ctx->streams[stream_index]->codecpar->width;
  info.total_frames = count_packets(ctx.get(), stream_index, path);
  Q3VL_CHECK(info.total_frames > 0, "video ", path, ": no frames");
  return info;
}

std::vector<int64_t> sample_frame_indices(int64_t total_frames, double video_fps, const VideoOptions& o) {
  Q3VL_CHECK(total_frames > 0, "sample_frame_indices: total_frames ", total_frames, " must be positive");
  Q3VL_CHECK(video_fps > 0, "sample_frame_indices: video fps ", video_fps, " must be positive");
  Q3VL_CHECK(o.fps > 0 && o.min_frames > 0 && o.max_frames >= o.min_frames, "sample_frame_indices: fps ", o.fps,
             ", min_frames ", o.min_frames, ", max_frames ", o.max_frames, " are not valid");
  int64_t n = static_cast<int64_t>(static_cast<double>(total_frames) / video_fps * o.fps);
  n = std::min({std::max(n, o.min_frames), o.max_frames, total_frames});
  // numpy.linspace(0, total - 1, n): i * step, the last element set to the end point exactly.
  std::vector<int64_t> indices(static_cast<size_t>(n));
  if (n == 1) {
    indices[0] = 0;
    return indices;
  }
  const double step = static_cast<double>(total_frames - 1) / static_cast<double>(n - 1);
  for (int64_t i = 0; i < n - 1; ++i) indices[i] = round_half_even(static_cast<double>(i) * step);
  indices[n - 1] = total_frames - 1;
  return indices;
}

std::vector<double> frame_pair_timestamps(const std::vector<int64_t>& indices, double video_fps,
                                          int64_t temporal_patch_size) {
  Q3VL_CHECK(!indices.empty(), "frame_pair_timestamps: no indices");
  Q3VL_CHECK(temporal_patch_size > 0, "frame_pair_timestamps: temporal_patch_size must be positive");
  std::vector<int64_t> padded = indices;
  while (padded.size() % temporal_patch_size != 0) padded.push_back(padded.back());
  std::vector<double> timestamps;
  for (size_t i = 0; i < padded.size(); i += temporal_patch_size) {
    const double first = static_cast<double>(padded[i]) / video_fps;
    const double last = static_cast<double>(padded[i + temporal_patch_size - 1]) / video_fps;
    timestamps.push_back((first + last) / 2);
  }
  return timestamps;
}

std::pair<int64_t, int64_t> video_frame_size(int64_t num_frames, int64_t height, int64_t width,
                                             const VideoOptions& o) {
  int64_t max_pixels = o.max_pixels;
  if (o.cap_pixels_per_frame) {
    const int64_t frame_cap = o.max_video_tokens * o.factor * o.factor;
    const int64_t floor_pixels = static_cast<int64_t>(static_cast<double>(o.min_pixels) * 1.05);
    max_pixels = std::max(std::min(frame_cap, o.max_pixels / num_frames), floor_pixels) * num_frames;
  }
  return smart_resize_video(num_frames, height, width, o.temporal_patch_size, o.factor, o.min_pixels, max_pixels);
}

VideoClip decode_video(const std::string& path, const VideoOptions& o) {
  const VideoInfo info = probe_video(path);
  VideoClip clip;
  clip.fps = info.fps;
  clip.total_frames = info.total_frames;
  clip.indices = sample_frame_indices(info.total_frames, info.fps, o);
  const int64_t sampled = static_cast<int64_t>(clip.indices.size());

  int stream_index = -1;
  FormatPtr fmt = open_video(path, stream_index);
  AVStream* stream = fmt->streams[stream_index];
  const AVCodec* codec = avcodec_find_decoder(stream->codecpar->codec_id);
  Q3VL_CHECK(codec, "video ", path, ": no decoder for codec ", avcodec_get_name(stream->codecpar->codec_id));
  std::unique_ptr<AVCodecContext, CodecCloser> dec(avcodec_alloc_context3(codec));
  int rc = avcodec_parameters_to_context(dec.get(), stream->codecpar);
  Q3VL_CHECK(rc >= 0, "video ", path, ": bad codec parameters: ", av_error(rc));
  rc = avcodec_open2(dec.get(), codec, nullptr);
  Q3VL_CHECK(rc >= 0, "video ", path, ": cannot open decoder: ", av_error(rc));

  std::unique_ptr<AVPacket, PacketFreer> packet(av_packet_alloc());
  std::unique_ptr<AVFrame, FrameFreer> frame(av_frame_alloc());
  std::unique_ptr<SwsContext, SwsFreer> sws;
  int64_t decoded = 0;      // frames output by the decoder so far
  size_t next = 0;          // next wanted entry of clip.indices
  std::vector<Image> raw;   // decoded RGB frames at the sampled indices, in order

  // Converts the current frame to RGB24 once per wanted index (indices can repeat when n > total).
  auto take_frame = [&]() {
    while (next < clip.indices.size() && clip.indices[next] == decoded) {
      Image img(frame->height, frame->width);
      sws.reset(sws_getCachedContext(sws.release(), frame->width, frame->height,
                                     static_cast<AVPixelFormat>(frame->format), frame->width, frame->height,
                                     AV_PIX_FMT_RGB24, SWS_BICUBIC, nullptr, nullptr, nullptr));
      Q3VL_CHECK(sws, "video ", path, ": cannot convert pixel format ",
                 av_get_pix_fmt_name(static_cast<AVPixelFormat>(frame->format)), " to RGB");
      // The frame's colour matrix and range (BT.601 when unspecified), as a player shows it.
      const int space = frame->colorspace == AVCOL_SPC_UNSPECIFIED ? SWS_CS_DEFAULT : frame->colorspace;
      const int full_range = frame->color_range == AVCOL_RANGE_JPEG ? 1 : 0;
      sws_setColorspaceDetails(sws.get(), sws_getCoefficients(space), full_range, sws_getCoefficients(SWS_CS_DEFAULT),
                               1, 0, 1 << 16, 1 << 16);
      uint8_t* dst[4] = {img.pixels.data(), nullptr, nullptr, nullptr};
      int dst_stride[4] = {static_cast<int>(img.width * 3), 0, 0, 0};
      sws_scale(sws.get(), frame->data, frame->linesize, 0, frame->height, dst, dst_stride);
      raw.push_back(std::move(img));
      ++next;
    }
    ++decoded;
  };
  auto drain = [&]() {
    for (;;) {
      const int r = avcodec_receive_frame(dec.get(), frame.get());
      if (r == AVERROR(EAGAIN) || r == AVERROR_EOF) return;
      Q3VL_CHECK(r >= 0, "video ", path, ": decoding failed at frame ", decoded, ": ", av_error(r));
      take_frame();
      av_frame_unref(frame.get());
    }
  };
  while (next < clip.indices.size()) {
    rc = av_read_frame(fmt.get(), packet.get());
    if (rc == AVERROR_EOF) break;
    Q3VL_CHECK(rc >= 0, "video ", path, ": cannot read: ", av_error(rc));
    if (packet->stream_index == stream_index) {
      rc = avcodec_send_packet(dec.get(), packet.get());
      Q3VL_CHECK(rc >= 0, "video ", path, ": decoding failed near frame ", decoded, ": ", av_error(rc));
      drain();
    }
    av_packet_unref(packet.get());
  }
  if (next < clip.indices.size()) {
    avcodec_send_packet(dec.get(), nullptr);
    drain();
  }
  Q3VL_CHECK(next == clip.indices.size(), "video ", path, ": decoded ", decoded, " frames of ", info.total_frames,
             ", frame ", clip.indices[next], " is missing");

  if (o.resize) {
    const auto [h, w] = video_frame_size(sampled, raw[0].height, raw[0].width, o);
    for (Image& img : raw) img = resize_bicubic(img, h, w);
  }
  while (static_cast<int64_t>(raw.size()) % o.temporal_patch_size != 0) {
    raw.push_back(raw.back());
    clip.indices.push_back(clip.indices.back());
  }
  clip.frames = std::move(raw);
  clip.timestamps = frame_pair_timestamps(clip.indices, clip.fps, o.temporal_patch_size);
  return clip;
}

}  // namespace q3vl::io
