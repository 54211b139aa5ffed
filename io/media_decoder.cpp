// pack's MediaDecoder over the real image and video decoders.
#include "io/media_decoder.h"

#include "core/check.h"
#include "io/image.h"
#include "io/shard_format.h"

namespace q3vl::io {

MediaDecoder default_media_decoder(const ImageSizeOptions& image, const VideoOptions& video) {
  constexpr int64_t kFactor = 2 * kPatchSize;
  Q3VL_CHECK(image.factor == kFactor, "media decoder: image resize factor is ", image.factor,
             ", shards need ", kFactor, " (16-pixel patches merged 2x2)");
  Q3VL_CHECK(video.factor == kFactor, "media decoder: video resize factor is ", video.factor,
             ", shards need ", kFactor, " (16-pixel patches merged 2x2)");
  Q3VL_CHECK(video.temporal_patch_size == kTemporalPatchSize, "media decoder: video temporal patch size is ",
             video.temporal_patch_size, ", shards need ", kTemporalPatchSize);
  Q3VL_CHECK(video.resize, "media decoder: videos must be resized for shards (VideoOptions::resize is off)");
  MediaDecoder media;
  media.image = [image](const std::string& path) {
    Image resized = resize_for_model(decode_image(path), image);
    DecodedMedia d;
    d.frames = 1;
    d.height = static_cast<int32_t>(resized.height);
    d.width = static_cast<int32_t>(resized.width);
    d.pixels = std::move(resized.pixels);
    return d;
  };
  media.video = [video](const std::string& path) {
    VideoClip clip = decode_video(path, video);
    Q3VL_CHECK(!clip.frames.empty(), "video ", path, ": no frames decoded");
    DecodedMedia d;
    d.frames = static_cast<int32_t>(clip.frames.size());
    d.height = static_cast<int32_t>(clip.frames[0].height);
    d.width = static_cast<int32_t>(clip.frames[0].width);
    const size_t frame_bytes = static_cast<size_t>(d.height) * d.width * 3;
    d.pixels.reserve(frame_bytes * clip.frames.size());
    for (const Image& frame : clip.frames) {
      Q3VL_CHECK(frame.pixels.size() == frame_bytes, "video ", path, ": frames differ in size");
      d.pixels.insert(d.pixels.end(), frame.pixels.begin(), frame.pixels.end());
    }
    d.timestamps = std::move(clip.timestamps);
    return d;
  };
  return media;
}

}  // namespace q3vl::io
