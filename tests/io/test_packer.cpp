// q3vl pack library: every bad-input reason is skipped, counted and named (file, line); packed documents
// equal the chat template's output; first-fit packing; rank slices that merge into one manifest.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "io/packer.h"
#include "tests/support/gradcheck.h"

namespace q3vl::io {
namespace {

namespace fs = std::filesystem;

const Tokenizer& qwen_tokenizer() {
  static const Tokenizer tok = Tokenizer::load(std::string(Q3VL_SHARED_DIR) + "/assets/qwen3-tokenizer/tokenizer.json");
  return tok;
}

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("q3vl_test_packer_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Fake media: an image file holds "H W" (already resized sizes), a video file "FRAMES H W"; "corrupt" throws.
MediaDecoder fake_media() {
  MediaDecoder m;
  m.image = [](const std::string& path) {
    const std::string text = slurp(path);
    Q3VL_CHECK(text.rfind("corrupt", 0) != 0, "bad JPEG data");
    DecodedMedia d;
    d.frames = 1;
    std::sscanf(text.c_str(), "%d %d", &d.height, &d.width);
    d.pixels.assign(static_cast<size_t>(d.height) * d.width * 3, 100);
    return d;
  };
  m.video = [](const std::string& path) {
    const std::string text = slurp(path);
    Q3VL_CHECK(text.rfind("corrupt", 0) != 0, "bad video stream");
    DecodedMedia d;
    std::sscanf(text.c_str(), "%d %d %d", &d.frames, &d.height, &d.width);
    d.pixels.assign(static_cast<size_t>(d.frames) * d.height * d.width * 3, 50);
    for (int i = 0; i < d.frames / 2; ++i) d.timestamps.push_back(0.5 + i);
    return d;
  };
  return m;
}

struct Fixture {
  fs::path dir;
  std::string input;
};

// Line 1-3 good, then one sample per bad reason (lines 4-10), then a blank line and a good video sample (line 12).
Fixture write_inputs(const std::string& name) {
  Fixture f{temp_dir(name), ""};
  std::ofstream(f.dir / "a.jpg") << "64 96";
  std::ofstream(f.dir / "b.jpg") << "32 32";
  std::ofstream(f.dir / "bad.jpg") << "corrupt";
  std::ofstream(f.dir / "v.mp4") << "4 32 64";
  f.input = (f.dir / "data.jsonl").string();
  std::ofstream(f.input)
      << R"({"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}], "images": ["a.jpg"]})" "\n"
      << R"({"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})" "\n"
      << R"({"messages": [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."}], "images": ["a.jpg", "b.jpg"]})" "\n"
      << R"({"messages": [{"role": "user", "content": "broken")" "\n"
      << R"({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]})" "\n"
      << R"({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]})" "\n"
      << R"({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "images": ["a.jpg"]})" "\n"
      << R"({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}], "images": ["nope.jpg"]})" "\n"
      << R"({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}], "images": ["bad.jpg"]})" "\n"
      << R"({"messages": [{"role": "user", "content": ")" << std::string(3000, 'z') << R"("}, {"role": "assistant", "content": "y"}]})" "\n"
      << "\n"
      << R"({"messages": [{"role": "user", "content": "<video>Why?"}, {"role": "assistant", "content": "Fun."}], "videos": ["v.mp4"]})" "\n";
  return f;
}

PackOptions options_for(const Fixture& f, const std::string& out) {
  PackOptions o;
  o.inputs = {f.input};
  o.out_dir = (f.dir / out).string();
  o.token_budget = 256;
  o.chunk_samples = 3;
  return o;
}

std::vector<ShardDocument> read_all_documents(const std::string& dir, std::vector<std::vector<int64_t>>* per_sequence = nullptr) {
  const Manifest m = read_manifest(dir + "/manifest.json");
  std::vector<ShardDocument> docs;
  for (const ManifestShard& s : m.shards) {
    const ShardReader r = ShardReader::open(dir + "/" + s.file);
    check_manifest_shard(m, s, r);
    for (int64_t i = 0; i < r.counts().sequences; ++i) {
      std::vector<int64_t> lines;
      for (ShardDocument& d : r.read_sequence(i).documents) {
        lines.push_back(d.sample_index);
        docs.push_back(std::move(d));
      }
      if (per_sequence) per_sequence->push_back(lines);
    }
  }
  return docs;
}

TEST(Packer, SkipsEveryBadSampleByReasonAndPacksTheRest) {
  const Fixture f = write_inputs("bad");
  const PackOptions o = options_for(f, "out");
  const PackSummary s = pack(o, qwen_tokenizer(), "fnv1a64:test", fake_media());
  EXPECT_EQ(s.samples_in, 11);  // the blank line is not a sample
  EXPECT_EQ(s.samples_packed, 4);
  const std::map<SkipReason, int64_t> expected{{SkipReason::bad_json, 1},      {SkipReason::unknown_role, 1},
                                               {SkipReason::empty_assistant, 1}, {SkipReason::tag_mismatch, 1},
                                               {SkipReason::missing_media, 1}, {SkipReason::corrupt_media, 1},
                                               {SkipReason::too_long, 1}};
  for (const auto& [reason, n] : expected) EXPECT_EQ(s.skipped[static_cast<int>(reason)], n) << skip_reason_name(reason);
  ASSERT_EQ(s.skipped_samples.size(), 7u);
  const std::vector<int64_t> lines{4, 5, 6, 7, 8, 9, 10};
  for (size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(s.skipped_samples[i].file, f.input);
    EXPECT_EQ(s.skipped_samples[i].line, lines[i]);
  }
  EXPECT_EQ(s.skipped_samples[4].reason, SkipReason::missing_media);
  EXPECT_NE(s.skipped_samples[4].message.find("nope.jpg does not exist"), std::string::npos);
  EXPECT_NE(s.skipped_samples[5].message.find("bad JPEG data"), std::string::npos);
  EXPECT_EQ(s.images, 3);
  EXPECT_EQ(s.video_frames, 4);
  const std::string report = s.report();
  EXPECT_NE(report.find(f.input + ":9: corrupt_media"), std::string::npos) << report;
  EXPECT_NE(report.find("skipped too_long: 1"), std::string::npos) << report;

  // Packed documents equal the template applied directly, items in sequence order with their pixels.
  const ChatTemplate chat(qwen_tokenizer());
  std::map<int64_t, TemplateOutput> want;
  want[1] = chat.apply({{"user", "<image>What is this?"}, {"assistant", "A cat."}}, {{VisionKind::image, 1, 4, 6, {}}}, {});
  want[2] = chat.apply({{"system", "Be nice."}, {"user", "Hi"}, {"assistant", "Hello."}}, {}, {});
  want[3] = chat.apply({{"user", "<image><image>Compare."}, {"assistant", "Same."}},
                       {{VisionKind::image, 1, 4, 6, {}}, {VisionKind::image, 1, 2, 2, {}}}, {});
  want[12] = chat.apply({{"user", "<video>Why?"}, {"assistant", "Fun."}}, {}, {{VisionKind::video, 2, 2, 4, {0.5, 1.5}}});
  const std::vector<ShardDocument> docs = read_all_documents(o.out_dir);
  ASSERT_EQ(docs.size(), 4u);
  int64_t tokens = 0;
  for (const ShardDocument& d : docs) {
    ASSERT_TRUE(want.count(d.sample_index)) << d.sample_index;
    const TemplateOutput& w = want[d.sample_index];
    EXPECT_EQ(d.source_file, 0);
    EXPECT_EQ(d.tokens, w.tokens);
    EXPECT_EQ(d.labels, w.labels);
    ASSERT_EQ(d.items.size(), w.item_token_offsets.size());
    for (size_t i = 0; i < d.items.size(); ++i) EXPECT_EQ(d.items[i].token_offset, w.item_token_offsets[i]);
    tokens += static_cast<int64_t>(d.tokens.size());
  }
  EXPECT_EQ(s.tokens, tokens);
  const ShardDocument& video = *std::find_if(docs.begin(), docs.end(), [](const ShardDocument& d) { return d.sample_index == 12; });
  EXPECT_EQ(video.items[0].frames, 4);
  EXPECT_EQ(video.items[0].pixels, std::vector<uint8_t>(4 * 32 * 64 * 3, 50));
  // The manifest carries the summary.
  EXPECT_NE(read_manifest(o.out_dir + "/manifest.json").summary_json.find("\"corrupt_media\":1"), std::string::npos);
  fs::remove_all(f.dir);
}

TEST(Packer, FirstFitWithinTheBudget) {
  const fs::path dir = temp_dir("firstfit");
  // Text samples whose token counts we measure through the template.
  const std::vector<int> words{40, 10, 35, 20, 5, 30, 12, 44, 3};
  std::ofstream in(dir / "t.jsonl");
  for (int n : words) {
    std::string content;
    for (int k = 0; k < n; ++k) content += " word";
    in << R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ")" << content << "\"}]}\n";
  }
  in.close();
  const ChatTemplate chat(qwen_tokenizer());
  std::vector<int64_t> lengths;
  for (int n : words) {
    std::string content;
    for (int k = 0; k < n; ++k) content += " word";
    lengths.push_back(static_cast<int64_t>(chat.apply({{"user", "q"}, {"assistant", content}}, {}, {}).tokens.size()));
  }
  PackOptions o;
  o.inputs = {(dir / "t.jsonl").string()};
  o.out_dir = (dir / "out").string();
  o.token_budget = 80;
  const PackSummary s = pack(o, qwen_tokenizer(), "h", MediaDecoder{});
  // Reference first-fit (unbounded window: sequences close in creation order at the end).
  std::vector<std::vector<int64_t>> bins;
  std::vector<int64_t> fill;
  for (size_t i = 0; i < lengths.size(); ++i) {
    size_t b = 0;
    while (b < bins.size() && fill[b] + lengths[i] > o.token_budget) ++b;
    if (b == bins.size()) {
      bins.emplace_back();
      fill.push_back(0);
    }
    bins[b].push_back(static_cast<int64_t>(i + 1));
    fill[b] += lengths[i];
  }
  std::vector<std::vector<int64_t>> got;
  read_all_documents(o.out_dir, &got);
  EXPECT_EQ(got, bins);
  EXPECT_EQ(s.sequences, static_cast<int64_t>(bins.size()));
  int64_t total = 0;
  for (int64_t l : lengths) total += l;
  EXPECT_EQ(s.tokens, total);
  EXPECT_NEAR(s.padding_ratio(), 1.0 - static_cast<double>(total) / (80.0 * bins.size()), 1e-12);

  // A window of one open sequence closes each sequence as soon as a sample does not fit (next-fit).
  o.open_sequences = 1;
  o.out_dir = (dir / "out1").string();
  pack(o, qwen_tokenizer(), "h", MediaDecoder{});
  std::vector<std::vector<int64_t>> next_fit;
  read_all_documents(o.out_dir, &next_fit);
  int64_t running = 0;
  std::vector<std::vector<int64_t>> want;
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (want.empty() || running + lengths[i] > o.token_budget) {
      want.emplace_back();
      running = 0;
    }
    want.back().push_back(static_cast<int64_t>(i + 1));
    running += lengths[i];
  }
  EXPECT_EQ(next_fit, want);
  fs::remove_all(dir);
}

TEST(Packer, RanksPackDisjointSlicesIntoOneManifest) {
  const Fixture f = write_inputs("ranks");
  PackOptions o = options_for(f, "ranked");
  o.shard_bytes = 1;  // one shard per sequence
  o.world = 2;
  std::vector<RankResult> parts;
  for (int r = 0; r < 2; ++r) {
    o.rank = r;
    const RankResult part = pack_rank(o, qwen_tokenizer(), "h", fake_media());
    write_rank_result(rank_result_path(o.out_dir, r), part);
    parts.push_back(read_rank_result(rank_result_path(o.out_dir, r)));
    EXPECT_EQ(parts.back().summary.samples_in, r == 0 ? 6 : 5);
  }
  const PackSummary total = write_pack_manifest(o, "h", parts);
  EXPECT_EQ(total.samples_in, 11);
  EXPECT_EQ(total.samples_packed, 4);
  EXPECT_EQ(total.skipped_total(), 7);
  std::set<int64_t> lines;
  for (const ShardDocument& d : read_all_documents(o.out_dir)) lines.insert(d.sample_index);
  EXPECT_EQ(lines, (std::set<int64_t>{1, 2, 3, 12}));
  EXPECT_EQ(read_manifest(o.out_dir + "/manifest.json").shards.front().file, "shard-00000-00000.h5");
  fs::remove_all(f.dir);
}

// Names in `dir`, sorted: shows what a pack left behind beside its output.
std::set<std::string> entries(const fs::path& dir) {
  std::set<std::string> names;
  for (const fs::directory_entry& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

TEST(Packer, RefusesAnExistingPackUnlessOverwriteAndReplacesItWhole) {
  const Fixture f = write_inputs("overwrite");
  PackOptions o = options_for(f, "out");
  EXPECT_EQ(pack(o, qwen_tokenizer(), "h", fake_media()).samples_packed, 4);
  const std::string manifest = slurp(o.out_dir + "/manifest.json");
  // A second pack into the same folder (here of a smaller input) must not replace the first one silently.
  const std::string small = (f.dir / "small.jsonl").string();
  std::ofstream(small) << slurp(f.input).substr(0, slurp(f.input).find('\n') + 1);
  const std::set<std::string> before = entries(f.dir);
  o.inputs = {small};
  test::expect_error([&] { pack(o, qwen_tokenizer(), "h", fake_media()); },
                     "pack: --out " + o.out_dir + " is not empty (an earlier pack?); pass --overwrite to replace it");
  EXPECT_EQ(slurp(o.out_dir + "/manifest.json"), manifest);

  o.overwrite = true;
  EXPECT_EQ(pack(o, qwen_tokenizer(), "h", fake_media()).samples_packed, 1);
  EXPECT_EQ(read_all_documents(o.out_dir).size(), 1u);
  EXPECT_EQ(entries(f.dir), before);  // no staging or moved-aside folder is left beside it
  // Only a pack is replaced: --overwrite refuses a folder without a manifest.
  const fs::path other = f.dir / "not_a_pack";
  fs::create_directories(other);
  std::ofstream(other / "notes.txt") << "keep";
  o.out_dir = other.string();
  test::expect_error([&] { pack(o, qwen_tokenizer(), "h", fake_media()); },
                     "holds no manifest.json; --overwrite replaces only an earlier pack");
  EXPECT_EQ(slurp((other / "notes.txt").string()), "keep");
  // An existing empty folder is a fine output.
  o.overwrite = false;
  o.out_dir = (f.dir / "empty").string();
  fs::create_directories(o.out_dir);
  EXPECT_EQ(pack(o, qwen_tokenizer(), "h", fake_media()).samples_packed, 1);
  fs::remove_all(f.dir);
}

TEST(Packer, FailedPackLeavesNoFolder) {
  const fs::path dir = temp_dir("failed");
  PackOptions o;
  o.inputs = {"/nonexistent/x.jsonl"};
  o.out_dir = (dir / "out").string();
  test::expect_error([&] { pack(o, qwen_tokenizer(), "h", MediaDecoder{}); }, "cannot open input /nonexistent/x.jsonl");
  EXPECT_TRUE(entries(dir).empty());  // neither out nor its staging folder
  fs::remove_all(dir);
}

TEST(Packer, WholeRunErrors) {
  PackOptions o;
  o.inputs = {"/nonexistent/x.jsonl"};
  o.out_dir = (temp_dir("errors") / "out").string();
  test::expect_error([&] { pack(o, qwen_tokenizer(), "h", MediaDecoder{}); }, "cannot open input /nonexistent/x.jsonl");
  o.world = 2;
  o.rank = 2;
  test::expect_error([&] { pack_rank(o, qwen_tokenizer(), "h", MediaDecoder{}); }, "rank 2 is outside world size 2");
}

}  // namespace
}  // namespace q3vl::io
