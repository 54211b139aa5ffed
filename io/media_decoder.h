// The media decoder `q3vl pack` uses on real files: images through decode_image + resize_for_model (Pillow-exact
// resize under the image pixel budget), videos through decode_video (FFmpeg decode, Qwen3-VL frame sampling,
// resize under the total video budget, padding to an even frame count, one timestamp per frame pair).
#pragma once

#include "io/image_resize.h"
#include "io/packer.h"
#include "io/video.h"

namespace q3vl::io {

// Binds the resize and sampling options into pack's MediaDecoder. Throws when the options do not produce what
// shards store: a resize factor other than 32 (16-pixel patches merged 2x2), a temporal patch other than 2, or
// videos left unresized.
MediaDecoder default_media_decoder(const ImageSizeOptions& image = {}, const VideoOptions& video = {});

}  // namespace q3vl::io
