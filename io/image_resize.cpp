// smart_resize (image and video variants) and Pillow's fixed-point bicubic resampler.
#include "io/image_resize.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/check.h"

namespace q3vl::io {

namespace {

// Python's round() on a float: ties go to the even integer (the default rounding mode of nearbyint).
int64_t py_round(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

void check_aspect(int64_t height, int64_t width, const char* what) {
  Q3VL_CHECK(height > 0 && width > 0, what, ": size ", height, "x", width, " must be positive");
  const double ratio = static_cast<double>(std::max(height, width)) / static_cast<double>(std::min(height, width));
  Q3VL_CHECK(ratio <= 200, what, ": absolute aspect ratio must be smaller than 200, got ", ratio, " for ", height,
             "x", width);
}

// Pillow's cubic convolution kernel with a = -0.5.
double bicubic(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

constexpr int kPrecisionBits = 32 - 8 - 2;

// Per output position: the first input index, the tap count, and `ksize` fixed-point weights.
struct Coefficients {
  int ksize = 0;
  std::vector<int> first;
  std::vector<int> count;
  std::vector<int32_t> weights;  // out_size * ksize
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for a full-image box [0, in_size).
Coefficients coefficients(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  Coefficients c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    // Truncating casts after +0.5, exactly as Pillow rounds the window ends.
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int xmax = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = bicubic((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double w = ww != 0.0 ? k[x] / ww : k[x];
      c.weights[static_cast<size_t>(xx) * c.ksize + x] =
          static_cast<int32_t>(w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(std::clamp(v, 0, 255));
}

// Horizontal pass over input rows [row_first, row_first + rows) of `src` into a rows x out_width image.
Image resample_rows(const Image& src, int row_first, int rows, const Coefficients& hor) {
  const int out_w = static_cast<int>(hor.first.size());
  Image out(rows, out_w);
#pragma omp parallel for schedule(static)
  for (int yy = 0; yy < rows; ++yy) {
    const uint8_t* in_row = src.row(yy + row_first);
    uint8_t* out_row = out.row(yy);
    for (int xx = 0; xx < out_w; ++xx) {
      const int32_t* k = &hor.weights[static_cast<size_t>(xx) * hor.ksize];
      const uint8_t* px = in_row + static_cast<size_t>(hor.first[xx]) * 3;
      int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < hor.count[xx]; ++x) {
        s0 += px[x * 3 + 0] * k[x];
        s1 += px[x * 3 + 1] * k[x];
        s2 += px[x * 3 + 2] * k[x];
      }
      out_row[xx * 3 + 0] = clip8(s0);
      out_row[xx * 3 + 1] = clip8(s1);
      out_row[xx * 3 + 2] = clip8(s2);
    }
  }
  return out;
}

// Vertical pass: output row yy reads rows vert.first[yy] - row_offset onwards of `src`.
Image resample_columns(const Image& src, int row_offset, const Coefficients& vert) {
  const int out_h = static_cast<int>(vert.first.size());
  Image out(out_h, src.width);
  const int64_t row_len = src.width * 3;
#pragma omp parallel for schedule(static)
  for (int yy = 0; yy < out_h; ++yy) {
    const int32_t* k = &vert.weights[static_cast<size_t>(yy) * vert.ksize];
    const int first = vert.first[yy] - row_offset;
    uint8_t* out_row = out.row(yy);
    for (int64_t i = 0; i < row_len; ++i) {
      int32_t s = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < vert.count[yy]; ++y) s += src.row(first + y)[i] * k[y];
      out_row[i] = clip8(s);
    }
  }
  return out;
}

}  // namespace

std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels,
                                         int64_t max_pixels) {
  check_aspect(height, width, "smart_resize");
  Q3VL_CHECK(factor > 0, "smart_resize: factor ", factor, " must be positive");
  const double h = static_cast<double>(height), w = static_cast<double>(width), f = static_cast<double>(factor);
  int64_t h_bar = py_round(h / f) * factor;
  int64_t w_bar = py_round(w / f) * factor;
  if (h_bar * w_bar > max_pixels) {
    const double beta = std::sqrt(h * w / static_cast<double>(max_pixels));
    h_bar = std::max(factor, static_cast<int64_t>(std::floor(h / beta / f)) * factor);
    w_bar = std::max(factor, static_cast<int64_t>(std::floor(w / beta / f)) * factor);
  } else if (h_bar * w_bar < min_pixels) {
    const double beta = std::sqrt(static_cast<double>(min_pixels) / (h * w));
    h_bar = static_cast<int64_t>(std::ceil(h * beta / f)) * factor;
    w_bar = static_cast<int64_t>(std::ceil(w * beta / f)) * factor;
  }
  return {h_bar, w_bar};
}

std::pair<int64_t, int64_t> smart_resize_video(int64_t num_frames, int64_t height, int64_t width,
                                               int64_t temporal_factor, int64_t factor, int64_t min_pixels,
                                               int64_t max_pixels) {
  Q3VL_CHECK(num_frames >= temporal_factor, "smart_resize_video: ", num_frames,
             " frames, must be at least the temporal factor ", temporal_factor);
  Q3VL_CHECK(height > 0 && width > 0, "smart_resize_video: size ", height, "x", width, " must be positive");
  if (height < factor || width < factor) {
    const double scale = std::max(static_cast<double>(factor) / height, static_cast<double>(factor) / width);
    height = static_cast<int64_t>(height * scale);
    width = static_cast<int64_t>(width * scale);
  }
  check_aspect(height, width, "smart_resize_video");
  const double t = static_cast<double>(num_frames), h = static_cast<double>(height), w = static_cast<double>(width);
  const double f = static_cast<double>(factor);
  int64_t h_bar = py_round(h / f) * factor;
  int64_t w_bar = py_round(w / f) * factor;
  const int64_t t_bar = py_round(t / static_cast<double>(temporal_factor)) * temporal_factor;
  if (t_bar * h_bar * w_bar > max_pixels) {
    const double beta = std::sqrt(t * h * w / static_cast<double>(max_pixels));
    h_bar = std::max(factor, static_cast<int64_t>(std::floor(h / beta / f)) * factor);
    w_bar = std::max(factor, static_cast<int64_t>(std::floor(w / beta / f)) * factor);
  } else if (t_bar * h_bar * w_bar < min_pixels) {
    const double beta = std::sqrt(static_cast<double>(min_pixels) / (t * h * w));
    h_bar = static_cast<int64_t>(std::ceil(h * beta / f)) * factor;
    w_bar = static_cast<int64_t>(std::ceil(w * beta / f)) * factor;
  }
  return {h_bar, w_bar};
}

Image resize_bicubic(const Image& image, int64_t height, int64_t width) {
  Q3VL_CHECK(image.height > 0 && image.width > 0, "resize_bicubic: empty input image");
  Q3VL_CHECK(height > 0 && width > 0, "resize_bicubic: target size ", height, "x", width, " must be positive");
  Q3VL_CHECK(static_cast<int64_t>(image.pixels.size()) == image.height * image.width * 3,
             "resize_bicubic: image of ", image.height, "x", image.width, " holds ", image.pixels.size(), " bytes");
  const int in_h = static_cast<int>(image.height), in_w = static_cast<int>(image.width);
  const int out_h = static_cast<int>(height), out_w = static_cast<int>(width);
  const bool need_horizontal = out_w != in_w, need_vertical = out_h != in_h;
  if (!need_horizontal && !need_vertical) return image;
  // Pillow 13 runs the vertical pass first when the height shrinks by more than twice the width's shrink
  // (in pixels); the 8-bit intermediate makes the order visible in the result.
  const bool horizontal_first = !(in_h - out_h > 0 && in_h - out_h > (in_w - out_w) * 2);
  if (!need_vertical) return resample_rows(image, 0, in_h, coefficients(in_w, out_w));
  const Coefficients vert = coefficients(in_h, out_h);
  if (!need_horizontal) return resample_columns(image, 0, vert);
  const Coefficients hor = coefficients(in_w, out_w);
  if (horizontal_first) {
    // Only the input rows the vertical pass reads go through the horizontal pass.
    const int row_first = vert.first[0];
    const int row_last = vert.first[out_h - 1] + vert.count[out_h - 1];
    return resample_columns(resample_rows(image, row_first, row_last - row_first, hor), row_first, vert);
  }
  const Image tall = resample_columns(image, 0, vert);
  return resample_rows(tall, 0, out_h, hor);
}

Image resize_for_model(const Image& image, const ImageSizeOptions& options) {
  const auto [h, w] = smart_resize(image.height, image.width, options.factor, options.min_pixels, options.max_pixels);
  return resize_bicubic(image, h, w);
}

}  // namespace q3vl::io
