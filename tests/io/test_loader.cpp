// Loader: position ids per SPEC get_rope_index (hand-computed), batches (cu_seqlens, labels, normalised
// patches), deterministic shuffle, strided and cost-balanced rank split, exact resume from saved state, and
// manifest/shard checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
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

// Sequence s holds one document {1000 + s, 7, vs, pads, ve, 8, 9} with an image of grid (1, 2 * rows[s], 4):
// 6 + 2 * rows[s] tokens and 8 * rows[s] patches, so the default cost is 6 + 10 * rows[s]. Two shards.
fs::path make_sized_dataset(const std::string& name, const std::vector<int32_t>& rows) {
  const fs::path dir = fs::temp_directory_path() / ("q3vl_test_loader_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  Manifest m{kShardFormatVersion, "fnv1a64:test", 64, {"synthetic.jsonl"}, {}, ""};
  const int n = static_cast<int>(rows.size());
  for (int shard = 0; shard < 2; ++shard) {
    std::vector<ShardSequence> seqs;
    for (int s = shard * n / 2; s < (shard + 1) * n / 2; ++s) {
      std::vector<int32_t> tok{1000 + s, 7, kVs};
      tok.insert(tok.end(), 2 * rows[s], kPadImage);
      tok.insert(tok.end(), {kVe, 8, 9});
      std::vector<int32_t> lab(tok.size(), -100);
      lab.back() = 9;
      ShardSequence seq;
      seq.documents.push_back({0, s, tok, lab, {item(VisionKind::image, 1, 2 * rows[s], 4, 3, static_cast<uint8_t>(s))}});
      seqs.push_back(seq);
    }
    const std::string file = "shard-00000-0000" + std::to_string(shard) + ".h5";
    m.shards.push_back({file, write_shard((dir / file).string(), ShardHeader{kShardFormatVersion, m.tokenizer_hash, 64}, seqs)});
  }
  write_manifest((dir / "manifest.json").string(), m);
  return dir;
}

double default_cost(int32_t rows) { return 6 + 10.0 * rows; }

// The epoch's permutation (it does not depend on the world size): one rank, one batch of all sequences.
std::vector<int64_t> epoch_permutation(const fs::path& dir, uint64_t seed, int n) {
  LoaderOptions o;
  o.dir = dir.string();
  o.state.seed = seed;
  o.sequences_per_batch = n;
  return Loader(o).next().sequence_ids;
}

// Every rank's first `steps` batches: [rank][step].
std::vector<std::vector<Batch>> run_ranks(LoaderOptions o, int world, int steps) {
  std::vector<std::vector<Batch>> out(world);
  o.world = world;
  for (int r = 0; r < world; ++r) {
    o.rank = r;
    Loader loader(o);
    for (int i = 0; i < steps; ++i) out[r].push_back(loader.next());
  }
  return out;
}

void expect_same_batch(const Batch& a, const Batch& b) {
  EXPECT_EQ(a.sequence_ids, b.sequence_ids);
  EXPECT_EQ(a.cost, b.cost);
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

TEST(Loader, BalancedStepsHoldTheStridedSets) {
  std::vector<int32_t> rows(26);
  for (int s = 0; s < 26; ++s) rows[s] = 1 + (s * 7) % 5;
  const fs::path dir = make_sized_dataset("balanced_sets", rows);
  const std::vector<int64_t> order = epoch_permutation(dir, 5, 26);
  std::map<int64_t, int64_t> position_of;
  for (size_t p = 0; p < order.size(); ++p) position_of[order[p]] = static_cast<int64_t>(p);
  constexpr int spb = 2;
  for (const int world : {2, 3, 4}) {
    SCOPED_TRACE("world " + std::to_string(world));
    LoaderOptions o;
    o.dir = dir.string();
    o.state.seed = 5;
    o.sequences_per_batch = spb;
    const int steps = 26 / world / spb;
    o.balance = false;
    const auto strided = run_ranks(o, world, steps);
    o.balance = true;
    const auto balanced = run_ranks(o, world, steps);
    const auto again = run_ranks(o, world, steps);
    for (int p = 0; p < steps; ++p) {
      std::vector<int64_t> step_set(order.begin() + p * world * spb, order.begin() + (p + 1) * world * spb);
      std::sort(step_set.begin(), step_set.end());
      std::vector<int64_t> strided_union, balanced_union;
      for (int r = 0; r < world; ++r) {
        for (int s = 0; s < spb; ++s) EXPECT_EQ(strided[r][p].sequence_ids.at(s), order[(p * spb + s) * world + r]);
        const Batch& b = balanced[r][p];
        ASSERT_EQ(b.sequence_ids.size(), static_cast<size_t>(spb));
        EXPECT_TRUE(std::is_sorted(b.sequence_ids.begin(), b.sequence_ids.end(),
                                   [&](int64_t x, int64_t y) { return position_of[x] < position_of[y]; }));
        double cost = 0;
        for (const int64_t id : b.sequence_ids) cost += default_cost(rows[id]);
        EXPECT_EQ(b.cost, cost);  // small integers: exact in double
        expect_same_batch(b, again[r][p]);
        strided_union.insert(strided_union.end(), strided[r][p].sequence_ids.begin(), strided[r][p].sequence_ids.end());
        balanced_union.insert(balanced_union.end(), b.sequence_ids.begin(), b.sequence_ids.end());
      }
      // Sorted, not deduplicated: each of the step's sequences goes to exactly one rank.
      std::sort(strided_union.begin(), strided_union.end());
      std::sort(balanced_union.begin(), balanced_union.end());
      EXPECT_EQ(strided_union, step_set);
      EXPECT_EQ(balanced_union, step_set);
    }
  }
  fs::remove_all(dir);
}

TEST(Loader, BalancingEvensHeavySequences) {
  // Light sequences cost 6 + 10 = 16, heavy ones 6 + 40 = 46 (default cost). Strided puts both heavy sequences
  // of step 0 on rank 0 (92 against 32). LPT: heavy -> r0, heavy -> r1, then the lights fill the lightest
  // ranks with room: world 2: {62, 62}; world 3: r2 takes two lights first, {62, 62, 32}, which is optimal
  // (some rank holds two lights; the two heavies apart, each with a light, give the least maximum).
  for (const int world : {2, 3}) {
    SCOPED_TRACE("world " + std::to_string(world));
    const int n = 4 * world;  // 2 steps of 2 sequences per rank
    std::vector<int32_t> rows(n, 1);
    const fs::path uniform = make_sized_dataset("heavy_uniform", rows);
    LoaderOptions o;
    o.dir = uniform.string();
    o.state.seed = 77;
    o.sequences_per_batch = 2;
    o.world = world;
    o.balance = false;
    const std::vector<int64_t> heavy = Loader(o).next().sequence_ids;  // rank 0's first batch
    fs::remove_all(uniform);
    for (const int64_t id : heavy) rows[id] = 4;
    const fs::path dir = make_sized_dataset("heavy", rows);  // same N and seed: same permutation
    o.dir = dir.string();
    const std::vector<int64_t> order = epoch_permutation(dir, 77, n);

    const auto load_ratio = [](const std::vector<double>& loads) {
      return *std::max_element(loads.begin(), loads.end()) / *std::min_element(loads.begin(), loads.end());
    };
    std::vector<double> strided, balanced;
    const auto strided_batches = run_ranks(o, world, 1);
    o.balance = true;
    const auto balanced_batches = run_ranks(o, world, 1);
    for (int r = 0; r < world; ++r) {
      strided.push_back(strided_batches[r][0].cost);
      balanced.push_back(balanced_batches[r][0].cost);
    }
    EXPECT_EQ(strided_batches[0][0].sequence_ids, heavy);
    EXPECT_DOUBLE_EQ(load_ratio(strided), 92.0 / 32.0);
    const std::vector<double> want = world == 2 ? std::vector<double>{62, 62} : std::vector<double>{62, 62, 32};
    EXPECT_EQ(balanced, want);  // small integers: exact in double
    EXPECT_DOUBLE_EQ(load_ratio(balanced), world == 2 ? 1.0 : 62.0 / 32.0);
    // Rank 0 holds the first heavy sequence (heaviest, lowest position); with world 3, rank 2 the first two lights.
    EXPECT_EQ(balanced_batches[0][0].sequence_ids.size(), 2u);
    EXPECT_TRUE(std::find(balanced_batches[0][0].sequence_ids.begin(), balanced_batches[0][0].sequence_ids.end(),
                          heavy[0]) != balanced_batches[0][0].sequence_ids.end());
    if (world == 3) {
      std::vector<int64_t> lights;
      for (int p = 0; p < 2 * world; ++p)
        if (rows[order[p]] == 1 && lights.size() < 2) lights.push_back(order[p]);
      EXPECT_EQ(balanced_batches[2][0].sequence_ids, lights);
    }
    fs::remove_all(dir);
  }
}

TEST(Loader, EqualCostsBalanceLikeStrided) {
  // With every cost equal the ties decide: positions in order, each to the lowest rank among the least
  // loaded, which is the strided deal. Also shows LoaderOptions::cost replaces the default.
  std::vector<int32_t> rows(12);
  for (int s = 0; s < 12; ++s) rows[s] = 1 + s % 3;
  const fs::path dir = make_sized_dataset("equal_costs", rows);
  LoaderOptions o;
  o.dir = dir.string();
  o.state.seed = 11;
  o.sequences_per_batch = 2;
  o.cost = [](const SequenceCost&) { return 2.5; };
  o.balance = false;
  const auto strided = run_ranks(o, 3, 2);
  o.balance = true;
  const auto balanced = run_ranks(o, 3, 2);
  for (int r = 0; r < 3; ++r)
    for (int p = 0; p < 2; ++p) {
      expect_same_batch(balanced[r][p], strided[r][p]);
      EXPECT_EQ(balanced[r][p].cost, 5.0);
    }
  o.cost = [](const SequenceCost& c) { return c.tokens() > 8 ? -1.0 : 1.0; };
  o.world = 2;
  test::expect_error([&] { Loader loader(o); }, "cost of sequence");
  fs::remove_all(dir);
}

TEST(Loader, BalancedResumeEqualsStraightRun) {
  std::vector<int32_t> rows(20);
  for (int s = 0; s < 20; ++s) rows[s] = 1 + (s * 3) % 4;
  const fs::path dir = make_sized_dataset("balanced_resume", rows);
  LoaderOptions o;
  o.dir = dir.string();
  o.state.seed = 42;
  o.rank = 1;
  o.world = 3;
  o.sequences_per_batch = 2;  // 20 / 3 / 2 = 3 steps per epoch: N + M crosses two epochs
  constexpr int N = 2, M = 5;
  std::vector<Batch> straight;
  {
    Loader loader(o);
    EXPECT_EQ(loader.batches_per_epoch(), 3);
    for (int i = 0; i < N + M; ++i) straight.push_back(loader.next());
  }
  LoaderState saved;
  {
    Loader loader(o);
    for (int i = 0; i < N; ++i) expect_same_batch(loader.next(), straight[i]);
    saved = loader.state();
  }
  EXPECT_EQ(saved, (LoaderState{42, 0, 2}));
  LoaderOptions resumed = o;
  resumed.state = saved;
  Loader loader(resumed);
  for (int i = 0; i < M; ++i) expect_same_batch(loader.next(), straight[N + i]);
  loader.restore(LoaderState{42, 1, 1});
  expect_same_batch(loader.next(), straight[4]);
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
