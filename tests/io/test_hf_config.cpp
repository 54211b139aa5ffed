// config.json parsing against the published Qwen3-VL configs (legacy and transformers-v5 layouts), HF defaults
// for absent keys, the allow-list and consistency errors, config.json writing, and the named flavors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/check.h"
#include "core/model/config.h"
#include "core/model/param_specs.h"
#include "io/hf_config.h"
#include "tests/support/gradcheck.h"
#include "tests/support/test_files.h"

namespace q3vl::io {
namespace {

namespace fs = std::filesystem;
using test::read_all;
using json = nlohmann::json;

// The flavors of this source tree, wherever the build directory is (an explicit Q3VL_FLAVORS_DIR wins).
const bool kFlavorsFromSourceTree = ::setenv("Q3VL_FLAVORS_DIR", Q3VL_SOURCE_DIR "/jobs/flavors", 0) == 0;


void expect_same_config(const ModelConfig& a, const ModelConfig& b, const std::string& what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.image_token_id, b.image_token_id);
  EXPECT_EQ(a.video_token_id, b.video_token_id);
  EXPECT_EQ(a.vision_start_token_id, b.vision_start_token_id);
  EXPECT_EQ(a.vision_end_token_id, b.vision_end_token_id);
  const TextConfig &t = a.text, &u = b.text;
  EXPECT_EQ(t.vocab_size, u.vocab_size);
  EXPECT_EQ(t.hidden_size, u.hidden_size);
  EXPECT_EQ(t.num_hidden_layers, u.num_hidden_layers);
  EXPECT_EQ(t.num_attention_heads, u.num_attention_heads);
  EXPECT_EQ(t.num_key_value_heads, u.num_key_value_heads);
  EXPECT_EQ(t.head_dim, u.head_dim);
  EXPECT_EQ(t.rms_norm_eps, u.rms_norm_eps);
  EXPECT_EQ(t.rope_theta, u.rope_theta);
  EXPECT_EQ(t.mrope_section, u.mrope_section);
  EXPECT_EQ(t.mrope_interleaved, u.mrope_interleaved);
  EXPECT_EQ(t.num_experts, u.num_experts);
  EXPECT_EQ(t.num_experts_per_tok, u.num_experts_per_tok);
  EXPECT_EQ(t.moe_intermediate_size, u.moe_intermediate_size);
  EXPECT_EQ(t.decoder_sparse_step, u.decoder_sparse_step);
  EXPECT_EQ(t.mlp_only_layers, u.mlp_only_layers);
  EXPECT_EQ(t.router_aux_loss_coef, u.router_aux_loss_coef);
  EXPECT_EQ(t.hidden_act, u.hidden_act);
  EXPECT_EQ(t.attention_bias, u.attention_bias);
  EXPECT_EQ(t.initializer_range, u.initializer_range);
  EXPECT_EQ(t.max_position_embeddings, u.max_position_embeddings);
  // The dense FFN width only matters when some layer is dense.
  if (a.num_moe_layers() < t.num_hidden_layers || b.num_moe_layers() < u.num_hidden_layers) {
    EXPECT_EQ(t.intermediate_size, u.intermediate_size);
  }
  const VisionConfig &v = a.vision, &w = b.vision;
  EXPECT_EQ(v.depth, w.depth);
  EXPECT_EQ(v.hidden_size, w.hidden_size);
  EXPECT_EQ(v.intermediate_size, w.intermediate_size);
  EXPECT_EQ(v.num_heads, w.num_heads);
  EXPECT_EQ(v.patch_size, w.patch_size);
  EXPECT_EQ(v.temporal_patch_size, w.temporal_patch_size);
  EXPECT_EQ(v.spatial_merge_size, w.spatial_merge_size);
  EXPECT_EQ(v.in_channels, w.in_channels);
  EXPECT_EQ(v.out_hidden_size, w.out_hidden_size);
  EXPECT_EQ(v.num_position_embeddings, w.num_position_embeddings);
  EXPECT_EQ(v.deepstack_visual_indexes, w.deepstack_visual_indexes);
  EXPECT_EQ(v.hidden_act, w.hidden_act);
}

// Qwen/Qwen3-VL-30B-A3B-Instruct config.json as published (transformers 4.57 layout).
const char* kPublished30B = R"({
  "architectures": ["Qwen3VLMoeForConditionalGeneration"],
  "image_token_id": 151655,
  "model_type": "qwen3_vl_moe",
  "text_config": {
    "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
    "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
    "mlp_only_layers": [], "model_type": "qwen3_vl_moe_text", "moe_intermediate_size": 768,
    "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_interleaved": true, "mrope_section": [24, 20, 20], "rope_type": "default"},
    "rope_theta": 5000000, "use_cache": true, "vocab_size": 151936
  },
  "tie_word_embeddings": false,
  "transformers_version": "4.57.0.dev0",
  "video_token_id": 151656,
  "vision_config": {
    "deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
    "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_vl_moe",
    "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2
  },
  "vision_end_token_id": 151653,
  "vision_start_token_id": 151652
})";

// Qwen3-VL-235B-A22B-Instruct as transformers 5 re-serialises it: rope_parameters, num_local_experts, and a
// text_config.tie_word_embeddings of true that must not tie the untied model.
const char* kV5Serialised235B = R"({
  "architectures": ["Qwen3VLMoeForConditionalGeneration"],
  "image_token_id": 151655,
  "model_type": "qwen3_vl_moe",
  "text_config": {
    "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
    "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 262144,
    "mlp_only_layers": [], "model_type": "qwen3_vl_moe_text", "moe_intermediate_size": 1536,
    "norm_topk_prob": true, "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 94,
    "num_key_value_heads": 4, "num_local_experts": 128, "pad_token_id": null, "rms_norm_eps": 1e-06,
    "rope_parameters": {"mrope_interleaved": true, "mrope_section": [24, 20, 20], "rope_theta": 5000000,
                        "rope_type": "default"},
    "router_aux_loss_coef": 0.001, "sliding_window": null, "tie_word_embeddings": true, "use_cache": true,
    "vocab_size": 151936
  },
  "tie_word_embeddings": false,
  "transformers_version": "5.7.0",
  "video_token_id": 151656,
  "vision_config": {
    "deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
    "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_vl_moe_vision",
    "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2
  },
  "vision_end_token_id": 151653,
  "vision_start_token_id": 151652
})";

// The tiny-moe flavor after transformers 5.24's from_pretrained + save_pretrained: rope_parameters in text and
// vision configs, num_local_experts, null token ids, text_config.tie_word_embeddings true on an untied model.
const char* kSavedByTransformers524 = R"({
  "architectures": ["Qwen3VLMoeForConditionalGeneration"],
  "dtype": "float32",
  "image_token_id": 151655,
  "model_type": "qwen3_vl_moe",
  "text_config": {
    "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": null, "decoder_sparse_step": 1,
    "dtype": "float32", "eos_token_id": null, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 262144, "mlp_only_layers": [],
    "model_type": "qwen3_vl_moe_text", "moe_intermediate_size": 48, "norm_topk_prob": true,
    "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 4, "num_key_value_heads": 2,
    "num_local_experts": 8, "output_router_logits": false, "pad_token_id": null, "rms_norm_eps": 1e-06,
    "rope_parameters": {"mrope_interleaved": true, "mrope_section": [4, 2, 2], "rope_theta": 5000000.0,
                        "rope_type": "default"},
    "router_aux_loss_coef": 0.001, "sliding_window": null, "tie_word_embeddings": true, "use_cache": true,
    "vocab_size": 151936
  },
  "tie_word_embeddings": false,
  "transformers_version": "5.24.0",
  "video_token_id": 151656,
  "vision_config": {
    "deepstack_visual_indexes": [0, 1, 2], "depth": 4, "dtype": "float32", "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 32, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64,
    "model_type": "qwen3_vl_moe_vision", "num_heads": 2, "num_position_embeddings": 2304, "out_hidden_size": 64,
    "patch_size": 16, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}, "spatial_merge_size": 2,
    "temporal_patch_size": 2
  },
  "vision_end_token_id": 151653,
  "vision_start_token_id": 151652
})";

TEST(HfConfig, ConfigSavedByTransformers524ParsesToTheFlavor) {
  const ModelConfig c = parse_hf_config(kSavedByTransformers524, "saved/config.json");
  expect_same_config(c, load_model_config("tiny-moe"), "tiny-moe via transformers 5.24");
  EXPECT_EQ(c.vision.rope_theta, 10000.0);
  json j = json::parse(kSavedByTransformers524);
  j["vision_config"]["rope_parameters"]["rope_theta"] = 20000.0;
  const ModelConfig theta = parse_hf_config(j.dump(), "saved/config.json");
  EXPECT_EQ(theta.vision.rope_theta, 20000.0);
  EXPECT_EQ(parse_hf_config(hf_config_json(theta), "again.json").vision.rope_theta, 20000.0);
  j["vision_config"]["rope_parameters"]["rope_type"] = "default";
  test::expect_error([&] { parse_hf_config(j.dump(), "saved/config.json"); },
                     "vision_config.rope_parameters.rope_type is 'default'; the vision tower's rotary is axial");
}

TEST(HfConfig, PublishedThirtyBConfigParsesToTheReference) {
  const ModelConfig c = parse_hf_config(kPublished30B, "30B/config.json");
  expect_same_config(c, qwen3_vl_30b_a3b_config(), "30B");
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.num_moe_layers(), 48);
  EXPECT_EQ(c.text.intermediate_size, 6144);
}

TEST(HfConfig, TransformersFiveLayoutParsesAndKeepsTheModelUntied) {
  const ModelConfig c = parse_hf_config(kV5Serialised235B, "235B/config.json");
  expect_same_config(c, qwen3_vl_235b_a22b_config(), "235B");
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.text.num_experts, 128);
  EXPECT_EQ(c.text.rope_theta, 5e6);
}

TEST(HfConfig, AbsentKeysTakeHuggingFaceClassDefaults) {
  const ModelConfig moe = parse_hf_config(R"({"model_type": "qwen3_vl_moe",
      "text_config": {"hidden_size": 512, "num_attention_heads": 4},
      "vision_config": {"out_hidden_size": 512}})",
                                          "moe.json");
  EXPECT_EQ(moe.text.vocab_size, 151936);
  EXPECT_EQ(moe.text.num_hidden_layers, 24);
  EXPECT_EQ(moe.text.num_key_value_heads, 4);  // defaults to the attention heads
  EXPECT_EQ(moe.text.head_dim, 128);           // hidden / heads for the MoE text config
  EXPECT_EQ(moe.text.intermediate_size, 5632);
  EXPECT_EQ(moe.text.num_experts, 60);
  EXPECT_EQ(moe.text.num_experts_per_tok, 4);
  EXPECT_EQ(moe.text.moe_intermediate_size, 1408);
  EXPECT_EQ(moe.text.max_position_embeddings, 128000);
  EXPECT_EQ(moe.text.rope_theta, 500000.0);
  EXPECT_EQ(moe.text.mrope_section, (std::array<int, 3>{24, 20, 20}));
  EXPECT_FALSE(moe.tie_word_embeddings);
  EXPECT_EQ(moe.vision.depth, 27);
  EXPECT_EQ(moe.vision.deepstack_visual_indexes, (std::vector<int>{8, 16, 24}));
  EXPECT_EQ(moe.image_token_id, 151655);
}

TEST(HfConfig, DenseDefaultsDifferFromMoe) {
  const ModelConfig dense = parse_hf_config(R"({"model_type": "qwen3_vl",
      "text_config": {"hidden_size": 512, "num_attention_heads": 2},
      "vision_config": {"out_hidden_size": 512}})",
                                            "dense.json");
  EXPECT_EQ(dense.text.head_dim, 128);  // Qwen3VLTextConfig's own default, not hidden / heads = 256
  EXPECT_EQ(dense.text.intermediate_size, 22016);
  EXPECT_EQ(dense.text.num_hidden_layers, 32);
  EXPECT_EQ(dense.text.num_experts, 0);
  EXPECT_EQ(dense.num_moe_layers(), 0);
}

// kPublished30B edited at a JSON pointer (the key removed when `value` is discarded).
std::string edited_30b(const std::string& pointer, const json& value) {
  json j = json::parse(kPublished30B);
  if (value.is_discarded())
    j[json::json_pointer(pointer).parent_pointer()].erase(json::json_pointer(pointer).back());
  else
    j[json::json_pointer(pointer)] = value;
  return j.dump();
}

TEST(HfConfig, UnknownKeysAndBadValuesAreErrorsNamingKeyAndFile) {
  struct Case {
    std::string pointer;
    json value;
    std::string message;
  };
  const std::vector<Case> cases{
      {"/foo", 1, "/ckpt/config.json: foo is not a known key"},
      {"/text_config/shared_expert_intermediate_size", 512,
       "text_config.shared_expert_intermediate_size is not a known key"},
      {"/vision_config/window_size", 112, "vision_config.window_size is not a known key"},
      {"/text_config/rope_scaling/factor", 2.0, "text_config.rope_scaling.factor is not a known key"},
      {"/text_config/rope_scaling/rope_type", "yarn", "text_config.rope_scaling.rope_type is 'yarn'"},
      {"/text_config/hidden_size", "2048", "text_config.hidden_size must be an integer, got \"2048\""},
      {"/text_config/hidden_size", 2048.5, "text_config.hidden_size must be an integer"},
      {"/tie_word_embeddings", 0, "tie_word_embeddings must be true or false"},
      {"/model_type", "qwen2_5_vl", "model_type is 'qwen2_5_vl', expected qwen3_vl_moe or qwen3_vl"},
      {"/architectures", json::array({"Qwen3VLForConditionalGeneration"}),
       "architectures is [\"Qwen3VLForConditionalGeneration\"]"},
      {"/text_config/model_type", "qwen3_vl_text",
       "text_config.model_type is 'qwen3_vl_text', expected 'qwen3_vl_moe_text'"},
      {"/text_config/attention_dropout", 0.1, "text_config.attention_dropout is 0.1; only 0.0 is supported"},
      {"/text_config/norm_topk_prob", false, "text_config.norm_topk_prob is false; only true is supported"},
      {"/text_config/sliding_window", 4096, "text_config.sliding_window is 4096"},
      {"/text_config/num_local_experts", 64, "text_config.num_local_experts is 64 but num_experts is 128"},
      {"/text_config/rope_parameters", json{{"rope_theta", 1}}, "rope_parameters and rope_scaling are both present"},
      {"/text_config/mlp_only_layers", json::array({48}),
       "text_config.mlp_only_layers entry 48 is outside the 48 text layers"},
      {"/text_config/rope_scaling/mrope_section", json::array({24, 20}), "mrope_section must have 3 entries"},
      {"/text_config", nullptr, "text_config is missing"},
      {"/vision_config", json(json::value_t::discarded), "vision_config is missing"},
      // Consistency, reported by ModelConfig::validate and prefixed with the file.
      {"/text_config/num_key_value_heads", 5, "/ckpt/config.json: inconsistent config: "},
      {"/text_config/num_experts_per_tok", 129, "num_experts_per_tok 129 not in [1, num_experts=128]"},
      {"/text_config/rope_scaling/mrope_section", json::array({24, 20, 24}),
       "mrope_section sums to 68, expected head_dim/2 = 64"},
      {"/vision_config/deepstack_visual_indexes", json::array({8, 16, 27}),
       "deepstack_visual_indexes[2] = 27 outside the vision depth 27"},
      {"/vision_config/out_hidden_size", 4096, "out_hidden_size 4096 != text_config.hidden_size 2048"},
      {"/text_config/rope_scaling/mrope_interleaved", false, "only interleaved MRoPE"},
      {"/image_token_id", 200000, "special token id 200000 outside the vocabulary"},
      // Caught at parse, naming the key (they used to fail later, far from config.json).
      {"/text_config/rms_norm_eps", -1e-6, "/ckpt/config.json: text_config.rms_norm_eps must be a positive number, got -1e-06"},
      {"/text_config/rope_theta", 0, "/ckpt/config.json: text_config.rope_theta must be a positive number, got 0"},
      {"/vision_config/rope_parameters", json{{"rope_type", "axial"}, {"rope_theta", 0.0}},
       "vision_config.rope_parameters.rope_theta must be a positive number, got 0.0"},
      {"/video_token_id", 151655, "/ckpt/config.json: video_token_id is 151655, the same as image_token_id"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.pointer);
    const std::string text = edited_30b(c.pointer, c.value);
    test::expect_error([&] { parse_hf_config(text, "/ckpt/config.json"); }, "/ckpt/config.json");
    test::expect_error([&] { parse_hf_config(text, "/ckpt/config.json"); }, c.message);
  }
  test::expect_error([] { parse_hf_config("{\"model_type\": ", "/x/config.json"); }, "/x/config.json: bad JSON");
  test::expect_error([] { read_hf_config("/nonexistent/config.json"); }, "cannot open /nonexistent/config.json");
}

TEST(HfConfig, HarmlessKeysAreAccepted) {
  json j = json::parse(kPublished30B);
  j["torch_dtype"] = "bfloat16";
  j["_name_or_path"] = "Qwen/Qwen3-VL-30B-A3B-Instruct";
  j["use_cache"] = true;
  j["text_config"]["output_router_logits"] = false;
  j["text_config"]["use_sliding_window"] = false;
  j["text_config"]["layer_types"] = json::array();
  for (int i = 0; i < 48; ++i) j["text_config"]["layer_types"].push_back("full_attention");
  j["vision_config"]["torch_dtype"] = "bfloat16";
  expect_same_config(parse_hf_config(j.dump(), "ok.json"), qwen3_vl_30b_a3b_config(), "harmless keys");
  j["text_config"]["layer_types"][3] = "sliding_attention";
  test::expect_error([&] { parse_hf_config(j.dump(), "ok.json"); }, "text_config.layer_types must list");
}

TEST(HfConfig, WrittenConfigReadsBackAndTransformersSeesTheSameKeys) {
  for (const ModelConfig& ref : {qwen3_vl_30b_a3b_config(), qwen3_vl_235b_a22b_config(), qwen3_vl_2b_config(),
                                 qwen3_vl_4b_config(), qwen3_vl_8b_config()}) {
    const std::string text = hf_config_json(ref, DType::bf16);
    const ModelConfig back = parse_hf_config(text, "written.json");
    expect_same_config(back, ref, ref.model_type);
    EXPECT_EQ(hf_config_json(back, DType::bf16), text);
    const json j = json::parse(text);
    EXPECT_EQ(j["tie_word_embeddings"].get<bool>(), ref.tie_word_embeddings);
    EXPECT_EQ(j["text_config"]["rope_scaling"]["mrope_section"], json::array({24, 20, 20}));
    EXPECT_EQ(j["dtype"], "bfloat16");
  }
  EXPECT_EQ(json::parse(hf_config_json(qwen3_vl_2b_config(), DType::f32))["dtype"], "float32");
}

// ---- flavors ------------------------------------------------------------------------------------------------

TEST(HfConfig, FlavorsMatchTheReferenceConfigsAndRewriteByteForByte) {
  const std::vector<std::string> names = flavor_names();
  EXPECT_EQ(names,
            (std::vector<std::string>{"235B-A22B", "2B", "30B-A3B", "32B", "4B", "8B", "bench-moe", "tiny-dense",
                                      "tiny-moe"}));
  const std::vector<std::pair<std::string, ModelConfig>> refs{{"30B-A3B", qwen3_vl_30b_a3b_config()},
                                                              {"235B-A22B", qwen3_vl_235b_a22b_config()},
                                                              {"2B", qwen3_vl_2b_config()},
                                                              {"4B", qwen3_vl_4b_config()},
                                                              {"8B", qwen3_vl_8b_config()}};
  for (const auto& [name, ref] : refs) expect_same_config(load_model_config(name), ref, name);
  for (const std::string& name : names) {
    const std::string path = flavors_dir() + "/" + name + ".json";
    EXPECT_EQ(hf_config_json(load_model_config(name), DType::bf16), read_all(path)) << name;
  }
}

TEST(HfConfig, FlavorSizesAndTying) {
  const ModelConfig b32 = load_model_config("32B");
  EXPECT_EQ(b32.model_type, "qwen3_vl");
  EXPECT_EQ(b32.text.hidden_size, 5120);
  EXPECT_EQ(b32.text.num_hidden_layers, 64);
  EXPECT_EQ(b32.text.num_attention_heads * b32.text.head_dim, 8192);  // heads x head_dim != hidden here
  EXPECT_EQ(b32.text.intermediate_size, 25600);
  EXPECT_FALSE(b32.tie_word_embeddings);
  EXPECT_EQ(b32.vision.out_hidden_size, 5120);

  const ModelConfig moe = load_model_config("tiny-moe");
  EXPECT_TRUE(moe.is_moe_model());
  EXPECT_FALSE(moe.tie_word_embeddings);
  EXPECT_EQ(moe.num_moe_layers(), moe.text.num_hidden_layers);
  const ModelConfig dense = load_model_config("tiny-dense");
  EXPECT_FALSE(dense.is_moe_model());
  EXPECT_TRUE(dense.tie_word_embeddings);
  // Tiny flavors keep the real vocabulary and special tokens, so the Qwen tokenizer and processor drive them.
  for (const ModelConfig* c : {&moe, &dense}) {
    EXPECT_EQ(c->text.vocab_size, 151936);
    EXPECT_EQ(c->image_token_id, 151655);
    EXPECT_EQ(c->vision.patch_features(), 1536);
    EXPECT_LT(count_parameters(*c) - 2 * 151936 * 64, 2'000'000);  // small besides the embedding table(s)
  }
  // Published parameter counts: 30B-A3B has 31.07e9 parameters (model card "31.07").
  EXPECT_NEAR(static_cast<double>(count_parameters(load_model_config("30B-A3B"))) / 1e9, 31.07, 0.01);
}

TEST(HfConfig, LoadModelConfigTakesDirectoriesFilesAndNames) {
  const fs::path dir = fs::temp_directory_path() / ("q3vl_hfconfig_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  write_hf_config((dir / "config.json").string(), qwen3_vl_8b_config(), DType::f32);
  expect_same_config(load_model_config(dir.string()), qwen3_vl_8b_config(), "dir");
  expect_same_config(load_model_config((dir / "config.json").string()), qwen3_vl_8b_config(), "file");
  test::expect_error([] { load_model_config("7B"); }, "'7B' is neither");
  test::expect_error([] { load_model_config("7B"); }, "30B-A3B");
  fs::remove(dir / "config.json");
  test::expect_error([&] { load_model_config(dir.string()); }, "has no config.json");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace q3vl::io
