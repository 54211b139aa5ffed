// HF checkpoint save/load on the tiny flavors: byte-identical save -> load -> save in every storage dtype and
// shard layout, and an error naming key and file for each kind of bad checkpoint.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "core/model/param_specs.h"
#include "core/rng.h"
#include "io/checkpoint.h"
#include "io/float16.h"
#include "io/hf_config.h"
#include "tests/io/checkpoint_fixtures.h"
#include "tests/support/gradcheck.h"
#include "tests/support/test_files.h"

namespace q3vl::io {
namespace {

using test_fixtures::small_vocab;

namespace fs = std::filesystem;
using test::TempDir;
using test::read_all;
using test::write_all;
using json = nlohmann::json;

// The flavors of this source tree, wherever the build directory is (an explicit Q3VL_FLAVORS_DIR wins).
const bool kFlavorsFromSourceTree = ::setenv("Q3VL_FLAVORS_DIR", Q3VL_SOURCE_DIR "/jobs/flavors", 0) == 0;




// f32 storage for every parameter of a config, filled from a Philox stream per tensor.
struct Weights {
  std::map<std::string, std::vector<float>> data;
  std::map<std::string, Shape> shapes;

  Weights(const ModelConfig& config, uint64_t seed) {
    uint64_t stream = 0;
    for (const ParamSpec& s : model_param_specs(config)) {
      auto& v = data[s.hf_key];
      v.resize(static_cast<size_t>(s.numel()));
      shapes[s.hf_key] = s.shape;
      if (seed != 0) fill_uniform(tensor(s.hf_key), Philox(seed, stream++), -0.05, 0.05);
    }
  }
  Tensor tensor(const std::string& key) { return Tensor(data.at(key).data(), DType::f32, shapes.at(key)); }
  WeightLookup lookup() {
    return [this](const std::string& key) { return tensor(key); };
  }
};

// Rewrites the header of a safetensors file through `edit` (data bytes kept).
void edit_header(const std::string& path, const std::function<void(json&)>& edit) {
  const std::string bytes = read_all(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  json header = json::parse(bytes.substr(8, n));
  edit(header);
  const std::string text = header.dump();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  write_all(path, out + text + bytes.substr(8 + n));
}

// Each save -> load -> save must reproduce the files byte for byte; loaded values equal the originals up to
// the storage rounding.
void check_round_trip(const std::string& dir, const ModelConfig& config, DType dt) {
  Weights original(config, 7);
  save_hf_checkpoint(dir + "_a", config, original.lookup(), dt, 0);
  Weights loaded(config, 0);
  load_hf_weights(dir + "_a", config, loaded.lookup());
  save_hf_checkpoint(dir + "_b", config, loaded.lookup(), dt, 0);
  EXPECT_EQ(read_all(dir + "_a/model.safetensors"), read_all(dir + "_b/model.safetensors")) << dir;
  EXPECT_EQ(read_all(dir + "_a/config.json"), read_all(dir + "_b/config.json")) << dir;
  // f32 storage is exact; bf16 (8 significant bits) and f16 (11) round to nearest: relative error <= 2^-8,
  // 2^-11, except in f16's subnormal range (below 2^-14) where the spacing is 2^-24: absolute error <= 2^-25.
  const float rel = dt == DType::f32 ? 0.0f : dt == DType::bf16 ? 0x1p-8f : 0x1p-11f;
  const float abs_floor = dt == DType::f16 ? 0x1p-25f : 0.0f;
  for (const auto& [key, values] : original.data) {
    const auto& got = loaded.data.at(key);
    size_t first_bad = values.size();
    for (size_t i = 0; i < values.size() && first_bad == values.size(); ++i)
      if (!(std::abs(got[i] - values[i]) <= std::max(std::abs(values[i]) * rel, abs_floor))) first_bad = i;
    ASSERT_EQ(first_bad, values.size()) << dir << " " << key << ": stored " << values[first_bad] << ", loaded "
                                        << got[first_bad];
  }
  const ModelConfig reread = read_hf_config(dir + "_a/config.json");
  EXPECT_EQ(reread.tie_word_embeddings, config.tie_word_embeddings);
  EXPECT_EQ(SafetensorsDir(dir + "_a").contains("lm_head.weight"), !config.tie_word_embeddings);
}

TEST(Checkpoint, SaveLoadSaveIsByteIdenticalOnTheTinyFlavors) {
  TempDir tmp;
  for (const std::string flavor : {"tiny-moe", "tiny-dense"})
    check_round_trip(tmp / flavor, load_model_config(flavor), DType::bf16);
}

TEST(Checkpoint, F32AndF16StorageRoundTrip) {
  TempDir tmp;
  check_round_trip(tmp / "f32", small_vocab("tiny-moe"), DType::f32);
  check_round_trip(tmp / "f16", small_vocab("tiny-dense"), DType::f16);
}

TEST(Checkpoint, ShardedSaveLoadsAndRewritesIdentically) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  Weights original(config, 3);
  const StDirLayout layout = save_hf_checkpoint(tmp / "a", config, original.lookup(), DType::bf16, 64 * 1024);
  ASSERT_GT(layout.files.size(), 2u);
  EXPECT_TRUE(fs::exists(tmp / "a/model.safetensors.index.json"));
  Weights loaded(config, 0);
  load_hf_weights(tmp / "a", config, loaded.lookup());
  save_hf_checkpoint(tmp / "b", config, loaded.lookup(), DType::bf16, 64 * 1024);
  for (const std::string& f : layout.files) EXPECT_EQ(read_all(tmp / ("a/" + f)), read_all(tmp / ("b/" + f))) << f;
  EXPECT_EQ(read_all(tmp / "a/model.safetensors.index.json"), read_all(tmp / "b/model.safetensors.index.json"));
  // Layers stay in model order across shards: the first shard holds the vision patch embedding.
  EXPECT_EQ(layout.weight_map.at("model.visual.patch_embed.proj.weight"), layout.files.front());
  EXPECT_EQ(layout.weight_map.at("lm_head.weight"), layout.files.back());
}

// Writes `w` into dir/model.safetensors with the expert tensors for which `transpose(key)` holds stored in
// transformers 5's layout ([E, B, A] for a published [E, A, B]).
void write_with_transposed_experts(const std::string& dir, const ModelConfig& config, Weights& w,
                                   const std::function<bool(const std::string& key)>& transpose) {
  std::vector<std::vector<float>> transposed;  // moving an inner vector keeps its data where the entry points
  std::vector<StWriteEntry> entries;
  for (const ParamSpec& s : model_param_specs(config)) {
    if (s.kind != ParamKind::experts || !transpose(s.hf_key)) {
      entries.push_back({s.hf_key, w.tensor(s.hf_key)});
      continue;
    }
    const int64_t e = s.shape[0], a = s.shape[1], b = s.shape[2];
    const std::vector<float>& src = w.data.at(s.hf_key);
    auto& t = transposed.emplace_back(src.size());
    for (int64_t x = 0; x < e; ++x)
      for (int64_t i = 0; i < a; ++i)
        for (int64_t j = 0; j < b; ++j)
          t[static_cast<size_t>((x * b + j) * a + i)] = src[static_cast<size_t>((x * a + i) * b + j)];
    entries.push_back({s.hf_key, Tensor(t.data(), DType::f32, {e, b, a})});
  }
  fs::create_directories(dir);
  write_safetensors_file(dir + "/model.safetensors", entries, DType::f32);
}

TEST(Checkpoint, ExpertsInTheTransformersFiveLayoutAreTransposedOnLoad) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  Weights original(config, 19);
  write_with_transposed_experts(tmp / "v5", config, original, [](const std::string&) { return true; });
  Weights loaded(config, 0);
  load_hf_weights(tmp / "v5", config, loaded.lookup());
  EXPECT_EQ(loaded.data, original.data);
}

// The expert layout is one per checkpoint: a file whose non-square expert tensors are stored partly in the
// published layout and partly in transformers 5's is refused, naming one tensor of each.
TEST(Checkpoint, ExpertTensorsDisagreeingOnTheLayoutAreRefused) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const std::string first = "model.language_model.layers.0.mlp.experts.gate_up_proj";
  const std::string odd = "model.language_model.layers.2.mlp.experts.down_proj";
  Weights w(config, 23);
  write_with_transposed_experts(tmp / "mixed", config, w, [&](const std::string& key) { return key == odd; });
  Weights dst(config, 0);
  test::expect_error([&] { load_hf_weights(tmp / "mixed", config, dst.lookup()); },
                     "the fused expert tensors disagree on their layout: '" + first + "' (in ");
  test::expect_error([&] { load_hf_weights(tmp / "mixed", config, dst.lookup()); },
                     "has shape [8,64,96], the published [E, H, 2I] / [E, I, H] layout, but '" + odd + "' (in ");
  test::expect_error([&] { load_hf_weights(tmp / "mixed", config, dst.lookup()); },
                     "has shape [8,64,48], the transformers 5 [E, 2I, H] / [E, H, I] layout");
}

// A config with a square expert tensor (H == 2I: gate_up_proj, H == I: down_proj) is saved with all its expert
// tensors in transformers' layout, which transformers 5.x loads as it is, and q3vl reads back; other configs keep
// the published layout. The weights come through a streaming lookup (one staging tensor filled by before_write, as
// the sharded trainer's export does), over several shards.
TEST(Checkpoint, SquareExpertConfigsAreSavedInTheTransformersLayout) {
  TempDir tmp;
  for (const int64_t intermediate : {32, 64, 48}) {
    ModelConfig config = small_vocab("tiny-moe");
    ASSERT_EQ(config.text.hidden_size, 64);
    config.text.moe_intermediate_size = intermediate;
    const bool square = intermediate != 48;
    const std::string dir = tmp / ("moe_i" + std::to_string(intermediate));
    Weights original(config, 29);
    size_t largest = 0;
    for (const auto& [key, values] : original.data) largest = std::max(largest, values.size());
    std::vector<float> staging(largest);
    const WeightLookup lookup = [&](const std::string& key) {
      return Tensor(staging.data(), DType::f32, original.shapes.at(key));
    };
    save_hf_checkpoint(dir, config, lookup, DType::f32, 64 * 1024, [&](const std::string& key) {
      const std::vector<float>& values = original.data.at(key);
      std::copy(values.begin(), values.end(), staging.begin());
    });
    ASSERT_TRUE(fs::exists(dir + "/model.safetensors.index.json")) << dir;

    const SafetensorsDir saved(dir);
    int experts = 0;
    for (const ParamSpec& s : model_param_specs(config)) {
      if (s.kind != ParamKind::experts) continue;
      ++experts;
      const int64_t e = s.shape[0], a = s.shape[1], b = s.shape[2];
      const std::vector<int64_t> want = square ? std::vector<int64_t>{e, b, a} : std::vector<int64_t>{e, a, b};
      ASSERT_EQ(saved.info(s.hf_key).shape, want) << dir << " " << s.hf_key;
      std::vector<float> stored(static_cast<size_t>(s.numel()));
      saved.read(s.hf_key, Tensor(stored.data(), DType::f32, Shape{want[0], want[1], want[2]}));
      const std::vector<float>& values = original.data.at(s.hf_key);
      for (int64_t x = 0; x < e; ++x)
        for (int64_t i = 0; i < a; ++i)
          for (int64_t j = 0; j < b; ++j) {
            const int64_t at = square ? (x * b + j) * a + i : (x * a + i) * b + j;
            ASSERT_EQ(stored[static_cast<size_t>(at)], values[static_cast<size_t>((x * a + i) * b + j)])
                << dir << " " << s.hf_key << " [" << x << ", " << i << ", " << j << "]";
          }
    }
    EXPECT_GT(experts, 0) << dir;

    Weights loaded(config, 0);
    load_hf_weights(dir, config, loaded.lookup());
    EXPECT_EQ(loaded.data, original.data) << dir;
  }
}

// The golden fixtures (written by tests/golden/generate.py with transformers) load through the same path.
TEST(Checkpoint, GoldenFixtureCheckpointsLoad) {
  const fs::path fixtures = fs::path(Q3VL_SOURCE_DIR) / "tests" / "golden" / "fixtures";
  int loaded_models = 0;
  for (const char* model : {"dense", "moe", "moe_mixed", "moe_square_gate_up", "moe_square_down"}) {
    const fs::path dir = fixtures / model;
    if (!fs::exists(dir / "config.json")) continue;
    const ModelConfig config = load_model_config(dir.string());
    Weights w(config, 0);
    load_hf_weights(dir.string(), config, w.lookup());
    ++loaded_models;
  }
  if (loaded_models == 0) GTEST_SKIP() << "no fixtures under " << fixtures;
}

// A saved small-vocabulary tiny-moe checkpoint, damaged by `damage`, must fail to load with `message`.
struct BadCase {
  std::string name;
  std::function<void(const std::string& dir, const ModelConfig&, Weights&)> damage;
  std::vector<std::string> message;
};

TEST(Checkpoint, BadCheckpointsAreErrorsNamingKeyAndFile) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  const std::string q_proj = "model.language_model.layers.1.self_attn.q_proj.weight";
  const std::string k_proj = "model.language_model.layers.2.self_attn.k_proj.weight";
  const std::string last = "model.language_model.norm.weight";
  // Rewrites the single file without `drop`, plus `extra` entries.
  auto rewrite = [&](const std::string& dir, Weights& w, const std::string& drop, std::vector<StWriteEntry> extra) {
    std::vector<StWriteEntry> entries;
    for (const ParamSpec& s : model_param_specs(config))
      if (s.hf_key != drop) entries.push_back({s.hf_key, w.tensor(s.hf_key)});
    for (auto& e : extra) entries.push_back(e);
    write_safetensors_file(dir + "/model.safetensors", entries, DType::bf16);
  };
  static std::vector<float> spare(4096, 0.5f);
  static std::vector<int32_t> ints(64, 1);
  const std::vector<BadCase> cases{
      {"missing",
       [&](const std::string& d, const ModelConfig&, Weights& w) { rewrite(d, w, q_proj, {}); },
       {"1 missing tensor(s): '" + q_proj + "'"}},
      {"extra",
       [&](const std::string& d, const ModelConfig&, Weights& w) {
         rewrite(d, w, "", {{"model.visual.blocks.9.attn.qkv.weight", Tensor(spare.data(), DType::f32, {4, 8})}});
       },
       {"unexpected tensor 'model.visual.blocks.9.attn.qkv.weight' in ", "model.safetensors"}},
      {"wrong_shape",
       [&](const std::string& d, const ModelConfig&, Weights& w) {
         const Tensor t = w.tensor(k_proj);
         rewrite(d, w, k_proj, {{k_proj, t.view({t.size(1), t.size(0)})}});
       },
       {"model.safetensors: tensor '" + k_proj + "' has shape [64,32], expected [32,64]"}},
      {"wrong_dtype",
       [&](const std::string& d, const ModelConfig&, Weights& w) {
         rewrite(d, w, last, {{last, Tensor(ints.data(), DType::i32, {64})}});
       },
       {"tensor '" + last + "' has dtype I32, expected F32, BF16 or F16"}},
      {"truncated",
       [&](const std::string& d, const ModelConfig&, Weights&) {
         const std::string bytes = read_all(d + "/model.safetensors");
         write_all(d + "/model.safetensors", bytes.substr(0, bytes.size() - 10));
       },
       {"model.safetensors is truncated or tensor '", "' has offsets out of range"}},
      {"bad_header_json",
       [&](const std::string& d, const ModelConfig&, Weights&) {
         std::string bytes = read_all(d + "/model.safetensors");
         ASSERT_EQ(bytes.substr(8, 16), "{\"__metadata__\":");
         bytes[8 + 15] = '!';  // the colon after "__metadata__"
         write_all(d + "/model.safetensors", bytes);
       },
       {"model.safetensors: bad header JSON"}},
      {"offsets_out_of_range",
       [&](const std::string& d, const ModelConfig&, Weights&) {
         edit_header(d + "/model.safetensors", [&](json& h) {
           auto& off = h[q_proj]["data_offsets"];
           off[1] = off[1].get<uint64_t>() + (1ull << 40);
           off[0] = off[1].get<uint64_t>() - 64 * 64 * 2;
         });
       },
       {"tensor '" + q_proj + "' has offsets out of range"}},
      {"index_names_missing_shard",
       [&](const std::string& d, const ModelConfig& c, Weights& w) {
         const StDirLayout layout = save_hf_checkpoint(d, c, w.lookup(), DType::bf16, 64 * 1024);
         fs::remove(d + "/" + layout.files[1]);
       },
       {"model.safetensors.index.json lists shard model-00002-of-", "which does not exist"}},
  };
  for (const BadCase& c : cases) {
    const std::string dir = tmp / c.name;
    Weights w(config, 11);
    save_hf_checkpoint(dir, config, w.lookup(), DType::bf16, 0);
    c.damage(dir, config, w);
    Weights dst(config, 0);
    SCOPED_TRACE(c.name);
    for (const std::string& part : c.message)
      test::expect_error([&] { load_hf_weights(dir, config, dst.lookup()); }, part);
  }
}

TEST(Checkpoint, TiedModelsAcceptOnlyAnIdenticalStoredHead) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-dense");
  ASSERT_TRUE(config.tie_word_embeddings);
  Weights w(config, 13);
  const std::string embed = "model.language_model.embed_tokens.weight";
  std::vector<StWriteEntry> entries;
  for (const ParamSpec& s : model_param_specs(config)) entries.push_back({s.hf_key, w.tensor(s.hf_key)});
  entries.push_back({"lm_head.weight", w.tensor(embed)});
  fs::create_directories(tmp / "same");
  write_safetensors_file(tmp / "same/model.safetensors", entries, DType::bf16);
  Weights dst(config, 0);
  load_hf_weights(tmp / "same", config, dst.lookup());
  EXPECT_EQ(dst.data.at(embed)[3], bf16_to_f32(f32_to_bf16(w.data.at(embed)[3])));

  std::vector<float> other(w.data.at(embed));
  other[0] += 1.0f;
  entries.back().tensor = Tensor(other.data(), DType::f32, w.shapes.at(embed));
  fs::create_directories(tmp / "differs");
  write_safetensors_file(tmp / "differs/model.safetensors", entries, DType::bf16);
  test::expect_error([&] { load_hf_weights(tmp / "differs", config, dst.lookup()); },
                     "tensor 'lm_head.weight' differs from '" + embed + "' but the config ties them");
}

TEST(Checkpoint, DestinationsAreChecked) {
  TempDir tmp;
  const ModelConfig config = small_vocab("tiny-moe");
  Weights w(config, 17);
  save_hf_checkpoint(tmp / "a", config, w.lookup(), DType::bf16, 0);
  const std::string norm = "model.language_model.norm.weight";
  std::vector<float> wrong(65);
  std::vector<double> f64(64);
  const WeightLookup bad_shape = [&](const std::string& key) {
    return key == norm ? Tensor(wrong.data(), DType::f32, {65}) : w.tensor(key);
  };
  const WeightLookup bad_dtype = [&](const std::string& key) {
    return key == norm ? Tensor(f64.data(), DType::f64, {64}) : w.tensor(key);
  };
  test::expect_error([&] { load_hf_weights(tmp / "a", config, bad_shape); },
                     "the weight tensor for '" + norm + "' has shape [65], expected [64]");
  test::expect_error([&] { save_hf_checkpoint(tmp / "b", config, bad_dtype, DType::bf16, 0); },
                     "the weight tensor for '" + norm + "' is f64[64], expected contiguous host f32");
  test::expect_error([&] { load_hf_weights(tmp / "nowhere", config, w.lookup()); }, "has neither");
}

}  // namespace
}  // namespace q3vl::io
