// `q3vl pack` (io::pack with default_media_decoder) against the pinned Hugging Face processor and chat template:
// tests/golden/pack_reference/reference.json holds, for every sample of cc12m-32/captions.jsonl, mllm_demo.json and
// mllm_video_demo.json (chat mode) and of captions.jsonl in caption mode, the token ids, labels, and per vision item
// the kind, grid_thw, first pad token and a hash of the resized uint8 pixels (generate.py there says how HF made
// them). The shards are read back and every document must equal its reference entry exactly, and the documents and
// the reference must cover the same samples. The tolerance on resized pixels is 0: image resizing is bit-exact with
// Pillow (test_image.cpp) and video frames are PyAV's decode resized the same way.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "io/media_decoder.h"
#include "io/packer.h"
#include "io/shard_format.h"
#include "tests/support/gradcheck.h"
#include "tests/support/test_files.h"

namespace q3vl::io {
namespace {

using json = nlohmann::json;
using SampleKey = std::pair<int64_t, int64_t>;  // (source file index, sample index) as the packer stores them

const std::string kReference = std::string(Q3VL_SOURCE_DIR) + "/tests/golden/pack_reference/reference.json";
const std::string kData = std::string(Q3VL_SHARED_DIR) + "/data";
const std::string kTokenizer = std::string(Q3VL_SHARED_DIR) + "/assets/qwen3-tokenizer/tokenizer.json";

const json& reference() {
  static const json ref = [] {
    std::ifstream in(kReference);
    Q3VL_CHECK(in, "missing ", kReference, " (tests/golden/pack_reference/generate.sh makes it)");
    return json::parse(in);
  }();
  return ref;
}

const json& reference_run(const std::string& mode) {
  for (const json& run : reference().at("runs"))
    if (run.at("mode") == mode) return run;
  Q3VL_FAIL("no ", mode, " run in ", kReference);
}

// tests/io/media_reference/generate.py's positional hash: sum of (b_i + 1) * P^(i + 1) mod 2^64, as 16 hex digits.
std::string positional_hash(const std::vector<uint8_t>& bytes) {
  constexpr uint64_t prime = 0x100000001b3ULL;
  uint64_t power = 1, total = 0;
  for (const uint8_t b : bytes) {
    power *= prime;
    total += (static_cast<uint64_t>(b) + 1) * power;
  }
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(total));
  return buf;
}

std::vector<int32_t> expand_runs(const json& pairs) {
  std::vector<int32_t> out;
  for (const json& p : pairs) out.insert(out.end(), p.at(1).get<size_t>(), p.at(0).get<int32_t>());
  return out;
}

// "" when equal, else where the sequences first differ with a few values either side.
std::string first_difference(const std::vector<int32_t>& mine, const std::vector<int32_t>& theirs) {
  if (mine == theirs) return "";
  size_t at = 0;
  while (at < mine.size() && at < theirs.size() && mine[at] == theirs[at]) ++at;
  const auto window = [at](const std::vector<int32_t>& v) {
    std::ostringstream os;
    for (size_t i = at >= 3 ? at - 3 : 0; i < std::min(v.size(), at + 4); ++i)
      os << (i == at ? " [" : " ") << v[i] << (i == at ? "]" : "");
    return os.str();
  };
  std::ostringstream os;
  os << "length " << mine.size() << " vs " << theirs.size() << ", first difference at " << at << ":" << window(mine)
     << " vs" << window(theirs);
  return os.str();
}

struct PackedRun {
  PackSummary summary;
  std::vector<std::string> sources;  // the manifest's
  std::map<SampleKey, ShardDocument> documents;
  int64_t duplicates = 0;
};

// Packs the run's inputs with the real media decoder and reads every document back from the shards.
PackedRun pack_run(const json& run, PackMode mode) {
  const test::TempDir tmp;
  PackOptions options;
  for (const json& input : run.at("inputs")) options.inputs.push_back(kData + "/" + input.get<std::string>());
  options.out_dir = tmp / "out";
  options.mode = mode;
  options.shard_bytes = int64_t{8} << 20;  // several shards, so documents are read back across files
  const Tokenizer tokenizer = Tokenizer::load(kTokenizer);
  PackedRun packed;
  packed.summary = pack(options, tokenizer, tokenizer_file_hash(kTokenizer), default_media_decoder());
  const Manifest manifest = read_manifest(options.out_dir + "/manifest.json");
  packed.sources = manifest.sources;
  for (const ManifestShard& entry : manifest.shards) {
    const ShardReader shard = ShardReader::open(options.out_dir + "/" + entry.file);
    check_manifest_shard(manifest, entry, shard);
    for (int64_t i = 0; i < shard.counts().sequences; ++i) {
      for (ShardDocument& d : shard.read_sequence(i).documents) {
        const SampleKey key{d.source_file, d.sample_index};
        if (!packed.documents.emplace(key, std::move(d)).second) ++packed.duplicates;
      }
    }
  }
  return packed;
}

// Packed once per mode for the whole binary (decoding is the slow part).
const PackedRun& packed(const std::string& mode) {
  static std::map<std::string, PackedRun> cache;
  auto it = cache.find(mode);
  if (it == cache.end())
    it = cache.emplace(mode, pack_run(reference_run(mode), mode == "chat" ? PackMode::chat : PackMode::caption)).first;
  return it->second;
}

std::string key_name(const json& run, const SampleKey& key) {
  const json& inputs = run.at("inputs");
  const std::string file = key.first >= 0 && key.first < static_cast<int64_t>(inputs.size())
                               ? inputs.at(key.first).get<std::string>()
                               : "source " + std::to_string(key.first);
  return file + " sample " + std::to_string(key.second);
}

// Every disagreement between the packed documents and the reference run, one line each (empty when they agree).
std::vector<std::string> compare(const json& run, const std::map<SampleKey, ShardDocument>& documents) {
  std::vector<std::string> problems;
  std::map<SampleKey, bool> seen;
  for (const json& sample : run.at("samples")) {
    const SampleKey key{sample.at("source_file").get<int64_t>(), sample.at("sample_index").get<int64_t>()};
    const std::string name = key_name(run, key);
    seen[key] = true;
    const auto found = documents.find(key);
    if (found == documents.end()) {
      problems.push_back(name + ": not in the shards");
      continue;
    }
    const ShardDocument& doc = found->second;
    if (const std::string d = first_difference(doc.tokens, expand_runs(sample.at("tokens"))); !d.empty())
      problems.push_back(name + ": tokens differ: " + d);
    if (const std::string d = first_difference(doc.labels, expand_runs(sample.at("labels"))); !d.empty())
      problems.push_back(name + ": labels differ: " + d);
    const json& items = sample.at("items");
    if (doc.items.size() != items.size()) {
      problems.push_back(name + ": " + std::to_string(doc.items.size()) + " vision items, reference has " +
                         std::to_string(items.size()));
      continue;
    }
    for (size_t k = 0; k < items.size(); ++k) {
      const ShardItem& mine = doc.items[k];
      const json& theirs = items[k];
      const std::string item = name + " item " + std::to_string(k);
      const bool video = theirs.at("kind") == "video";
      const std::vector<int32_t> grid{mine.grid_t, mine.grid_h, mine.grid_w};
      if ((mine.kind == VisionKind::video) != video) problems.push_back(item + ": kind differs");
      if (grid != theirs.at("grid_thw").get<std::vector<int32_t>>())
        problems.push_back(item + ": grid_thw (" + std::to_string(grid[0]) + ", " + std::to_string(grid[1]) + ", " +
                           std::to_string(grid[2]) + ") vs " + theirs.at("grid_thw").dump());
      if (mine.token_offset != theirs.at("token_offset").get<int64_t>())
        problems.push_back(item + ": token offset " + std::to_string(mine.token_offset) + " vs " +
                           theirs.at("token_offset").dump());
      if (mine.frames != (video ? 2 * mine.grid_t : 1) || mine.height != 16 * mine.grid_h ||
          mine.width != 16 * mine.grid_w)
        problems.push_back(item + ": stored " + std::to_string(mine.frames) + " frames of " +
                           std::to_string(mine.height) + "x" + std::to_string(mine.width) + " for its grid");
      if (positional_hash(mine.pixels) != theirs.at("pixels_hash").get<std::string>())
        problems.push_back(item + ": resized pixels differ (hash " + positional_hash(mine.pixels) + " vs " +
                           theirs.at("pixels_hash").get<std::string>() + ")");
    }
  }
  for (const auto& [key, doc] : documents)
    if (!seen.count(key)) problems.push_back(key_name(run, key) + ": in the shards but not in the reference");
  return problems;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const std::string& l : lines) out += l + "\n";
  return out;
}

void expect_matches_reference(const std::string& mode) {
  const json& run = reference_run(mode);
  const PackedRun& p = packed(mode);
  const int64_t n = static_cast<int64_t>(run.at("samples").size());
  EXPECT_EQ(p.summary.samples_in, n);
  EXPECT_EQ(p.summary.samples_packed, n) << p.summary.report();
  EXPECT_EQ(p.summary.skipped_total(), 0) << p.summary.report();
  EXPECT_EQ(p.duplicates, 0);
  ASSERT_EQ(p.sources.size(), run.at("inputs").size());
  for (size_t f = 0; f < p.sources.size(); ++f)
    EXPECT_EQ(p.sources[f], std::filesystem::absolute(kData + "/" + run.at("inputs")[f].get<std::string>()).string());
  const std::vector<std::string> problems = compare(run, p.documents);
  EXPECT_TRUE(problems.empty()) << problems.size() << " disagreements with " << kReference << ":\n" << joined(problems);
  std::printf("pack reference: %s mode, %lld samples, %lld tokens, %lld images, %lld video frames: all equal\n",
              mode.c_str(), static_cast<long long>(n), static_cast<long long>(p.summary.tokens),
              static_cast<long long>(p.summary.images), static_cast<long long>(p.summary.video_frames));
}

TEST(PackReference, ChatModeEqualsHfProcessor) {
  const json& run = reference_run("chat");
  int64_t images = 0, videos = 0;
  for (const json& s : run.at("samples"))
    for (const json& item : s.at("items")) (item.at("kind") == "video" ? videos : images) += 1;
  // All 32 cc12m captions and 6 + 3 mllm-demo conversations, with 40 images and 3 videos among them.
  EXPECT_EQ(run.at("samples").size(), 41u);
  EXPECT_EQ(images, 40);
  EXPECT_EQ(videos, 3);
  expect_matches_reference("chat");
}

TEST(PackReference, CaptionModeEqualsHfProcessor) {
  EXPECT_EQ(reference_run("caption").at("samples").size(), 32u);
  expect_matches_reference("caption");
}

// The comparison itself must catch each kind of disagreement: a token, a label, a grid, a pixel hash, a missing
// and an extra sample.
TEST(PackReference, ComparisonReportsEveryDisagreement) {
  const json& run = reference_run("chat");
  std::map<SampleKey, ShardDocument> docs = packed("chat").documents;
  ASSERT_EQ(compare(run, docs).size(), 0u);
  const SampleKey video_sample{2, 0}, image_sample{1, 0}, caption_sample{0, 1};
  ASSERT_TRUE(docs.count(video_sample) && docs.count(image_sample) && docs.count(caption_sample));
  docs[caption_sample].tokens[5] += 1;
  docs[caption_sample].labels.back() = docs[caption_sample].tokens.back();
  docs[image_sample].items[1].grid_w += 2;
  docs[video_sample].items[0].pixels[12345] ^= 1;
  ShardDocument extra = docs[image_sample];
  docs.erase(SampleKey{1, 5});
  docs.emplace(SampleKey{1, 6}, std::move(extra));
  const std::string report = joined(compare(run, docs));
  for (const std::string needle :
       {"cc12m-32/captions.jsonl sample 1: tokens differ: length", "cc12m-32/captions.jsonl sample 1: labels differ",
        "mllm-demo/mllm_demo.json sample 0 item 1: grid_thw", "mllm-demo/mllm_video_demo.json sample 0 item 0: resized "
        "pixels differ", "mllm-demo/mllm_demo.json sample 5: not in the shards",
        "mllm-demo/mllm_demo.json sample 6: in the shards but not in the reference"})
    EXPECT_NE(report.find(needle), std::string::npos) << needle << "\nnot in:\n" << report;
  // Seven lines: the wider grid also no longer fits the stored frame size.
  EXPECT_NE(report.find("mllm-demo/mllm_demo.json sample 0 item 1: stored 1 frames of 192x352"), std::string::npos);
  EXPECT_EQ(compare(run, docs).size(), 7u) << report;
}

TEST(PackReference, MediaDecoderRefusesOptionsShardsCannotHold) {
  ImageSizeOptions image;
  image.factor = 28;
  test::expect_error([&] { default_media_decoder(image, {}); }, "image resize factor is 28, shards need 32");
  VideoOptions video;
  video.temporal_patch_size = 4;
  test::expect_error([&] { default_media_decoder({}, video); }, "video temporal patch size is 4, shards need 2");
  video = VideoOptions{};
  video.resize = false;
  test::expect_error([&] { default_media_decoder({}, video); }, "videos must be resized");
}

}  // namespace
}  // namespace q3vl::io
