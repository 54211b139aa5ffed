// Image decoding, resizing and patchify against transformers' Qwen2VLImageProcessorPil (Pillow 13) on every real
// image in ../shared/data and on the synthetic inputs of tests/io/media_reference (EXIF orientations, grayscale,
// CMYK, 16-bit, palette, tRNS, RGBA/LA, WebP): decoded pixels, resized pixels and pixel_values must be
// bit-identical (compared through 64-bit hashes, plus a 64x64 window per real image for a per-pixel difference
// report), grid_thw and smart_resize exact. Hand-checked patch order, orientation mapping, and error messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "io/image.h"
#include "io/image_resize.h"
#include "io/patchify.h"
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

// The generator's positional hash: sum of (b_i + 1) * P^(i + 1) mod 2^64 over the bytes, as 16 hex digits.
std::string positional_hash(const void* data, size_t n) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  constexpr uint64_t prime = 0x100000001b3ULL;
  uint64_t power = 1, total = 0;
  for (size_t i = 0; i < n; ++i) {
    power *= prime;
    total += (static_cast<uint64_t>(bytes[i]) + 1) * power;
  }
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(total));
  return buf;
}

std::string hash_of(const Image& img) { return positional_hash(img.pixels.data(), img.pixels.size()); }

std::string path_of(const std::string& label) {
  return label.rfind("inputs/", 0) == 0 ? kReference + "/" + label : kData + "/" + label;
}

std::vector<int64_t> grid_vector(const PatchGrid& g) { return {g.t, g.h, g.w}; }

// Checks one reference entry end to end; returns the resized image for further comparisons.
Image check_entry(const json& e) {
  const std::string label = e["file"];
  SCOPED_TRACE(label);
  const Image decoded = decode_image(path_of(label));
  EXPECT_EQ(decoded.height, e["decoded"][0].get<int64_t>());
  EXPECT_EQ(decoded.width, e["decoded"][1].get<int64_t>());
  EXPECT_EQ(hash_of(decoded), e["decoded_hash"].get<std::string>()) << "decoded pixels differ from Pillow's";
  const Image dropped = decode_image(path_of(label), {.alpha = AlphaMode::drop});
  EXPECT_EQ(hash_of(dropped), e["decoded_drop_hash"].get<std::string>()) << "convert(\"RGB\") pixels differ";

  const Image resized = resize_for_model(decoded);
  EXPECT_EQ(resized.height, e["resized"][0].get<int64_t>());
  EXPECT_EQ(resized.width, e["resized"][1].get<int64_t>());
  EXPECT_EQ(hash_of(resized), e["resized_hash"].get<std::string>()) << "resized pixels differ from Pillow's";

  const Patches patches = patchify(std::span<const Image>(&resized, 1));
  EXPECT_EQ(grid_vector(patches.grid), e["grid_thw"].get<std::vector<int64_t>>());
  EXPECT_EQ(std::vector<int64_t>({patches.grid.patches(), patch_features()}),
            e["pixel_values_shape"].get<std::vector<int64_t>>());
  EXPECT_EQ(positional_hash(patches.values.data(), patches.values.size() * sizeof(float)),
            e["pixel_values_hash"].get<std::string>())
      << "pixel_values differ from the processor's";
  return resized;
}

TEST(MediaImage, RealImagesMatchHfProcessorExactly) {
  const json ref = load_reference();
  int64_t images = 0, compared = 0, max_diff = 0, sum_diff = 0;
  for (const json& e : ref["images"]) {
    if (!e.contains("crop")) continue;
    ++images;
    const Image resized = check_entry(e);
    // Per-pixel report on the stored window (the hash above already demands identity).
    const Image crop = decode_image(kReference + "/" + e["crop"]["file"].get<std::string>());
    const int64_t top = e["crop"]["top"], left = e["crop"]["left"];
    ASSERT_LE(top + crop.height, resized.height);
    ASSERT_LE(left + crop.width, resized.width);
    for (int64_t y = 0; y < crop.height; ++y) {
      for (int64_t x = 0; x < crop.width * 3; ++x) {
        const int64_t d = std::abs(int64_t{crop.row(y)[x]} - int64_t{resized.row(top + y)[left * 3 + x]});
        max_diff = std::max(max_diff, d);
        sum_diff += d;
        ++compared;
      }
    }
  }
  EXPECT_EQ(images, 35) << "expected the 32 cc12m and 3 mllm-demo images";
  std::printf("media: %lld real images; resized-pixel difference to Pillow over %lld values: max %lld, mean %.6f\n",
              static_cast<long long>(images), static_cast<long long>(compared), static_cast<long long>(max_diff),
              compared ? static_cast<double>(sum_diff) / compared : 0.0);
  EXPECT_EQ(max_diff, 0);
}

TEST(MediaImage, SyntheticInputsMatchPillow) {
  const json ref = load_reference();
  int64_t count = 0;
  for (const json& e : ref["images"]) {
    // Pillow clips 16-bit grayscale to 255 on convert("RGB") (nearly every pixel turns white); q3vl keeps the
    // high byte instead, checked by hand in SixteenBitGrayKeepsHighByte.
    if (e.contains("crop") || e["file"] == "inputs/gray16.png") continue;
    check_entry(e);
    ++count;
  }
  EXPECT_EQ(count, 24);
}

TEST(MediaImage, SixteenBitGrayKeepsHighByte) {
  // gray16.png stores (v * 257 + 3) mod 2^16 for the 8-bit values v of gray.png.
  const Image gray = decode_image(kReference + "/inputs/gray.png");
  const Image gray16 = decode_image(kReference + "/inputs/gray16.png");
  ASSERT_EQ(gray.pixels.size(), gray16.pixels.size());
  for (size_t i = 0; i < gray.pixels.size(); ++i) {
    ASSERT_EQ(gray16.pixels[i], ((gray.pixels[i] * 257 + 3) & 0xFFFF) >> 8) << "value " << i;
  }
}

TEST(MediaImage, SmartResizeMatchesHf) {
  const json ref = load_reference();
  for (const json& c : ref["smart_resize"]) {
    const auto in = c["in"].get<std::vector<int64_t>>();
    SCOPED_TRACE(c.dump());
    if (c["out"].is_null()) {
      expect_error([&] { smart_resize(in[0], in[1], in[2], in[3], in[4]); }, "aspect ratio");
    } else {
      const auto [h, w] = smart_resize(in[0], in[1], in[2], in[3], in[4]);
      EXPECT_EQ(std::vector<int64_t>({h, w}), c["out"].get<std::vector<int64_t>>());
    }
  }
  // Python's round() sends ties to even: 48/32 = 1.5 -> 2 and 80/32 = 2.5 -> 2 (then the minimum applies).
  EXPECT_EQ(smart_resize(48, 80, 32, 1, 1 << 30), std::make_pair(int64_t{64}, int64_t{64}));
}

TEST(MediaImage, ExifOrientationParsing) {
  // Little-endian TIFF, one IFD entry: tag 0x0112, type SHORT, count 1, value 6.
  const std::vector<uint8_t> le = {'I', 'I', 42, 0, 8, 0, 0, 0, 1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0};
  EXPECT_EQ(exif_orientation(le), 6);
  // Big-endian, two entries, orientation second, value 8.
  const std::vector<uint8_t> be = {'M', 'M', 0, 42, 0, 0, 0, 8, 0, 2, 0x01, 0x0F, 0, 2, 0, 0, 0, 4, 'A', 'B',
                                   'C', 0, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 8, 0, 0};
  EXPECT_EQ(exif_orientation(be), 8);
  std::vector<uint8_t> bad_value = le;
  bad_value[18] = 9;
  EXPECT_EQ(exif_orientation(bad_value), 1);
  std::vector<uint8_t> truncated(le.begin(), le.begin() + 14);
  EXPECT_EQ(exif_orientation(truncated), 1);
  EXPECT_EQ(exif_orientation(std::vector<uint8_t>{'X', 'X', 0, 0, 0, 0, 0, 0}), 1);
}

TEST(MediaImage, ApplyOrientationByHand) {
  // 2x3 image whose red channel numbers the pixels row-major: 1 2 3 / 4 5 6.
  Image img(2, 3);
  for (int i = 0; i < 6; ++i) img.pixels[i * 3] = static_cast<uint8_t>(i + 1);
  auto reds = [](const Image& im) {
    std::vector<int> r;
    for (int64_t i = 0; i < im.height * im.width; ++i) r.push_back(im.pixels[i * 3]);
    return r;
  };
  // Expected upright images (rows concatenated) for each orientation, from the EXIF definitions.
  const std::vector<std::vector<int>> expected = {
      {1, 2, 3, 4, 5, 6}, {3, 2, 1, 6, 5, 4}, {6, 5, 4, 3, 2, 1}, {4, 5, 6, 1, 2, 3},
      {1, 4, 2, 5, 3, 6}, {4, 1, 5, 2, 6, 3}, {6, 3, 5, 2, 4, 1}, {3, 6, 2, 5, 1, 4}};
  for (int o = 1; o <= 8; ++o) {
    const Image out = apply_exif_orientation(img, o);
    EXPECT_EQ(out.height, o >= 5 ? 3 : 2) << "orientation " << o;
    EXPECT_EQ(reds(out), expected[o - 1]) << "orientation " << o;
  }
  expect_error([&] { apply_exif_orientation(img, 9); }, "EXIF orientation 9");
  // Orientation can be switched off.
  const Image raw = decode_image(kReference + "/inputs/orient_6.jpg", {.apply_exif_orientation = false});
  EXPECT_EQ(raw.height, 24);
  EXPECT_EQ(raw.width, 40);
}

TEST(MediaImage, AlphaCompositingOverWhite) {
  const Image composite = decode_image(kReference + "/inputs/rgba.png");
  const Image dropped = decode_image(kReference + "/inputs/rgba.png", {.alpha = AlphaMode::drop});
  // The first four columns are fully transparent: white when composited, the stored colour when dropped.
  for (int64_t y = 0; y < composite.height; ++y) {
    for (int64_t x = 0; x < 4; ++x) {
      for (int c = 0; c < 3; ++c) EXPECT_EQ(composite.row(y)[x * 3 + c], 255);
    }
  }
  EXPECT_NE(hash_of(composite), hash_of(dropped));
  // The last column is opaque: both agree there.
  const int64_t x = composite.width - 1;
  for (int64_t y = 0; y < composite.height; ++y) {
    for (int c = 0; c < 3; ++c) EXPECT_EQ(composite.row(y)[x * 3 + c], dropped.row(y)[x * 3 + c]);
  }
}

TEST(MediaImage, ResizeBicubicBasics) {
  Image flat(37, 53);
  std::fill(flat.pixels.begin(), flat.pixels.end(), uint8_t{77});
  for (auto [h, w] : {std::pair{37, 53}, {64, 96}, {16, 16}, {5, 200}, {100, 7}}) {
    const Image out = resize_bicubic(flat, h, w);
    ASSERT_EQ(out.height, h);
    ASSERT_EQ(out.width, w);
    // The kernel's weights sum to one, so a constant image stays constant at every scale.
    EXPECT_TRUE(std::all_of(out.pixels.begin(), out.pixels.end(), [](uint8_t v) { return v == 77; }))
        << h << "x" << w;
  }
  expect_error([&] { resize_bicubic(flat, 0, 5); }, "target size 0x5");
  expect_error([&] { resize_bicubic(Image{}, 4, 4); }, "empty input image");
}

TEST(MediaPatchify, OrderByHand) {
  // patch 2, merge 2, temporal 2 on a 4x8 frame: grid (1, 2, 4); blocks of 2x2 patches, 2 blocks across.
  PatchOptions o{.patch_size = 2, .temporal_patch_size = 2, .merge_size = 2, .mean = {0, 0, 0}, .std = {1, 1, 1}};
  Image a(4, 8), b(4, 8);
  for (int64_t y = 0; y < 4; ++y) {
    for (int64_t x = 0; x < 8; ++x) {
      for (int c = 0; c < 3; ++c) {
        a.row(y)[x * 3 + c] = static_cast<uint8_t>(y * 8 + x + 60 * c);
        b.row(y)[x * 3 + c] = static_cast<uint8_t>(y * 8 + x + 60 * c + 30);
      }
    }
  }
  const std::vector<Image> frames = {a, b};
  const Patches p = patchify(frames, o);
  EXPECT_EQ(grid_vector(p.grid), std::vector<int64_t>({1, 2, 4}));
  ASSERT_EQ(p.values.size(), 8u * 24u);
  // Row r = block * 4 + ih * 2 + iw; block = bh * 2 + bw; feature = c * 8 + t * 4 + y * 2 + x.
  for (int64_t row = 0; row < 8; ++row) {
    const int64_t block = row / 4, ih = (row / 2) % 2, iw = row % 2, bh = block / 2, bw = block % 2;
    for (int64_t c = 0; c < 3; ++c) {
      for (int64_t t = 0; t < 2; ++t) {
        for (int64_t y = 0; y < 2; ++y) {
          for (int64_t x = 0; x < 2; ++x) {
            const int64_t py = (bh * 2 + ih) * 2 + y, px = (bw * 2 + iw) * 2 + x;
            const double expected = (py * 8 + px + 60 * c + 30 * t) / 255.0;
            EXPECT_NEAR(p.values[row * 24 + c * 8 + t * 4 + y * 2 + x], expected, 1e-6)
                << "row " << row << " c " << c << " t " << t << " y " << y << " x " << x;
          }
        }
      }
    }
  }
  // A single frame (an image) is repeated to fill the temporal patch; three frames pad to four.
  const Patches single = patchify(std::span<const Image>(&a, 1), o);
  EXPECT_EQ(grid_vector(single.grid), std::vector<int64_t>({1, 2, 4}));
  for (int64_t row = 0; row < 8; ++row) {
    for (int64_t c = 0; c < 3; ++c) {
      for (int64_t k = 0; k < 4; ++k) {
        EXPECT_EQ(single.values[row * 24 + c * 8 + k], single.values[row * 24 + c * 8 + 4 + k]);
      }
    }
  }
  const std::vector<Image> three = {a, b, a};
  const Patches padded = patchify(three, o);
  EXPECT_EQ(grid_vector(padded.grid), std::vector<int64_t>({2, 2, 4}));
  EXPECT_EQ(padded.grid.tokens(2), 4);
}

TEST(MediaPatchify, NormalisationNumerics) {
  Image img(32, 32);
  for (size_t i = 0; i < img.pixels.size(); ++i) img.pixels[i] = static_cast<uint8_t>(i % 256);
  const Patches image_path = patchify(std::span<const Image>(&img, 1));
  const Patches video_path = patchify(std::span<const Image>(&img, 1), {.fused_rescale = true});
  ASSERT_EQ(image_path.values.size(), video_path.values.size());
  // Both orders compute 2v/255 - 1 to within a float ulp of 1 (|x| <= 1, so 2^-23 absolute); the image path is
  // bit-exact with HF by the hash tests above; here only the bound and the extreme values are checked.
  for (size_t i = 0; i < image_path.values.size(); ++i) {
    EXPECT_NEAR(image_path.values[i], video_path.values[i], 1.2e-7);
  }
  EXPECT_EQ(*std::min_element(image_path.values.begin(), image_path.values.end()), -1.0f);
  EXPECT_EQ(*std::max_element(video_path.values.begin(), video_path.values.end()), 1.0f);
}

TEST(MediaPatchify, Errors) {
  Image img(40, 32);
  expect_error([&] { patchify(std::span<const Image>(&img, 1)); }, "frame size 40x32 is not a positive multiple");
  Image other(64, 32);
  Image ok(32, 32);
  const std::vector<Image> mixed = {ok, other};
  expect_error([&] { patchify(mixed); }, "frame 1 is 64x32, frame 0 is 32x32");
  std::vector<float> buf(10);
  expect_error([&] { patchify_into(std::span<const Image>(&ok, 1), {}, Tensor(buf.data(), DType::f32, {2, 5})); },
               "patchify: out has shape [2,5], expected [4,1536]");
}

TEST(MediaImage, DecodeErrorsNameTheFile) {
  const fs::path dir = fs::temp_directory_path() / ("q3vl_media_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string missing = (dir / "missing.jpg").string();
  expect_error([&] { decode_image(missing); }, "image " + missing + ": cannot open file");

  auto write = [&](const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string p = (dir / name).string();
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return p;
  };
  auto read = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  const std::vector<uint8_t> jpeg = read(kData + "/cc12m-32/000000001.jpg");
  const std::string truncated_jpeg = write("cut.jpg", std::vector<uint8_t>(jpeg.begin(), jpeg.begin() + jpeg.size() / 2));
  expect_error([&] { decode_image(truncated_jpeg); }, "image " + truncated_jpeg + ": cannot decode");
  std::vector<uint8_t> garbled = jpeg;
  std::fill(garbled.begin() + 2, garbled.begin() + 200, uint8_t{0xFF});
  const std::string garbled_jpeg = write("garbled.jpg", garbled);
  expect_error([&] { decode_image(garbled_jpeg); }, "image " + garbled_jpeg + ": cannot decode");

  const std::vector<uint8_t> png = read(kReference + "/inputs/rgb.png");
  const std::string truncated_png = write("cut.png", std::vector<uint8_t>(png.begin(), png.begin() + png.size() - 20));
  expect_error([&] { decode_image(truncated_png); }, "image " + truncated_png + ": cannot decode");
  const std::vector<uint8_t> webp = read(kReference + "/inputs/lossy.webp");
  const std::string truncated_webp = write("cut.webp", std::vector<uint8_t>(webp.begin(), webp.begin() + 40));
  expect_error([&] { decode_image(truncated_webp); }, "image " + truncated_webp + ": cannot decode");
  const std::string text = write("notes.jpg", {'h', 'e', 'l', 'l', 'o'});
  expect_error([&] { decode_image(text); }, "image " + text + ": unrecognised format");
  const std::string empty = write("empty.png", {});
  expect_error([&] { decode_image(empty); }, "image " + empty + ": unrecognised format");
  fs::remove_all(dir);
}

TEST(MediaImage, Throughput) {
  // Decode + smart_resize + bicubic over the 32 cc12m images; printed for the report, not asserted.
  std::vector<std::string> paths;
  for (const auto& entry : fs::directory_iterator(kData + "/cc12m-32")) {
    if (entry.path().extension() == ".jpg") paths.push_back(entry.path().string());
  }
  const auto start = std::chrono::steady_clock::now();
  int64_t pixels = 0;
  for (const std::string& p : paths) pixels += resize_for_model(decode_image(p)).pixels.size() / 3;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("media: decode+resize %zu images in %.3f s: %.1f images/s (%.1f Mpixel/s out)\n", paths.size(), seconds,
              paths.size() / seconds, pixels / seconds / 1e6);
  EXPECT_GT(pixels, 0);
}

}  // namespace
}  // namespace q3vl::io
