// HDF5 shards and manifest: round trip, version refusal, and corrupt / truncated / disagreeing files failing
// at open with the file and dataset named.
#include <gtest/gtest.h>

// The test binary does not get HDF5's include folder (q3vl_io links it privately); Debian's serial build
// lives under hdf5/serial.
#if __has_include(<hdf5.h>)
#include <hdf5.h>
#else
#include <hdf5/serial/hdf5.h>
#endif

#include <filesystem>
#include <fstream>

#include "io/io_version.h"
#include "io/shard_format.h"
#include "tests/support/gradcheck.h"

namespace q3vl::io {
namespace {

namespace fs = std::filesystem;

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("q3vl_test_shards_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

ShardItem make_item(VisionKind kind, int32_t t, int32_t h, int32_t w, uint8_t seed, int64_t offset) {
  ShardItem item;
  item.kind = kind;
  item.grid_t = t;
  item.grid_h = h;
  item.grid_w = w;
  item.frames = stored_frames(kind, t);
  item.height = h * kPatchSize;
  item.width = w * kPatchSize;
  item.token_offset = offset;
  item.pixels.resize(static_cast<size_t>(item.frames) * item.height * item.width * 3);
  for (size_t i = 0; i < item.pixels.size(); ++i) item.pixels[i] = static_cast<uint8_t>(seed + i * 7);
  return item;
}

std::vector<ShardSequence> sample_sequences() {
  ShardDocument a{0, 1, {1, 2, 3, 4, 5, 6, 7, 8}, {-100, -100, -100, -100, -100, -100, 7, 8}, {}};
  a.items.push_back(make_item(VisionKind::image, 1, 2, 4, 3, 1));
  ShardDocument b{0, 2, {9, 10, 11}, {-100, 10, 11}, {}};
  ShardDocument c{1, 0, {12, 13, 14, 15, 16, 17}, {-100, -100, -100, -100, 16, 17}, {}};
  c.items.push_back(make_item(VisionKind::video, 2, 2, 2, 5, 1));
  return {ShardSequence{{a, b}}, ShardSequence{{c}}};
}

ShardHeader header() { return ShardHeader{kShardFormatVersion, "fnv1a64:0123456789abcdef", 16}; }

void expect_same(const ShardDocument& x, const ShardDocument& y) {
  EXPECT_EQ(x.source_file, y.source_file);
  EXPECT_EQ(x.sample_index, y.sample_index);
  EXPECT_EQ(x.tokens, y.tokens);
  EXPECT_EQ(x.labels, y.labels);
  ASSERT_EQ(x.items.size(), y.items.size());
  for (size_t i = 0; i < x.items.size(); ++i) {
    const ShardItem &p = x.items[i], &q = y.items[i];
    EXPECT_EQ(p.kind, q.kind);
    EXPECT_EQ(std::vector<int32_t>({p.grid_t, p.grid_h, p.grid_w, p.frames, p.height, p.width}),
              std::vector<int32_t>({q.grid_t, q.grid_h, q.grid_w, q.frames, q.height, q.width}));
    EXPECT_EQ(p.token_offset, q.token_offset);
    EXPECT_EQ(p.pixels, q.pixels);
  }
}

TEST(Shards, RoundTrip) {
  const fs::path dir = temp_dir("roundtrip");
  const std::string path = (dir / "s.h5").string();
  const std::vector<ShardSequence> seqs = sample_sequences();
  const ShardCounts c = write_shard(path, header(), seqs);
  EXPECT_EQ(c.sequences, 2);
  EXPECT_EQ(c.documents, 3);
  EXPECT_EQ(c.tokens, 17);
  EXPECT_EQ(c.items, 2);
  EXPECT_EQ(c.pixel_bytes, 32 * 64 * 3 + 4 * 32 * 32 * 3);
  const ShardReader r = ShardReader::open(path);
  EXPECT_EQ(r.header().tokenizer_hash, header().tokenizer_hash);
  EXPECT_EQ(r.header().token_budget, 16);
  EXPECT_EQ(r.counts().tokens, 17);
  EXPECT_EQ(r.sequence_tokens(0), 11);
  EXPECT_EQ(r.sequence_tokens(1), 6);
  for (int s = 0; s < 2; ++s) {
    const ShardSequence got = r.read_sequence(s);
    ASSERT_EQ(got.documents.size(), seqs[s].documents.size());
    for (size_t d = 0; d < got.documents.size(); ++d) expect_same(got.documents[d], seqs[s].documents[d]);
  }
  test::expect_error([&] { r.read_sequence(2); }, "sequence 2 out of range");
  fs::remove_all(dir);
}

// Rewrites one dataset (same name) in an existing shard.
template <class T>
void overwrite_dataset(const std::string& path, const char* name, const std::vector<T>& values, hid_t type) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  H5Ldelete(f, name, H5P_DEFAULT);
  const hsize_t n = values.size();
  const hid_t space = H5Screate_simple(1, &n, nullptr);
  const hid_t d = H5Dcreate2(f, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data());
  H5Dclose(d);
  H5Sclose(space);
  H5Fclose(f);
}

void set_version(const std::string& path, int64_t version) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  const hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_INT64, &version);
  H5Aclose(a);
  H5Fclose(f);
}

TEST(Shards, RefusesUnknownVersionAndCorruptDatasets) {
  const fs::path dir = temp_dir("corrupt");
  const std::string path = (dir / "s.h5").string();
  const auto fresh = [&] { write_shard(path, header(), sample_sequences()); };

  fresh();
  set_version(path, kShardFormatVersion + 1);
  test::expect_error([&] { ShardReader::open(path); }, "attribute format_version is 2, this build reads only version 1");

  fresh();
  overwrite_dataset<int64_t>(path, "document_tokens", {0, 8, 11, 99}, H5T_NATIVE_INT64);
  test::expect_error([&] { ShardReader::open(path); }, path + ": dataset document_tokens ends at 99");

  fresh();
  overwrite_dataset<int32_t>(path, "labels", {1, 2, 3}, H5T_NATIVE_INT32);
  test::expect_error([&] { ShardReader::open(path); }, "dataset labels has 3 rows but dataset tokens has 17");

  fresh();
  overwrite_dataset<double>(path, "tokens", std::vector<double>(17, 1.0), H5T_NATIVE_DOUBLE);
  test::expect_error([&] { ShardReader::open(path); }, "dataset tokens is not int32");

  fresh();
  overwrite_dataset<int64_t>(path, "item_pixels", {0, 5, 6}, H5T_NATIVE_INT64);
  test::expect_error([&] { ShardReader::open(path); }, "dataset item_pixels ends at 6");

  fresh();
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    H5Ldelete(f, "item_grid_thw", H5P_DEFAULT);
    H5Fclose(f);
  }
  test::expect_error([&] { ShardReader::open(path); }, "dataset item_grid_thw is missing");
  fs::remove_all(dir);
}

TEST(Shards, TruncatedFileFailsNamingIt) {
  const fs::path dir = temp_dir("truncated");
  const std::string path = (dir / "s.h5").string();
  write_shard(path, header(), sample_sequences());
  fs::resize_file(path, fs::file_size(path) / 2);
  test::expect_error([&] { ShardReader::open(path); }, path + ": cannot open as HDF5");
  std::ofstream(path, std::ios::trunc) << "not hdf5";
  test::expect_error([&] { ShardReader::open(path); }, path + ": cannot open as HDF5");
  fs::remove_all(dir);
}

TEST(Shards, ManifestRoundTripAndDisagreement) {
  const fs::path dir = temp_dir("manifest");
  const std::string shard_path = (dir / "s.h5").string();
  const ShardCounts counts = write_shard(shard_path, header(), sample_sequences());
  Manifest m{kShardFormatVersion, header().tokenizer_hash, 16, {"/data/a.jsonl", "/data/b.json"}, {{"s.h5", counts}}, "{\"x\":1}"};
  write_manifest((dir / "manifest.json").string(), m);
  const Manifest back = read_manifest((dir / "manifest.json").string());
  EXPECT_EQ(back.sources, m.sources);
  ASSERT_EQ(back.shards.size(), 1u);
  EXPECT_EQ(back.shards[0].counts.tokens, 17);
  const ShardReader r = ShardReader::open(shard_path);
  check_manifest_shard(back, back.shards[0], r);

  Manifest wrong = back;
  wrong.shards[0].counts.tokens = 18;
  test::expect_error([&] { check_manifest_shard(wrong, wrong.shards[0], r); },
                     shard_path + ": dataset tokens holds 17 tokens but the manifest says 18");
  wrong = back;
  wrong.tokenizer_hash = "fnv1a64:ffffffffffffffff";
  test::expect_error([&] { check_manifest_shard(wrong, wrong.shards[0], r); }, "attribute tokenizer_hash");
  wrong = back;
  wrong.token_budget = 8;
  test::expect_error([&] { check_manifest_shard(wrong, wrong.shards[0], r); }, "attribute token_budget");

  std::ofstream(dir / "bad.json") << "{\"format_version\": 7}";
  test::expect_error([&] { read_manifest((dir / "bad.json").string()); }, "format_version is 7");
  std::ofstream(dir / "bad2.json") << "{\"format_version\": 1, \"tokenizer_hash\": \"x\"}";
  test::expect_error([&] { read_manifest((dir / "bad2.json").string()); }, "field token_budget is missing");
  fs::remove_all(dir);
}

TEST(Shards, ALabelIsTheTokenAtItsPositionOrIgnored) {
  const fs::path dir = temp_dir("labels");
  const std::string path = (dir / "s.h5").string();
  // Document 1 (rows 8-10) trains on 10 and 11; row 10's label 42 is a valid id but not the token there.
  std::vector<ShardSequence> seqs = sample_sequences();
  seqs[0].documents[1].labels = {-100, 10, 42};
  write_shard(path, header(), seqs);
  const ShardReader r = ShardReader::open(path);
  test::expect_error([&] { r.read_sequence(0); },
                     path + ": dataset labels row 10 (document 1) is 42, expected -100 or the token there, 11");
  r.read_sequence(1);
  fs::remove_all(dir);
}

TEST(Shards, ManifestRefusesDuplicateShardsNonIntegerCountsAndPathsOutsideItsFolder) {
  const fs::path dir = temp_dir("manifest_bad");
  const std::string path = (dir / "manifest.json").string();
  const auto manifest_with = [&](const std::string& shards) {
    std::ofstream(path) << R"({"format_version": 1, "tokenizer_hash": "h", "token_budget": 16, "sources": [],
                               "shards": [)" << shards << "]}";
  };
  const auto shard = [](const std::string& file, const std::string& tokens = "17") {
    return R"({"file": ")" + file + R"(", "sequences": 2, "documents": 3, "tokens": )" + tokens +
           R"(, "items": 2, "pixel_bytes": 18432})";
  };
  manifest_with(shard("a.h5") + "," + shard("b.h5"));
  EXPECT_EQ(read_manifest(path).shards.size(), 2u);
  manifest_with(shard("a.h5") + "," + shard("./a.h5"));
  test::expect_error([&] { read_manifest(path); }, path + ": shards[1].file './a.h5' is listed twice");
  manifest_with(shard("a.h5", "3.7"));
  test::expect_error([&] { read_manifest(path); }, path + ": shards[0].tokens is 3.7, expected a non-negative integer");
  manifest_with(shard("a.h5", "-1"));
  test::expect_error([&] { read_manifest(path); }, "shards[0].tokens is -1, expected a non-negative integer");
  for (const std::string bad : {"/etc/passwd", "../outside.h5", "sub/../../outside.h5"}) {
    manifest_with(shard("a.h5") + "," + shard(bad));
    test::expect_error([&] { read_manifest(path); }, path + ": shards[1].file '" + bad +
                                                         "' is not a path inside the manifest's folder");
  }
  fs::remove_all(dir);
}

TEST(Shards, TokenizerHash) {
  const fs::path dir = temp_dir("hash");
  std::ofstream(dir / "t.json") << "a";
  EXPECT_EQ(tokenizer_file_hash((dir / "t.json").string()), "fnv1a64:af63dc4c8601ec8c");  // FNV-1a 64 of "a"
  fs::remove_all(dir);
}

}  // namespace
}  // namespace q3vl::io
