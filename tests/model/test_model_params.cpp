// Parameter list: HF keys and on-disk shapes, tying, dense/MoE layer selection like HF, and the parameter
// counts of the published models.
#include <gtest/gtest.h>

#include <map>

#include "core/model/param_specs.h"
#include "core/model/param_store.h"
#include "tests/model/test_model_tiny.h"

namespace q3vl::test {
namespace {

std::map<std::string, Shape> by_key(const ModelConfig& c) {
  std::map<std::string, Shape> m;
  for (const ParamSpec& s : model_param_specs(c)) {
    EXPECT_TRUE(m.emplace(s.hf_key, s.shape).second) << "duplicate key " << s.hf_key;
  }
  return m;
}

TEST(ModelParams, KeysAndShapesOfTheTinyMoeModel) {
  const ModelConfig c = tiny_config(true);
  const auto m = by_key(c);
  EXPECT_EQ(m.at("model.visual.patch_embed.proj.weight"), (Shape{16, 3, 2, 2, 2}));
  EXPECT_EQ(m.at("model.visual.pos_embed.weight"), (Shape{16, 16}));
  EXPECT_EQ(m.at("model.visual.blocks.2.attn.qkv.weight"), (Shape{48, 16}));
  EXPECT_EQ(m.at("model.visual.blocks.2.attn.qkv.bias"), (Shape{48}));
  EXPECT_EQ(m.at("model.visual.blocks.0.mlp.linear_fc1.weight"), (Shape{24, 16}));
  EXPECT_EQ(m.at("model.visual.merger.norm.weight"), (Shape{16}));                     // pre-shuffle norm
  EXPECT_EQ(m.at("model.visual.deepstack_merger_list.1.norm.weight"), (Shape{64}));    // post-shuffle norm
  EXPECT_EQ(m.at("model.visual.deepstack_merger_list.1.linear_fc2.weight"), (Shape{32, 64}));
  EXPECT_EQ(m.at("model.language_model.embed_tokens.weight"), (Shape{64, 32}));
  EXPECT_EQ(m.at("model.language_model.layers.0.mlp.gate_proj.weight"), (Shape{40, 32}));  // mlp_only_layers
  EXPECT_EQ(m.at("model.language_model.layers.0.mlp.down_proj.weight"), (Shape{32, 40}));
  EXPECT_EQ(m.at("model.language_model.layers.1.mlp.gate.weight"), (Shape{4, 32}));
  EXPECT_EQ(m.at("model.language_model.layers.1.mlp.experts.gate_up_proj"), (Shape{4, 32, 24}));
  EXPECT_EQ(m.at("model.language_model.layers.1.mlp.experts.down_proj"), (Shape{4, 12, 32}));
  EXPECT_EQ(m.at("model.language_model.layers.2.self_attn.q_proj.weight"), (Shape{32, 32}));
  EXPECT_EQ(m.at("model.language_model.layers.2.self_attn.k_proj.weight"), (Shape{16, 32}));
  EXPECT_EQ(m.at("model.language_model.layers.2.self_attn.q_norm.weight"), (Shape{8}));
  EXPECT_EQ(m.at("model.language_model.norm.weight"), (Shape{32}));
  EXPECT_EQ(m.at("lm_head.weight"), (Shape{64, 32}));
  EXPECT_EQ(m.count("model.language_model.layers.0.mlp.gate.weight"), 0u);
  EXPECT_EQ(m.count("model.language_model.layers.1.mlp.gate_proj.weight"), 0u);
  // 3 + 12 per block + 6 per merger; 1 + 11 per layer + 1 + lm_head.
  EXPECT_EQ(m.size(), 3u + 3 * 12 + 3 * 6 + 1 + 3 * 11 + 1 + 1);
}

TEST(ModelParams, TyingDropsLmHeadAndDenseModelsHaveNoExperts) {
  ModelConfig c = tiny_config(false);
  c.tie_word_embeddings = true;
  const auto m = by_key(c);
  EXPECT_EQ(m.count("lm_head.weight"), 0u);
  for (int l = 0; l < 3; ++l)
    EXPECT_EQ(m.count("model.language_model.layers." + std::to_string(l) + ".mlp.up_proj.weight"), 1u);
}

TEST(ModelParams, SparseStepAndMlpOnlyLayersFollowHf) {
  ModelConfig c = tiny_config(true);
  c.text.num_hidden_layers = 6;
  c.text.decoder_sparse_step = 2;
  c.text.mlp_only_layers = {3};
  // HF: MoE iff layer not in mlp_only_layers and (layer + 1) % step == 0 -> layers 1 and 5.
  const std::vector<bool> expected = {false, true, false, false, false, true};
  for (int l = 0; l < 6; ++l) EXPECT_EQ(c.is_moe_layer(l), expected[l]) << "layer " << l;
  EXPECT_EQ(c.num_moe_layers(), 2);
}

TEST(ModelParams, CountsOfThePublishedModels) {
  // HF num_parameters() of the released checkpoints (model cards: 31.1B, 236B, 2.13B, 4.44B, 8.77B).
  EXPECT_EQ(count_parameters(qwen3_vl_30b_a3b_config()), 31'070'754'032);
  EXPECT_EQ(count_parameters(qwen3_vl_2b_config()), 2'127'532'032);
  EXPECT_EQ(count_parameters(qwen3_vl_4b_config()), 4'437'815'808);
  EXPECT_EQ(count_parameters(qwen3_vl_8b_config()), 8'767'123'696);
  // 30B-A3B: about 3.3B parameters active per text token (8 of 128 experts).
  EXPECT_EQ(count_active_text_parameters(qwen3_vl_30b_a3b_config()), 3'353'032'704);
}

TEST(ModelParams, StoreLaysOutEverySpecAndInitialisesByKind) {
  const ModelConfig c = tiny_config(true);
  ParamStore store(c, DType::f32, "test weights");
  EXPECT_EQ(store.numel(), count_parameters(c));
  store.init(5, 0.02);
  EXPECT_EQ(store.at("model.visual.blocks.0.norm1.weight").data<float>()[3], 1.0f);
  EXPECT_EQ(store.at("model.visual.blocks.0.norm1.bias").data<float>()[3], 0.0f);
  EXPECT_NE(store.at("lm_head.weight").data<float>()[3], 0.0f);
  try {
    store.at("model.language_model.layers.9.mlp.gate.weight");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no parameter 'model.language_model.layers.9.mlp.gate.weight'"),
              std::string::npos);
  }
}

TEST(ModelParams, ValidateNamesTheBadField) {
  ModelConfig c = tiny_config(true);
  c.text.mrope_section = {2, 2, 1};
  try {
    c.validate();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mrope_section sums to 5, expected head_dim/2 = 4"), std::string::npos)
        << e.what();
  }
  c = tiny_config(true);
  c.vision.out_hidden_size = 16;
  EXPECT_THROW(c.validate(), Error);
  c = tiny_config(true);
  c.vision.deepstack_visual_indexes = {0, 3};
  EXPECT_THROW(c.validate(), Error);
}

}  // namespace
}  // namespace q3vl::test
