// Image decoding to upright 8-bit RGB, the way Hugging Face's Qwen-VL image path sees a file: PIL opens it,
// ImageOps.exif_transpose applies the EXIF orientation, and the processor's convert_to_rgb composites any
// transparency onto white (or, with AlphaMode::drop, PIL's plain convert("RGB") which discards alpha).
//
// Formats: JPEG (libjpeg-turbo, integer slow DCT and fancy upsampling as PIL uses it, so pixels are identical;
// grayscale replicated, CMYK/YCCK converted like PIL), PNG (libpng: palette, grayscale, tRNS, alpha, 16-bit
// reduced to the high byte, interlaced; orientation from an eXIf chunk) and WebP (libwebp). The format is
// detected from the leading bytes, not from the file name. Every error names the file.
//
// The Image type itself is header-only: the loader (q3vl_io, patchify.h) fills Images from shards, while the
// decoders below live in q3vl_io_media (io/CMakeLists.txt), which the training binary does not link.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace q3vl::io {

// Row-major height x width x 3 RGB, 8 bits per channel.
struct Image {
  int64_t height = 0;
  int64_t width = 0;
  std::vector<uint8_t> pixels;

  Image() = default;
  Image(int64_t h, int64_t w) : height(h), width(w), pixels(static_cast<size_t>(h * w * 3), 0) {}  // zero-filled
  uint8_t* row(int64_t y) { return pixels.data() + y * width * 3; }
  const uint8_t* row(int64_t y) const { return pixels.data() + y * width * 3; }
};

enum class AlphaMode {
  composite_white,  // transformers' convert_to_rgb (PIL.Image.alpha_composite over opaque white)
  drop,             // PIL convert("RGB"): colour kept, alpha discarded
};

struct ImageDecodeOptions {
  AlphaMode alpha = AlphaMode::composite_white;
  bool apply_exif_orientation = true;
};

Image decode_image(const std::string& path, const ImageDecodeOptions& options = {});
// Decodes an in-memory file; `what` names it in errors.
Image decode_image_bytes(std::span<const uint8_t> bytes, const std::string& what, const ImageDecodeOptions& options = {});

// The EXIF orientation (1..8) stored in a TIFF-structured EXIF block (starting at the "II*\0"/"MM\0*" header),
// or 1 when it is absent or malformed.
int exif_orientation(std::span<const uint8_t> tiff);
// Returns the image turned upright for EXIF orientation 1..8 (PIL's exif_transpose mapping).
Image apply_exif_orientation(const Image& image, int orientation);

}  // namespace q3vl::io
