// Loader: position ids per SPEC get_rope_index (hand-computed), batches (cu_seqlens, labels, normalised
// patches), deterministic shuffle, rank split, exact resume from saved state, and manifest/shard checks.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "io/io_version.h"
#include "io/loader.h"
#include "io/patchify.h"
#include "tests/support/gradcheck.h"

namespace q3vl::io {
namespace {

namespace fs = std::filesystem;

constexpr int32_t kPadImage = 151655, kPadVideo = 151656, kVs = 151652, kVe = 151653;

ShardItem item(VisionKind kind, int32_t t, int32_t h, int32_t w, int64_t offset, uint8_t fill_seed) {
  ShardItem it;
  it.kind = kind;
  it.grid_t = t;
  it.grid_h = h;
  it.grid_w = w;
  it.frames = stored_frames(kind, t);
  it.height = h * kPatchSize;
  it.width = w * kPatchSize;
  it.token_offset = offset;
  it.pixels.resize(static_cast<size_t>(it.frames) * it.height * it.width * 3);
  for (size_t i = 0; i < it.pixels.size(); ++i) it.pixels[i] = static_cast<uint8_t>((i * 31 + fill_seed) % 256);
  return it;
}

TEST(LoaderPositions, ImageAndVideoSpans) {
  // text text <vs> [image 2x4 merged: 8 pads] <ve> text
  std::vector<int32_t> tokens{10, 11, kVs};
  tokens.insert(tokens.end(), 8, kPadImage);
  tokens.insert(tokens.end(), {kVe, 12});
  const std::vector<ShardItem> image{item(VisionKind::image, 1, 4, 8, 3, 0)};
  std::vector<int64_t> t(tokens.size()), h(tokens.size()), w(tokens.size());
  document_position_ids(tokens, image, t.data(), h.data(), w.data());
  // Text 0,1,2 (vs at 2); span starts at 3: T=3, H=3+row (rows 0..1), W=3+col (cols 0..3); next = 3+4 = 7.
  EXPECT_EQ(t, (std::vector<int64_t>{0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 7, 8}));
  EXPECT_EQ(h, (std::vector<int64_t>{0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 7, 8}));
  EXPECT_EQ(w, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8}));

  // A video of 2 temporal patches, merged grid 1x2 each, separated by timestamp text: each pair is a span.
  const std::vector<int32_t> vt{20, kVs, kPadVideo, kPadVideo, kVe, 21, kVs, kPadVideo, kPadVideo, kVe};
  const std::vector<ShardItem> video{item(VisionKind::video, 2, 2, 4, 2, 0)};
  std::vector<int64_t> a(vt.size()), b(vt.size()), c(vt.size());
  document_position_ids(vt, video, a.data(), b.data(), c.data());
  // 20:0 vs:1 span@2 (T2 H2 W2,3) next 4: ve:4 21:5 vs:6 span@7 (T7 H7 W7,8) next 9: ve:9
  EXPECT_EQ(a, (std::vector<int64_t>{0, 1, 2, 2, 4, 5, 6, 7, 7, 9}));
  EXPECT_EQ(b, (std::vector<int64_t>{0, 1, 2, 2, 4, 5, 6, 7, 7, 9}));
  EXPECT_EQ(c, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));

  std::vector<ShardItem> wrong = image;
  wrong[0].token_offset = 2;
  test::expect_error([&] { document_position_ids(tokens, wrong, t.data(), h.data(), w.data()); }, "expected pad");
}

fs::path make_dataset(const std::string& name, int sequences) {
  const fs::path dir = fs::temp_directory_path() / ("q3vl_test_loader_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  Manifest m{kShardFormatVersion, "fnv1a64:test", 64, {"synthetic.jsonl"}, {}, ""};
  // Two shards; sequence s holds one or two documents whose first token is 1000 + s (identifies it).
  for (int shard = 0; shard < 2; ++shard) {
    std::vector<ShardSequence> seqs;
    for (int s = shard * sequences / 2; s < (shard + 1) * sequences / 2; ++s) {
      ShardSequence seq;
      std::vector<int32_t> tok{1000 + s, 7, kVs};
      tok.insert(tok.end(), 2, kPadImage);
      tok.insert(tok.end(), {kVe, 8, 9});
      std::vector<int32_t> lab(tok.size(), -100);
      lab[tok.size() - 1] = 9;
      ShardDocument d{0, s, tok, lab, {item(VisionKind::image, 1, 2, 4, 3, static_cast<uint8_t>(s))}};
      seq.documents.push_back(d);
      if (s % 2 == 1) seq.documents.push_back(ShardDocument{0, s, {2000 + s, 5, 6}, {-100, 5, 6}, {}});
      seqs.push_back(seq);
    }
    const std::string file = "shard-00000-0000" + std::to_string(shard) + ".h5";
    m.shards.push_back({file, write_shard((dir / file).string(), ShardHeader{kShardFormatVersion, m.tokenizer_hash, 64}, seqs)});
  }
  write_manifest((dir / "manifest.json").string(), m);
  return dir;
}

void expect_same_batch(const Batch& a, const Batch& b) {
  EXPECT_EQ(a.sequence_ids, b.sequence_ids);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.labels, b.labels);
  EXPECT_EQ(a.cu_seqlens, b.cu_seqlens);
  EXPECT_EQ(a.position_ids, b.position_ids);
  EXPECT_EQ(a.pixel_values, b.pixel_values);
  EXPECT_EQ(a.grid_thw, b.grid_thw);
  EXPECT_EQ(a.state_after, b.state_after);
}

TEST(Loader, BatchContents) {
  const fs::path dir = make_dataset("contents", 4);
  LoaderOptions o;
  o.dir = dir.string();
  o.state.seed = 3;
  o.sequences_per_batch = 4;
  Loader loader(o);
  EXPECT_EQ(loader.num_sequences(), 4);
  EXPECT_EQ(loader.batches_per_epoch(), 1);
  const Batch b = loader.next();
  EXPECT_EQ(std::set<int64_t>(b.sequence_ids.begin(), b.sequence_ids.end()), (std::set<int64_t>{0, 1, 2, 3}));
  // 4 image documents of 8 tokens, 2 text documents of 3.
  EXPECT_EQ(b.num_tokens(), 4 * 8 + 2 * 3);
  EXPECT_EQ(b.cu_seqlens.size(), 7u);
  EXPECT_EQ(b.cu_seqlens.back(), b.num_tokens());
  EXPECT_EQ(b.position_ids.size(), 3 * b.tokens.size());
  // Each document restarts its positions at 0.
  for (size_t d = 0; d + 1 < b.cu_seqlens.size(); ++d) EXPECT_EQ(b.position_ids[b.cu_seqlens[d]], 0);
  EXPECT_EQ(b.grid_thw.size(), 4u * 3);
  ASSERT_EQ(b.pixel_values.size(), 4u * 2 * 4 * 1536);
  // The first item's patches equal patchify() of its frame (image numerics: (x/255 - 0.5)/0.5).
  const int64_t first = b.sequence_ids[0];
  const ShardItem it = item(VisionKind::image, 1, 2, 4, 3, static_cast<uint8_t>(first));
  Image frame;
  frame.height = it.height;
  frame.width = it.width;
  frame.pixels = it.pixels;
  const Patches want = patchify(std::span<const Image>(&frame, 1));
  EXPECT_EQ(std::vector<float>(b.pixel_values.begin(), b.pixel_values.begin() + want.values.size()), want.values);
  EXPECT_EQ(b.state_after, (LoaderState{3, 1, 0}));
  fs::remove_all(dir);
}

TEST(Loader, ResumeEqualsStraightRun) {
  const fs::path dir = make_dataset("resume", 10);
  LoaderOptions o;
  o.dir = dir.string();
  o.state.seed = 1234;
  o.sequences_per_batch = 2;  // 5 batches per epoch: N + M crosses epochs
  constexpr int N = 4, M = 9;
  std::vector<Batch> straight;
  {
    Loader loader(o);
    for (int i = 0; i < N + M; ++i) straight.push_back(loader.next());
  }
  LoaderState saved;
  {
    Loader loader(o);
    for (int i = 0; i < N; ++i) expect_same_batch(loader.next(), straight[i]);
    saved = loader.state();
  }
  EXPECT_EQ(saved, (LoaderState{1234, 0, 4}));
  const LoaderState restored = LoaderState::from_json(saved.to_json());
  EXPECT_EQ(restored, saved);
  LoaderOptions resumed = o;
  resumed.state = restored;
  Loader loader(resumed);
  for (int i = 0; i < M; ++i) expect_same_batch(loader.next(), straight[N + i]);
  // restore() on a running loader rewinds too.
  loader.restore(saved);
  expect_same_batch(loader.next(), straight[N]);
  // Epochs: each sees every sequence once, in a different order.
  std::vector<int64_t> e0, e1;
  for (int i = 0; i < 5; ++i) e0.insert(e0.end(), straight[i].sequence_ids.begin(), straight[i].sequence_ids.end());
  for (int i = 5; i < 10; ++i) e1.insert(e1.end(), straight[i].sequence_ids.begin(), straight[i].sequence_ids.end());
  EXPECT_EQ(std::set<int64_t>(e0.begin(), e0.end()).size(), 10u);
  EXPECT_EQ(std::set<int64_t>(e1.begin(), e1.end()).size(), 10u);
  EXPECT_NE(e0, e1);
  fs::remove_all(dir);
}

TEST(Loader, RanksSplitEachEpoch) {
  const fs::path dir = make_dataset("ranks", 10);
  std::vector<int64_t> seen;
  for (int r = 0; r < 3; ++r) {
    LoaderOptions o;
    o.dir = dir.string();
    o.state.seed = 9;
    o.rank = r;
    o.world = 3;
    Loader loader(o);
    EXPECT_EQ(loader.batches_per_epoch(), 3);  // 10 / 3 ranks, remainder dropped
    for (int i = 0; i < 3; ++i) seen.push_back(loader.next().sequence_ids.at(0));
  }
  EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), 9u);
  fs::remove_all(dir);
}

TEST(Loader, ManifestDisagreementFailsAtLoad) {
  const fs::path dir = make_dataset("disagree", 4);
  Manifest m = read_manifest((dir / "manifest.json").string());
  m.shards[1].counts.items += 1;
  write_manifest((dir / "manifest.json").string(), m);
  LoaderOptions o;
  o.dir = dir.string();
  test::expect_error([&] { Loader loader(o); },
                     (dir / "shard-00000-00001.h5").string() + ": dataset item_kind holds 2 items but the manifest says 3");
  m.shards[1].counts.items -= 1;
  write_manifest((dir / "manifest.json").string(), m);
  fs::resize_file(dir / "shard-00000-00000.h5", 100);
  test::expect_error([&] { Loader loader(o); }, (dir / "shard-00000-00000.h5").string() + ": cannot open as HDF5");
  fs::remove_all(dir);
}

TEST(Loader, RejectsBadState) {
  const fs::path dir = make_dataset("state", 4);
  LoaderOptions o;
  o.dir = dir.string();
  o.state.position = 4;
  test::expect_error([&] { Loader loader(o); }, "position 4 is outside [0, 4)");
  test::expect_error([&] { LoaderState::from_json("{\"seed\": 1}"); }, "loader state: invalid JSON");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace q3vl::io
