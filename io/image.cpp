// Image decoding: format sniffing, libjpeg/libpng/libwebp readers into RGBA8, EXIF orientation, and the
// conversion to RGB8 (white compositing or alpha drop) with PIL's integer arithmetic.
#include "io/image.h"

#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <webp/decode.h>

#include "core/check.h"

namespace q3vl::io {

namespace {

// A decoded file before RGB conversion: RGBA8 pixels plus whether the alpha channel carries information
// (PIL's "has_alpha": an alpha band or a transparency entry), and the raw EXIF block if one was found.
struct Rgba {
  int64_t height = 0;
  int64_t width = 0;
  std::vector<uint8_t> pixels;  // h * w * 4
  bool has_alpha = false;
  std::vector<uint8_t> exif;    // TIFF structure, starting at the byte-order mark
};

// ---- JPEG -------------------------------------------------------------------------------------------------

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// A truncated file is an error (PIL raises "image file is truncated"); libjpeg only warns and pads with grey.
// Other warnings (extraneous bytes and the like) are ignored, as PIL ignores them.
void jpeg_message(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_fail(cinfo);
}

// Runs libjpeg over `bytes` into `out`. Returns false with `error` filled when libjpeg fails. Everything with
// a destructor lives in the caller (`out`, `line`, `error`), so the longjmp skips no destructor.
bool jpeg_decode(std::span<const uint8_t> bytes, Rgba& out, std::vector<uint8_t>& line, std::string& error) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_message;
  if (setjmp(err.jump)) {
    error = err.message;
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, bytes.data(), static_cast<unsigned long>(bytes.size()));
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next) {
    if (m->marker == JPEG_APP0 + 1 && m->data_length > 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0) {
      out.exif.assign(m->data + 6, m->data + m->data_length);
      break;
    }
  }
  const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  if (cmyk) {
    cinfo.out_color_space = JCS_CMYK;
  } else if (cinfo.jpeg_color_space == JCS_GRAYSCALE) {
    cinfo.out_color_space = JCS_GRAYSCALE;
  } else {
    cinfo.out_color_space = JCS_RGB;
  }
  cinfo.dct_method = JDCT_ISLOW;
  jpeg_start_decompress(&cinfo);
  const int64_t w = cinfo.output_width, h = cinfo.output_height, comps = cinfo.output_components;
  out.height = h;
  out.width = w;
  out.pixels.resize(static_cast<size_t>(h * w * 4));
  line.resize(static_cast<size_t>(w * comps));
  // Adobe CMYK files store inverted ink values; PIL reads them with rawmode "CMYK;I".
  const bool inverted = cmyk && cinfo.saw_Adobe_marker;
  while (cinfo.output_scanline < cinfo.output_height) {
    const int64_t y = cinfo.output_scanline;
    JSAMPROW rows[1] = {line.data()};
    jpeg_read_scanlines(&cinfo, rows, 1);
    uint8_t* dst = out.pixels.data() + y * w * 4;
    for (int64_t x = 0; x < w; ++x) {
      const uint8_t* s = line.data() + x * comps;
      uint8_t* d = dst + x * 4;
      if (comps == 1) {
        d[0] = d[1] = d[2] = s[0];
      } else if (comps == 3) {
        d[0] = s[0], d[1] = s[1], d[2] = s[2];
      } else {
        // PIL's cmyk2rgb: channel = (255 - k) - c * (255 - k) / 255, the product divided with rounding.
        const int nk = 255 - (inverted ? 255 - s[3] : s[3]);
        for (int c = 0; c < 3; ++c) {
          const int ink = inverted ? 255 - s[c] : s[c];
          const int t = ink * nk + 128;
          d[c] = static_cast<uint8_t>(nk - (((t >> 8) + t) >> 8));
        }
      }
      d[3] = 255;
    }
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

// ---- PNG --------------------------------------------------------------------------------------------------

struct PngReader {
  std::span<const uint8_t> bytes;
  size_t offset = 0;
  char message[256] = {};
};

void png_fail(png_structp png, png_const_charp msg) {
  auto* reader = static_cast<PngReader*>(png_get_error_ptr(png));
  std::snprintf(reader->message, sizeof(reader->message), "%s", msg);
  png_longjmp(png, 1);
}

void png_warn(png_structp, png_const_charp) {}

void png_read_bytes(png_structp png, png_bytep data, png_size_t length) {
  auto* reader = static_cast<PngReader*>(png_get_io_ptr(png));
  if (reader->offset + length > reader->bytes.size()) png_error(png, "file is truncated");
  std::memcpy(data, reader->bytes.data() + reader->offset, length);
  reader->offset += length;
}

// Same contract as jpeg_decode: `out`, `rows` and `error` belong to the caller.
bool png_decode(std::span<const uint8_t> bytes, Rgba& out, std::vector<png_bytep>& rows, std::string& error) {
  PngReader reader{bytes};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &reader, png_fail, png_warn);
  Q3VL_CHECK(png, "png_create_read_struct failed");
  png_infop info = png_create_info_struct(png);
  png_infop end_info = png_create_info_struct(png);
  if (setjmp(png_jmpbuf(png))) {
    error = reader.message;
    png_destroy_read_struct(&png, &info, &end_info);
    return false;
  }
  png_set_read_fn(png, &reader, png_read_bytes);
  png_read_info(png, info);
  const int color_type = png_get_color_type(png, info);
  // PIL's "transparency" info or an alpha band: the processor then composites onto white.
  out.has_alpha = (color_type & PNG_COLOR_MASK_ALPHA) != 0 || png_get_valid(png, info, PNG_INFO_tRNS) != 0;
  png_set_expand(png);     // palette -> RGB, gray < 8 bits -> 8 bits, tRNS -> alpha
  png_set_strip_16(png);   // 16-bit samples keep their high byte, as PIL's ";16B" unpackers do
  png_set_gray_to_rgb(png);
  png_set_add_alpha(png, 0xFF, PNG_FILLER_AFTER);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const int64_t w = png_get_image_width(png, info), h = png_get_image_height(png, info);
  Q3VL_CHECK(png_get_rowbytes(png, info) == static_cast<size_t>(w * 4), "unexpected PNG row size");
  out.height = h;
  out.width = w;
  out.pixels.resize(static_cast<size_t>(h * w * 4));
  rows.resize(static_cast<size_t>(h));
  for (int64_t y = 0; y < h; ++y) rows[y] = out.pixels.data() + y * w * 4;
  png_read_image(png, rows.data());
  png_read_end(png, end_info);
  png_bytep exif = nullptr;
  png_uint_32 exif_len = 0;
  if (png_get_eXIf_1(png, info, &exif_len, &exif) || png_get_eXIf_1(png, end_info, &exif_len, &exif)) {
    out.exif.assign(exif, exif + exif_len);
  }
  png_destroy_read_struct(&png, &info, &end_info);
  return true;
}

// ---- WebP -------------------------------------------------------------------------------------------------

bool webp_decode(std::span<const uint8_t> bytes, Rgba& out, std::string& error) {
  WebPBitstreamFeatures features;
  if (WebPGetFeatures(bytes.data(), bytes.size(), &features) != VP8_STATUS_OK) {
    error = "not a valid WebP bitstream";
    return false;
  }
  int w = 0, h = 0;
  uint8_t* rgba = WebPDecodeRGBA(bytes.data(), bytes.size(), &w, &h);
  if (!rgba) {
    error = "WebP decoding failed";
    return false;
  }
  out.height = h;
  out.width = w;
  out.has_alpha = features.has_alpha != 0;
  out.pixels.assign(rgba, rgba + static_cast<size_t>(w) * h * 4);
  WebPFree(rgba);
  return true;
}

// ---- common -----------------------------------------------------------------------------------------------

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  Q3VL_CHECK(in, "image ", path, ": cannot open file");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return bytes;
}

bool starts_with(std::span<const uint8_t> bytes, const char* magic, size_t n, size_t at = 0) {
  return bytes.size() >= at + n && std::memcmp(bytes.data() + at, magic, n) == 0;
}

// PIL.Image.alpha_composite of a pixel over opaque white, in PIL's fixed-point (7 extra bits, rounded /255).
uint8_t over_white(int value, int alpha) {
  if (alpha == 0) return 255;
  const uint32_t coef1 = static_cast<uint32_t>(alpha) * 255 * 255 * 128 / (255 * 255);
  const uint32_t coef2 = 255 * 128 - coef1;
  const uint32_t t = static_cast<uint32_t>(value) * coef1 + 255 * coef2 + (0x80 << 7);
  return static_cast<uint8_t>(((((t >> 8) + t) >> 8)) >> 7);
}

Image to_rgb(const Rgba& src, AlphaMode alpha) {
  Image img(src.height, src.width);
  const int64_t n = src.height * src.width;
  const bool composite = src.has_alpha && alpha == AlphaMode::composite_white;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* s = src.pixels.data() + i * 4;
    uint8_t* d = img.pixels.data() + i * 3;
    for (int c = 0; c < 3; ++c) d[c] = composite ? over_white(s[c], s[3]) : s[c];
  }
  return img;
}

uint32_t read_u16(const uint8_t* p, bool little) {
  return little ? p[0] | (p[1] << 8) : (p[0] << 8) | p[1];
}

uint32_t read_u32(const uint8_t* p, bool little) {
  return little ? p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24)
                : (static_cast<uint32_t>(p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3];
}

}  // namespace

int exif_orientation(std::span<const uint8_t> tiff) {
  if (tiff.size() < 8) return 1;
  bool little;
  if (starts_with(tiff, "II*\0", 4)) {
    little = true;
  } else if (starts_with(tiff, "MM\0*", 4)) {
    little = false;
  } else {
    return 1;
  }
  const uint32_t ifd = read_u32(tiff.data() + 4, little);
  if (ifd > tiff.size() - 2) return 1;
  const uint32_t count = read_u16(tiff.data() + ifd, little);
  for (uint32_t i = 0; i < count; ++i) {
    const size_t entry = ifd + 2 + static_cast<size_t>(i) * 12;
    if (entry + 12 > tiff.size()) return 1;
    const uint8_t* e = tiff.data() + entry;
    if (read_u16(e, little) != 0x0112) continue;
    const uint32_t type = read_u16(e + 2, little);
    uint32_t value = 0;
    if (type == 3) {          // SHORT, stored left-justified in the value field
      value = read_u16(e + 8, little);
    } else if (type == 4) {   // LONG
      value = read_u32(e + 8, little);
    } else {
      return 1;
    }
    return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
  }
  return 1;
}

Image apply_exif_orientation(const Image& image, int orientation) {
  Q3VL_CHECK(orientation >= 1 && orientation <= 8, "EXIF orientation ", orientation, " is not in 1..8");
  if (orientation == 1) return image;
  const int64_t h = image.height, w = image.width;
  const bool swap = orientation >= 5;  // 5..8 exchange rows and columns
  Image out(swap ? w : h, swap ? h : w);
  for (int64_t y = 0; y < out.height; ++y) {
    for (int64_t x = 0; x < out.width; ++x) {
      // Source coordinates of output pixel (y, x) for each of PIL's transpose operations.
      int64_t sy = y, sx = x;
      switch (orientation) {
        case 2: sx = w - 1 - x; break;                  // FLIP_LEFT_RIGHT
        case 3: sy = h - 1 - y; sx = w - 1 - x; break;  // ROTATE_180
        case 4: sy = h - 1 - y; break;                  // FLIP_TOP_BOTTOM
        case 5: sy = x; sx = y; break;                  // TRANSPOSE
        case 6: sy = h - 1 - x; sx = y; break;          // ROTATE_270 (clockwise quarter turn)
        case 7: sy = h - 1 - x; sx = w - 1 - y; break;  // TRANSVERSE
        case 8: sy = x; sx = w - 1 - y; break;          // ROTATE_90 (counter-clockwise quarter turn)
        default: break;
      }
      std::memcpy(out.row(y) + x * 3, image.row(sy) + sx * 3, 3);
    }
  }
  return out;
}

Image decode_image_bytes(std::span<const uint8_t> bytes, const std::string& what, const ImageDecodeOptions& options) {
  Rgba rgba;
  std::string error;
  bool ok;
  if (starts_with(bytes, "\xFF\xD8\xFF", 3)) {
    std::vector<uint8_t> line;
    ok = jpeg_decode(bytes, rgba, line, error);
  } else if (starts_with(bytes, "\x89PNG\r\n\x1A\n", 8)) {
    std::vector<png_bytep> rows;
    ok = png_decode(bytes, rgba, rows, error);
  } else if (starts_with(bytes, "RIFF", 4) && starts_with(bytes, "WEBP", 4, 8)) {
    ok = webp_decode(bytes, rgba, error);
  } else {
    Q3VL_FAIL("image ", what, ": unrecognised format (JPEG, PNG and WebP are supported)");
  }
  Q3VL_CHECK(ok, "image ", what, ": cannot decode: ", error);
  Q3VL_CHECK(rgba.height > 0 && rgba.width > 0, "image ", what, ": empty image");
  Image img = to_rgb(rgba, options.alpha);
  if (options.apply_exif_orientation && !rgba.exif.empty()) {
    img = apply_exif_orientation(img, exif_orientation(rgba.exif));
  }
  return img;
}

Image decode_image(const std::string& path, const ImageDecodeOptions& options) {
  const std::vector<uint8_t> bytes = read_file(path);
  return decode_image_bytes(bytes, path, options);
}

}  // namespace q3vl::io
