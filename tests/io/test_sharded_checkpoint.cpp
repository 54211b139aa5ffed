// Sharded checkpoints on the tiny MoE flavor: every parameter cut the way 3 ranks would hold it (uneven pieces,
// several pieces of one tensor on one rank, one rank empty), written and read back by element ranges bit for
// bit; the whole-tensor format (f32 or bf16 weights) through the same reader; listing and pruning across both
// formats; and the errors: coverage gaps and overlaps at finish, damaged checkpoints at the reader, a full disk
// mid-shard.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/check.h"
#include "core/model/param_specs.h"
#include "io/checkpoint.h"
#include "io/float16.h"
#include "io/hf_config.h"
#include "io/sharded_checkpoint.h"
#include "io/train_checkpoint.h"
#include "tests/io/checkpoint_fixtures.h"
#include "tests/support/gradcheck.h"
#include "tests/support/test_files.h"

namespace q3vl::io {
namespace {

using test_fixtures::complete_steps;
using test_fixtures::dir_entries;
using test_fixtures::small_vocab;

namespace fs = std::filesystem;
using test::TempDir;
using json = nlohmann::json;
using Field = CheckpointReader::Field;

// The flavors of this source tree, wherever the build directory is (an explicit Q3VL_FLAVORS_DIR wins).
const bool kFlavorsFromSourceTree = ::setenv("Q3VL_FLAVORS_DIR", Q3VL_SOURCE_DIR "/jobs/flavors", 0) == 0;

constexpr int kRanks = 3;
constexpr const char* kLayout = R"({"fsdp": 2, "ep": 1, "ranks": 3})";
constexpr const char* kYaml = "train:\n  steps: 10\n";

std::string state_json(int64_t step) { return json{{"step", step}, {"rng", {1, 2, 3}}}.dump(); }

// Every field of every parameter, from a seeded stream of arbitrary floats (distinct per element, so a read
// from the wrong place differs).
struct FullState {
  std::vector<ParamSpec> specs;
  std::map<std::string, std::array<std::vector<float>, 3>> fields;  // key -> param, exp_avg, exp_avg_sq

  FullState(const ModelConfig& config, uint32_t seed) : specs(model_param_specs(config)) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (const ParamSpec& s : specs)
      for (std::vector<float>& v : fields[s.hf_key]) {
        v.resize(static_cast<size_t>(s.numel()));
        for (float& x : v) x = uniform(rng);
      }
  }

  const float* data(const std::string& key, Field field) const {
    return fields.at(key)[static_cast<size_t>(field)].data();
  }

  ShardPiece piece(const std::string& key, int64_t offset, int64_t numel) const {
    return {key,
            offset,
            numel,
            data(key, Field::param) + offset,
            data(key, Field::exp_avg) + offset,
            data(key, Field::exp_avg_sq) + offset};
  }

  // How 3 ranks hold the parameters: rank 2 holds nothing; parameter i is cut by one of four patterns
  // (whole on one rank; two uneven pieces; three pieces with two on rank 1; up to ~50 pieces alternating,
  // 7 elements or more).
  std::array<std::vector<ShardPiece>, kRanks> pieces() const {
    std::array<std::vector<ShardPiece>, kRanks> by_rank;
    for (size_t i = 0; i < specs.size(); ++i) {
      const std::string& key = specs[i].hf_key;
      const int64_t n = specs[i].numel();
      const size_t pattern = n < 3 ? 0 : i % 4;
      if (pattern == 0) {
        by_rank[i % 2].push_back(piece(key, 0, n));
      } else if (pattern == 1) {
        by_rank[0].push_back(piece(key, 0, n / 3));
        by_rank[1].push_back(piece(key, n / 3, n - n / 3));
      } else if (pattern == 2) {
        by_rank[1].push_back(piece(key, 0, n / 5 + 1));
        by_rank[0].push_back(piece(key, n / 5 + 1, n / 2 - (n / 5 + 1)));
        by_rank[1].push_back(piece(key, n / 2, n - n / 2));
      } else {
        const int64_t chunk = std::max<int64_t>(7, n / 50);
        for (int64_t at = 0, k = 0; at < n; at += chunk, ++k)
          by_rank[k % 2].push_back(piece(key, at, std::min(chunk, n - at)));
      }
    }
    return by_rank;
  }

  // What save_train_checkpoint takes: views of these vectors.
  TrainCheckpointWrite whole(const ModelConfig& config, int64_t step, bool with_moments) const {
    TrainCheckpointWrite w;
    w.step = step;
    w.model_config = &config;
    w.weights = [this](const std::string& key) {
      for (const ParamSpec& s : specs)
        if (s.hf_key == key) return Tensor(const_cast<float*>(data(key, Field::param)), DType::f32, s.shape);
      return Tensor();
    };
    if (with_moments)
      for (const ParamSpec& s : specs) {
        w.optimizer.push_back(
            {s.hf_key + ".exp_avg", Tensor(const_cast<float*>(data(s.hf_key, Field::exp_avg)), DType::f32, s.shape)});
        w.optimizer.push_back({s.hf_key + ".exp_avg_sq",
                               Tensor(const_cast<float*>(data(s.hf_key, Field::exp_avg_sq)), DType::f32, s.shape)});
      }
    w.trainer_state_json = state_json(step);
    w.config_yaml = kYaml;
    return w;
  }
};

std::string save_sharded(const std::string& root, int64_t step, const ModelConfig& config, const FullState& state,
                         int keep = 3) {
  const std::string tmp = begin_sharded_checkpoint(root, step, "job-1");
  std::vector<std::string> entries;
  const auto by_rank = state.pieces();
  for (int r = 0; r < kRanks; ++r) entries.push_back(write_checkpoint_shard(tmp, r, by_rank[r]));
  return finish_sharded_checkpoint(root, tmp, step, config, kLayout, entries, state_json(step), kYaml, keep);
}

// Reads [offset, offset + numel) of each field through `reader` and compares bytes with the source; a read
// fills the destination exactly (the guard element after it must survive).
void expect_range(const CheckpointReader& reader, const FullState& state, const std::string& key, int64_t offset,
                  int64_t numel, const std::vector<Field>& fields) {
  for (Field field : fields) {
    std::vector<float> got(static_cast<size_t>(numel) + 1, 12345.0f);
    reader.read(key, field, offset, numel, got.data());
    const float* want = state.data(key, field) + offset;
    EXPECT_EQ(std::memcmp(got.data(), want, static_cast<size_t>(numel) * sizeof(float)), 0)
        << key << " field " << static_cast<int>(field) << " [" << offset << ", " << offset + numel << ")";
    EXPECT_EQ(got.back(), 12345.0f) << key << ": read past the requested range";
  }
}

// Every whole tensor, every range around each piece boundary of the 3-rank cut, and random ranges.
void expect_reads_match(const CheckpointReader& reader, const FullState& state, const std::vector<Field>& fields) {
  for (const ParamSpec& s : state.specs) expect_range(reader, state, s.hf_key, 0, s.numel(), fields);
  for (const auto& rank : state.pieces())
    for (const ShardPiece& p : rank) {
      const int64_t n = state.fields.at(p.key)[0].size();
      const int64_t lo = std::max<int64_t>(0, p.offset - 3), hi = std::min<int64_t>(n, p.offset + p.numel + 4);
      expect_range(reader, state, p.key, lo, hi - lo, fields);
    }
  std::mt19937 rng(7);
  for (int i = 0; i < 200; ++i) {
    const ParamSpec& s = state.specs[rng() % state.specs.size()];
    const int64_t offset = static_cast<int64_t>(rng() % static_cast<uint32_t>(s.numel()));
    const int64_t numel = static_cast<int64_t>(rng() % static_cast<uint32_t>(s.numel() - offset + 1));
    expect_range(reader, state, s.hf_key, offset, numel, fields);
  }
}

TEST(ShardedCheckpoint, ThreeRankShardsReadBackBitForBitByAnyRange) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const FullState state(config, 11);
  const auto by_rank = state.pieces();
  ASSERT_TRUE(by_rank[2].empty());
  const std::string root = tmp / "run";
  const std::string dir = save_sharded(root, 5, config, state);
  EXPECT_EQ(dir, root + "/step-00000005");
  EXPECT_EQ(dir_entries(root), std::set<std::string>{"step-00000005"});
  EXPECT_EQ(dir_entries(dir),
            (std::set<std::string>{"COMPLETE", "config.json", "config.yaml", "manifest.json", "shard-00000.safetensors",
                                   "shard-00001.safetensors", "shard-00002.safetensors", "trainer_state.json"}));
  EXPECT_EQ(complete_steps(root), std::vector<int64_t>{5});
  EXPECT_EQ(hf_config_json(load_model_config(dir), DType::f32), hf_config_json(config, DType::f32));
  EXPECT_TRUE(SafetensorsFile(dir + "/shard-00002.safetensors").tensors().empty());
  const json manifest = json::parse(test::read_all(dir + "/manifest.json"));
  EXPECT_EQ(manifest["format"], 1);
  EXPECT_EQ(manifest["layout"], json::parse(kLayout));
  EXPECT_EQ(manifest["tensors"].size(), state.specs.size());
  ASSERT_EQ(manifest["shards"].size(), 3u);
  EXPECT_EQ(manifest["shards"][1]["file"], "shard-00001.safetensors");
  EXPECT_EQ(manifest["shards"][1]["pieces"].size(), by_rank[1].size());

  const CheckpointReader reader(dir, config);
  EXPECT_TRUE(reader.sharded());
  EXPECT_EQ(reader.trainer_state_json(), state_json(5));
  EXPECT_EQ(reader.config_yaml(), kYaml);
  EXPECT_EQ(json::parse(reader.layout_json()), json::parse(kLayout));
  expect_reads_match(reader, state, {Field::param, Field::exp_avg, Field::exp_avg_sq});

  const std::string norm = "model.language_model.norm.weight";
  float sink[4];
  test::expect_error([&] { reader.read("model.no_such.weight", Field::param, 0, 1, sink); },
                     "checkpoint " + dir + ": no parameter 'model.no_such.weight'");
  test::expect_error([&] { reader.read(norm, Field::exp_avg, 62, 4, sink); },
                     "elements [62, 66) of '" + norm + "' are out of range: it has 64 elements");
  test::expect_error([&] { reader.read(norm, Field::param, -1, 2, sink); }, "elements [-1, 1) of '" + norm + "'");
}

TEST(ShardedCheckpoint, ReaderReadsTheWholeTensorFormat) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const FullState state(config, 12);
  const std::string dir = save_train_checkpoint(tmp / "run", state.whole(config, 3, true), 1);
  const CheckpointReader reader(dir, config);
  EXPECT_FALSE(reader.sharded());
  EXPECT_EQ(reader.layout_json(), "{}");
  EXPECT_EQ(reader.trainer_state_json(), state_json(3));
  EXPECT_EQ(reader.config_yaml(), kYaml);
  expect_reads_match(reader, state, {Field::param, Field::exp_avg, Field::exp_avg_sq});

  // Weights stored in bf16 (an HF export dropped into model/) read as their exact f32 widening.
  save_hf_checkpoint(dir + "/model", config, state.whole(config, 3, false).weights, DType::bf16, 0);
  const CheckpointReader bf16_reader(dir, config);
  const std::string q_proj = "model.language_model.layers.1.self_attn.q_proj.weight";
  std::vector<float> got(300);
  bf16_reader.read(q_proj, Field::param, 50, 300, got.data());
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got[i], bf16_to_f32(f32_to_bf16(state.data(q_proj, Field::param)[50 + i]))) << "element " << 50 + i;
  expect_range(bf16_reader, state, q_proj, 50, 300, {Field::exp_avg});

  // A whole-tensor checkpoint without moments (an optimizer without state) reads weights only.
  const std::string bare = save_train_checkpoint(tmp / "bare", state.whole(config, 4, false), 1);
  const CheckpointReader bare_reader(bare, config);
  const std::string norm = "model.language_model.norm.weight";
  expect_range(bare_reader, state, norm, 10, 20, {Field::param});
  float sink[20];
  test::expect_error([&] { bare_reader.read(norm, Field::exp_avg_sq, 10, 20, sink); },
                     "checkpoint " + bare + " holds no exp_avg_sq for '" + norm + "' (reading elements [10, 30))");
}

TEST(ShardedCheckpoint, BothFormatsShareListingPruningAndStepReplacement) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const FullState first(config, 1), second(config, 2);
  const std::string root = tmp / "run";
  save_train_checkpoint(root, first.whole(config, 1, true), 2);
  save_sharded(root, 2, config, first, 2);
  EXPECT_EQ(complete_steps(root), (std::vector<int64_t>{1, 2}));
  save_sharded(root, 3, config, first, 2);
  EXPECT_EQ(complete_steps(root), (std::vector<int64_t>{2, 3}));
  // Saving step 3 again (other values) replaces it; a whole-tensor save of step 4 then prunes step 2.
  const std::string three = save_sharded(root, 3, config, second, 2);
  expect_range(CheckpointReader(three, config), second, "lm_head.weight", 100, 300, {Field::param, Field::exp_avg});
  save_train_checkpoint(root, first.whole(config, 4, true), 2);
  EXPECT_EQ(complete_steps(root), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(dir_entries(root), (std::set<std::string>{"step-00000003", "step-00000004"}));
}

// A shard set that does not cover the model exactly once is refused at finish, and nothing is published.
TEST(ShardedCheckpoint, FinishRefusesGapsOverlapsAndStrangers) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const FullState state(config, 3);
  const std::string root = tmp / "run";
  const auto base = state.pieces();
  // A piece of rank 0 inside its tensor (neither first nor last), to drop or to cover twice.
  size_t middle_index = 0;
  while (middle_index < base[0].size() &&
         (base[0][middle_index].offset == 0 ||
          base[0][middle_index].offset + base[0][middle_index].numel ==
              static_cast<int64_t>(state.fields.at(base[0][middle_index].key)[0].size())))
    ++middle_index;
  ASSERT_LT(middle_index, base[0].size());
  const ShardPiece middle = base[0][middle_index];
  const std::string param =
      "parameter '" + middle.key + "' (" + std::to_string(state.fields.at(middle.key)[0].size()) + " elements): ";

  struct Case {
    std::string name;
    std::function<void(std::array<std::vector<ShardPiece>, kRanks>&)> change;
    std::string message;
  };
  const std::vector<Case> cases{
      {"gap", [&](auto& r) { r[0].erase(r[0].begin() + static_cast<std::ptrdiff_t>(middle_index)); },
       param + "element " + std::to_string(middle.offset) + " is held by no shard"},
      {"overlap", [&](auto& r) { r[2].push_back(state.piece(middle.key, middle.offset + 2, 3)); },
       param + "element " + std::to_string(middle.offset + 2) + " is held twice, by shard-00000.safetensors"},
      {"beyond",
       [&](auto& r) {
         const int64_t n = static_cast<int64_t>(state.fields.at(middle.key)[0].size());
         r[2].push_back(state.piece(middle.key, n - 1, 1));
         r[2].back().offset = n;
       },
       param + "the piece [" + std::to_string(state.fields.at(middle.key)[0].size()) + ", "},
      {"stranger",
       [&](auto& r) {
         r[2].push_back(state.piece(middle.key, 0, 1));
         r[2].back().key = "model.extra";
       },
       "shard-00002.safetensors holds a piece of 'model.extra', which is not a parameter of this model"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto by_rank = base;
    c.change(by_rank);
    const std::string tmp_dir = begin_sharded_checkpoint(root, 1, "job");
    std::vector<std::string> entries;
    for (int r = 0; r < kRanks; ++r) entries.push_back(write_checkpoint_shard(tmp_dir, r, by_rank[r]));
    test::expect_error(
        [&] { finish_sharded_checkpoint(root, tmp_dir, 1, config, kLayout, entries, state_json(1), kYaml, 1); },
        c.message);
    EXPECT_TRUE(dir_entries(root).empty()) << "a refused finish left something behind";
  }

  // Bad JSON is refused before anything is written, and only a temporary folder of this step is accepted.
  std::string tmp_dir = begin_sharded_checkpoint(root, 1, "job");
  std::vector<std::string> entries;
  for (int r = 0; r < kRanks; ++r) entries.push_back(write_checkpoint_shard(tmp_dir, r, base[r]));
  test::expect_error(
      [&] { finish_sharded_checkpoint(root, tmp_dir, 1, config, kLayout, entries, "{\"step\":", kYaml, 1); },
      "the trainer state is not valid JSON");
  EXPECT_TRUE(dir_entries(root).empty());
  tmp_dir = begin_sharded_checkpoint(root, 1, "job");
  test::expect_error([&] { finish_sharded_checkpoint(root, tmp_dir, 2, config, kLayout, {}, state_json(1), kYaml, 1); },
                     "is not a temporary folder of step 2 under " + root);
  EXPECT_TRUE(fs::is_directory(tmp_dir)) << "a folder finish does not own was removed";
  test::expect_error([&] { begin_sharded_checkpoint(root, 1, "../x"); }, "tag '../x' is not a plain name");
}

TEST(ShardedCheckpoint, DamagedCheckpointsAreRefusedNamingTheFile) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const FullState state(config, 4);
  const std::string good = save_sharded(tmp / "run", 1, config, state);
  struct Damage {
    std::string name;
    std::function<void(const std::string& dir)> damage;
    std::string message;  // after "<dir>"
  };
  const std::vector<Damage> cases{
      {"deleted_shard", [](const std::string& d) { fs::remove(d + "/shard-00001.safetensors"); },
       ": shard file shard-00001.safetensors listed in manifest.json is missing"},
      {"truncated_shard",
       [](const std::string& d) {
         const std::string bytes = test::read_all(d + "/shard-00000.safetensors");
         test::write_all(d + "/shard-00000.safetensors", bytes.substr(0, bytes.size() - 100));
       },
       "/shard-00000.safetensors is truncated"},
      {"bad_manifest", [](const std::string& d) { test::write_all(d + "/manifest.json", "{\"format\": 1,"); },
       "/manifest.json is not valid JSON"},
      {"manifest_gap",
       [](const std::string& d) {
         json m = json::parse(test::read_all(d + "/manifest.json"));
         m["shards"][0]["pieces"].erase(0);
         test::write_all(d + "/manifest.json", m.dump());
       },
       "/manifest.json: parameter '"},
      {"no_marker", [](const std::string& d) { fs::remove(d + "/COMPLETE"); },
       " is incomplete: it has no COMPLETE marker"},
  };
  for (const Damage& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = tmp / c.name;
    fs::copy(good, dir, fs::copy_options::recursive);
    c.damage(dir);
    test::expect_error([&] { const CheckpointReader reader(dir, config); }, dir + c.message);
  }

  ModelConfig wider = config;
  wider.text.moe_intermediate_size = 32;
  test::expect_error([&] { const CheckpointReader reader(good, wider); },
                     good +
                         "/config.json: the model config differs from this run's at "
                         "'text_config.moe_intermediate_size': the checkpoint has 48, the run has 32");
}

TEST(ShardedCheckpoint, FullDiskDuringAShardLeavesNoNewCompleteCheckpoint) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const FullState state(config, 5), later(config, 6);
  const std::string root = tmp / "run";
  const std::string one = save_sharded(root, 1, config, state, 1);

  const auto by_rank = later.pieces();
  const std::string tmp_dir = begin_sharded_checkpoint(root, 2, "job-1");
  write_checkpoint_shard(tmp_dir, 0, by_rank[0]);
  set_write_fault_after_bytes(1000);
  test::expect_error([&] { write_checkpoint_shard(tmp_dir, 1, by_rank[1]); },
                     "checkpoint: cannot write " + tmp_dir + "/shard-00001.safetensors: No space left on device");
  set_write_fault_after_bytes(-1);
  EXPECT_FALSE(fs::exists(tmp_dir + "/shard-00001.safetensors")) << "the partial shard file was left behind";
  EXPECT_EQ(complete_steps(root), std::vector<int64_t>{1});
  ASSERT_TRUE(latest_complete_checkpoint(root).has_value());
  EXPECT_EQ(latest_complete_checkpoint(root)->path, one);
  expect_range(CheckpointReader(one, config), state, "lm_head.weight", 0, 64, {Field::param, Field::exp_avg_sq});

  // The retry (same tag) replaces the stale temporary folder; the earlier checkpoint goes once it succeeds.
  save_sharded(root, 2, config, later, 1);
  EXPECT_EQ(complete_steps(root), std::vector<int64_t>{2});
  EXPECT_EQ(dir_entries(root), std::set<std::string>{"step-00000002"});
}

}  // namespace
}  // namespace q3vl::io
