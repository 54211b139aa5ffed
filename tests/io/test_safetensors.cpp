// safetensors reader/writer: half-float conversions, the crate's exact byte layout, round trips of single files
// and sharded directories, and an error naming the file and tensor for each kind of damaged file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "io/float16.h"
#include "io/safetensors.h"
#include "tests/support/gradcheck.h"
#include "tests/support/test_files.h"

namespace q3vl::io {
namespace {

namespace fs = std::filesystem;
using test::TempDir;
using test::read_all;
using test::write_all;
using test::random_tensor;
using test::test_arena;

// A fresh directory per test under the system temp dir, removed afterwards.



// A file with the given header text (not padded) followed by `data_bytes` zero bytes.
std::string raw_file(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\0');
}

std::string bytes_of(std::span<const std::byte> s) { return {reinterpret_cast<const char*>(s.data()), s.size()}; }

Tensor f32_tensor(Shape shape, uint64_t seed) { return random_tensor(shape, seed, 1.0, DType::f32); }

// ---- half-float conversions --------------------------------------------------------------------------------

TEST(Float16, EveryHalfAndBfloatRoundTripsExactlyThroughFloat) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    const float f = f16_to_f32(bits);
    const float b = bf16_to_f32(bits);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << h;
    } else {
      ASSERT_EQ(f32_to_f16(f), bits) << "f16 " << h;
    }
    if (std::isnan(b)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(b)))) << h;
    } else {
      ASSERT_EQ(f32_to_bf16(b), bits) << "bf16 " << h;
    }
  }
}

TEST(Float16, HalfValuesMatchTheirDefinition) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xc049), -3.140625f);
}

// Between consecutive finite values a and b of a 16-bit format, the midpoint (exact in f32) must round to the
// one with an even mantissa, and the f32 neighbours of the midpoint to the nearer one.
template <class ToF, class FromF>
void check_nearest_even(ToF to_f32, FromF from_f32, uint16_t last_finite) {
  for (uint16_t sign : {uint16_t{0}, uint16_t{0x8000}}) {
    for (uint16_t h = 0; h < last_finite; ++h) {
      const uint16_t a = sign | h, b = sign | static_cast<uint16_t>(h + 1);
      const float fa = to_f32(a), fb = to_f32(b);
      const float mid = static_cast<float>((static_cast<double>(fa) + fb) / 2);
      ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(fa) + fb) / 2) << "midpoint not exact at " << h;
      ASSERT_EQ(from_f32(mid), (h & 1) ? b : a) << "tie at " << h;
      ASSERT_EQ(from_f32(std::nextafter(mid, fa)), a) << "below tie at " << h;
      ASSERT_EQ(from_f32(std::nextafter(mid, fb)), b) << "above tie at " << h;
    }
  }
}

TEST(Float16, NarrowingRoundsToNearestEven) {
  check_nearest_even(f16_to_f32, f32_to_f16, 0x7bff);
  check_nearest_even(bf16_to_f32, f32_to_bf16, 0x7f7f);
}

TEST(Float16, NarrowingOverflowUnderflowAndNan) {
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // the tie above the largest half goes to even: infinity
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(f32_to_f16(-1e10f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // half the smallest subnormal ties to zero
  EXPECT_EQ(f32_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16(-std::ldexp(1.0f, -30)), 0x8000);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to infinity
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(nan))));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(nan))));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::bit_cast<float>(0x7f800001u)))));  // sNaN stays NaN
}

// ---- writer layout ------------------------------------------------------------------------------------------

TEST(Safetensors, WriterMatchesTheCratesBytes) {
  // The safetensors crate's own serialization test: "attn.0" F32 [1,2,3] = 0..5, no metadata.
  TempDir tmp;
  std::vector<float> values{0, 1, 2, 3, 4, 5};
  write_safetensors_file(tmp / "a.safetensors", {{"attn.0", Tensor(values.data(), DType::f32, {1, 2, 3})}}, DType::f32,
                         {});
  const std::string header = R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  std::string expected(8, '\0');
  expected[0] = 64;
  expected += header + std::string(64 - header.size(), ' ');
  expected.append(reinterpret_cast<const char*>(values.data()), 24);
  EXPECT_EQ(read_all(tmp / "a.safetensors"), expected);
}

TEST(Safetensors, WriterOrdersByDescendingAlignmentThenKeyAndPadsHeader) {
  TempDir tmp;
  std::vector<int64_t> ids{1, 2, 3};
  std::vector<int32_t> i32{7};
  std::vector<uint8_t> bytes{9, 8};
  const Tensor w = f32_tensor({2, 3}, 1), v = f32_tensor({4}, 2);
  write_safetensors_file(tmp / "m.safetensors",
                         {{"z.weight", w},
                          {"b.u8", Tensor(bytes.data(), DType::u8, {2})},
                          {"a.weight", v},
                          {"ids", Tensor(ids.data(), DType::i64, {3})},
                          {"count", Tensor(i32.data(), DType::i32, {1})}},
                         DType::bf16);
  const SafetensorsFile f(tmp / "m.safetensors");
  std::vector<std::string> order;
  for (const StTensorInfo& t : f.tensors()) order.push_back(t.key + ":" + std::string(st_dtype_name(t.dtype)));
  EXPECT_EQ(order, (std::vector<std::string>{"ids:I64", "count:I32", "a.weight:BF16", "z.weight:BF16", "b.u8:U8"}));
  EXPECT_EQ(f.header_bytes() % 8, 0u);
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  const std::string text = read_all(tmp / "m.safetensors");
  EXPECT_EQ(text.substr(8, 35), R"({"__metadata__":{"format":"pt"},"id)");
  EXPECT_EQ(bytes_of(f.bytes(f.info("ids"))), std::string(reinterpret_cast<const char*>(ids.data()), 24));
}

// ---- reading and conversion ---------------------------------------------------------------------------------

TEST(Safetensors, ReadsEveryStoredDtypeIntoF32Exactly) {
  TempDir tmp;
  const Tensor w = f32_tensor({3, 5}, 3);
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    const std::string path = tmp / ("w_" + std::string(dtype_name(dt)) + ".safetensors");
    write_safetensors_file(path, {{"w", w}}, dt);
    const SafetensorsFile f(path);
    const StTensorInfo& info = f.info("w");
    EXPECT_EQ(info.dtype, to_st_dtype(dt));
    EXPECT_EQ(info.shape, (std::vector<int64_t>{3, 5}));
    std::vector<float> got(15);
    f.read("w", Tensor(got.data(), DType::f32, {3, 5}));
    const auto* src = w.data<float>();
    for (int i = 0; i < 15; ++i) {
      const float want = dt == DType::f32    ? src[i]
                         : dt == DType::bf16 ? bf16_to_f32(f32_to_bf16(src[i]))
                                             : f16_to_f32(f32_to_f16(src[i]));
      ASSERT_EQ(got[static_cast<size_t>(i)], want) << dtype_name(dt) << " element " << i;
    }
  }
}

TEST(Safetensors, ReadChecksShapeAndDtypeOfTheDestination) {
  TempDir tmp;
  write_safetensors_file(tmp / "w.safetensors", {{"w", f32_tensor({2, 3}, 4)}}, DType::bf16);
  const SafetensorsFile f(tmp / "w.safetensors");
  std::vector<float> buf(6);
  std::vector<int64_t> ibuf(6);
  test::expect_error(
      [&] {
        f.read("w", Tensor(buf.data(), DType::f32, {3, 2}));
      },
      "w.safetensors: tensor 'w' has shape [2,3], expected [3,2]");
  test::expect_error([&] { f.read("w", Tensor(ibuf.data(), DType::i64, {2, 3})); }, "cannot convert BF16 to i64");
  test::expect_error([&] { f.read("nope", Tensor(buf.data(), DType::f32, {2, 3})); }, "has no tensor 'nope'");
}

TEST(Safetensors, ScalarsAndEmptyTensorsRoundTrip) {
  TempDir tmp;
  float scalar = 2.5f;
  write_safetensors_file(
      tmp / "s.safetensors",
      {{"scalar", Tensor(&scalar, DType::f32, Shape{})}, {"empty", Tensor(nullptr, DType::f32, {0, 4})}}, DType::f32);
  const SafetensorsFile f(tmp / "s.safetensors");
  EXPECT_TRUE(f.info("scalar").shape.empty());
  EXPECT_EQ(f.info("empty").shape, (std::vector<int64_t>{0, 4}));
  float back = 0;
  f.read("scalar", Tensor(&back, DType::f32, Shape{}));
  EXPECT_EQ(back, 2.5f);
}

// ---- round trips --------------------------------------------------------------------------------------------

TEST(Safetensors, RewritingAFileReproducesItByteForByte) {
  TempDir tmp;
  const Tensor a = f32_tensor({7, 3}, 5), b = f32_tensor({2, 2, 2}, 6), c = f32_tensor({11}, 7);
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    const std::string first = tmp / "first.safetensors", second = tmp / "second.safetensors",
                      third = tmp / "third.safetensors";
    write_safetensors_file(first, {{"a", a}, {"b", b}, {"c", c}}, dt);
    // Raw views of the mapping written back in the same dtype.
    {
      const SafetensorsFile f(first);
      std::vector<StWriteEntry> raw;
      for (const StTensorInfo& t : f.tensors()) raw.push_back({t.key, f.view(t)});
      write_safetensors_file(second, raw, dt);
    }
    // Converted to f32 and narrowed again: bf16/f16 -> f32 is exact, so narrowing gives the same bits.
    {
      const SafetensorsFile f(first);
      std::vector<std::vector<float>> store;
      std::vector<StWriteEntry> converted;
      for (const StTensorInfo& t : f.tensors()) {
        store.emplace_back(static_cast<size_t>(t.numel()));
        Shape s;
        for (int64_t d : t.shape) s.dims[s.ndim++] = d;
        const Tensor dst(store.back().data(), DType::f32, s);
        f.read(t.key, dst);
        converted.push_back({t.key, dst});
      }
      write_safetensors_file(third, converted, dt);
    }
    EXPECT_EQ(read_all(first), read_all(second)) << dtype_name(dt);
    EXPECT_EQ(read_all(first), read_all(third)) << dtype_name(dt);
  }
}

// Files written by Python's safetensors (the golden fixtures) come back byte for byte when rewritten.
TEST(Safetensors, RewritingFilesOfThePythonPackageReproducesThem) {
  TempDir tmp;
  int compared = 0;
  for (const auto& entry : fs::recursive_directory_iterator(fs::path(Q3VL_SOURCE_DIR) / "tests" / "golden")) {
    if (entry.path().extension() != ".safetensors") continue;
    const SafetensorsFile f(entry.path().string());
    std::vector<StWriteEntry> views;
    std::set<DType> float_dtypes;
    for (const StTensorInfo& t : f.tensors()) {
      views.push_back({t.key, f.view(t)});
      if (t.dtype == StDType::F32 || t.dtype == StDType::BF16 || t.dtype == StDType::F16)
        float_dtypes.insert(views.back().tensor.dtype());
    }
    if (float_dtypes.size() > 1) continue;  // the writer stores all floating-point tensors in one dtype
    const std::string out = tmp / ("rewrite_" + std::to_string(compared++) + ".safetensors");
    write_safetensors_file(out, views, float_dtypes.empty() ? DType::f32 : *float_dtypes.begin(), f.metadata());
    EXPECT_EQ(read_all(out), read_all(entry.path().string())) << entry.path();
  }
  if (compared == 0) GTEST_SKIP() << "no safetensors files under tests/golden";
}

TEST(Safetensors, ShardedDirectoryWithIndexRoundTrips) {
  TempDir tmp;
  std::vector<StWriteEntry> entries;
  std::vector<Tensor> values;
  for (int i = 0; i < 6; ++i) {
    values.push_back(f32_tensor({4, 4 + i}, 10 + static_cast<uint64_t>(i)));
    entries.push_back({"layers." + std::to_string(i) + ".weight", values.back()});
  }
  // bf16 sizes 32, 40, 48, 56, 64, 72 bytes; a 100-byte limit groups them {0,1} {2} {3} {4} {5}.
  const StDirLayout layout = write_safetensors_dir(tmp / "ck", entries, DType::bf16, 100);
  ASSERT_EQ(layout.files.size(), 5u);
  EXPECT_EQ(layout.files[0], "model-00001-of-00005.safetensors");
  EXPECT_EQ(layout.weight_map.at("layers.1.weight"), "model-00001-of-00005.safetensors");
  EXPECT_EQ(layout.weight_map.at("layers.5.weight"), "model-00005-of-00005.safetensors");
  EXPECT_EQ(layout.total_size, 312u);

  const auto index = nlohmann::json::parse(read_all(tmp / "ck/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), layout.total_size);
  EXPECT_EQ(index["weight_map"].size(), 6u);
  EXPECT_EQ(read_all(tmp / "ck/model.safetensors.index.json").substr(0, 30), "{\n  \"metadata\": {\n    \"total_s");

  const SafetensorsDir dir(tmp / "ck");
  EXPECT_EQ(dir.keys().size(), 6u);
  EXPECT_EQ(dir.files().size(), 5u);
  std::vector<StWriteEntry> back;
  for (const std::string& k : dir.keys()) back.push_back({k, dir.file_of(k).view(dir.info(k))});
  // Entry order decides the sharding, so write back in the original order.
  std::sort(back.begin(), back.end(), [](const StWriteEntry& x, const StWriteEntry& y) { return x.key < y.key; });
  write_safetensors_dir(tmp / "ck2", back, DType::bf16, 100);
  for (const std::string& name : layout.files)
    EXPECT_EQ(read_all(tmp / ("ck/" + name)), read_all(tmp / ("ck2/" + name)));
  EXPECT_EQ(read_all(tmp / "ck/model.safetensors.index.json"), read_all(tmp / "ck2/model.safetensors.index.json"));

  // Saving unsharded into the same directory leaves only model.safetensors.
  write_safetensors_dir(tmp / "ck", entries, DType::bf16, 0);
  EXPECT_TRUE(fs::exists(tmp / "ck/model.safetensors"));
  EXPECT_FALSE(fs::exists(tmp / "ck/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(tmp / "ck/model-00001-of-00005.safetensors"));
  EXPECT_EQ(SafetensorsDir(tmp / "ck").keys().size(), 6u);
}

TEST(Safetensors, OversizedTensorGetsItsOwnShard) {
  TempDir tmp;
  const Tensor small = f32_tensor({2}, 1), big = f32_tensor({40}, 2);
  const StDirLayout layout =
      write_safetensors_dir(tmp / "ck", {{"a", small}, {"b", big}, {"c", small}, {"d", small}}, DType::f32, 20);
  ASSERT_EQ(layout.files.size(), 3u);
  EXPECT_EQ(layout.weight_map.at("a"), layout.files[0]);
  EXPECT_EQ(layout.weight_map.at("b"), layout.files[1]);
  EXPECT_EQ(layout.weight_map.at("c"), layout.files[2]);
  EXPECT_EQ(layout.weight_map.at("d"), layout.files[2]);
}

// ---- damaged files ------------------------------------------------------------------------------------------

struct BadFileCase {
  const char* name;
  std::string bytes;
  const char* message;
};

TEST(Safetensors, DamagedFilesAreErrorsNamingFileAndTensor) {
  TempDir tmp;
  write_safetensors_file(tmp / "good.safetensors", {{"w", f32_tensor({4, 4}, 8)}, {"v", f32_tensor({4}, 9)}},
                         DType::f32);
  const std::string good = read_all(tmp / "good.safetensors");
  const std::string two = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)";
  const std::vector<BadFileCase> cases{
      {"truncated", good.substr(0, good.size() - 3), "is truncated or tensor 'w' has offsets out of range"},
      {"tiny", good.substr(0, 5), "is truncated: 5 bytes"},
      {"header_cut", good.substr(0, 40), "is truncated: header length"},
      {"bad_json", raw_file(R"({"a":{"dtype":"F32",)", 0), "bad header JSON"},
      {"not_object", raw_file("[1,2]", 0), "header JSON is not an object"},
      {"out_of_range", raw_file(two + R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 12),
       "tensor 'b' has offsets out of range: data_offsets [8,16] but the data buffer has 12 bytes"},
      {"overlap", raw_file(two + R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       "tensor 'b' data_offsets [4,12] overlap the previous tensor"},
      {"gap", raw_file(two + R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", 20),
       "gap of 4 bytes in the data buffer before tensor 'b'"},
      {"trailing", raw_file(two + R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 20),
       "4 trailing bytes after the last tensor"},
      {"size_mismatch", raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       "tensor 'a': data_offsets [0,8] hold 8 bytes but F32[3] needs 12"},
      {"bad_dtype", raw_file(R"({"a":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", 8),
       "tensor 'a': unknown dtype 'F31'"},
      {"negative_dim", raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "tensor 'a': shape [-2] has an entry"},
      {"bad_offsets", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8),
       "tensor 'a': data_offsets must be two non-negative integers"},
      {"extra_field", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8),
       "tensor 'a': unknown field 'x'"},
      {"bad_metadata", raw_file(R"({"__metadata__":{"format":1}})", 0),
       "__metadata__ value of 'format' is not a string"},
      {"huge_header", std::string("\xff\xff\xff\xff\x00\x00\x00\x00", 8) + "{}", "exceeds the limit"},
  };
  for (const BadFileCase& c : cases) {
    const std::string path = tmp / (std::string(c.name) + ".safetensors");
    write_all(path, c.bytes);
    SCOPED_TRACE(c.name);
    test::expect_error([&] { SafetensorsFile f(path); }, path);
    test::expect_error([&] { SafetensorsFile f(path); }, c.message);
  }
  test::expect_error([&] { SafetensorsFile f(tmp / "missing.safetensors"); }, "cannot open");
}

TEST(Safetensors, IndexAndShardsMustAgree) {
  TempDir tmp;
  const Tensor a = f32_tensor({4}, 1), b = f32_tensor({4}, 2), c = f32_tensor({8}, 3);
  write_safetensors_dir(tmp / "ck", {{"a", a}, {"b", b}, {"c", c}}, DType::f32, 40);
  const std::string index_path = tmp / "ck/model.safetensors.index.json";
  const std::string index = read_all(index_path);
  auto expect_index_error = [&](const std::string& text, const std::string& needle) {
    write_all(index_path, text);
    test::expect_error([&] { SafetensorsDir d(tmp / "ck"); }, needle);
  };
  auto index_json = nlohmann::json::parse(index);

  auto extra = index_json;
  extra["weight_map"]["d"] = "model-00001-of-00002.safetensors";
  expect_index_error(extra.dump(),
                     "maps 'd' to " + tmp / "ck/model-00001-of-00002.safetensors" + ", which has no such tensor");

  auto missing = index_json;
  missing["weight_map"].erase("b");
  expect_index_error(missing.dump(), "model-00001-of-00002.safetensors holds tensor 'b', which");

  auto no_file = index_json;
  no_file["weight_map"]["b"] = "model-00009-of-00009.safetensors";
  expect_index_error(no_file.dump(), "lists shard model-00009-of-00009.safetensors (for 'b'), which does not exist");

  expect_index_error("{\"weight_map\": [", "model.safetensors.index.json: bad JSON");

  write_all(index_path, index);
  write_safetensors_file(tmp / "ck/model.safetensors", {{"a", a}}, DType::f32);
  test::expect_error([&] { SafetensorsDir d(tmp / "ck"); }, "ambiguous");
  test::expect_error([&] { SafetensorsDir d(tmp / "nowhere"); }, "has neither");
}

}  // namespace
}  // namespace q3vl::io
