// ModelConfig predicates, validation and the reference configurations of SPEC "Configs".
#include "core/model/config.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"

namespace q3vl {

int64_t VisionConfig::num_grid_per_side() const {
  const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(num_position_embeddings))));
  Q3VL_CHECK(side * side == num_position_embeddings, "vision_config.num_position_embeddings ",
             num_position_embeddings, " is not a perfect square");
  return side;
}

bool ModelConfig::is_moe_layer(int layer) const {
  if (!is_moe_model() || text.num_experts <= 0) return false;
  if (std::find(text.mlp_only_layers.begin(), text.mlp_only_layers.end(), layer) != text.mlp_only_layers.end())
    return false;
  return (layer + 1) % text.decoder_sparse_step == 0;
}

int ModelConfig::num_moe_layers() const {
  int n = 0;
  for (int l = 0; l < text.num_hidden_layers; ++l) n += is_moe_layer(l) ? 1 : 0;
  return n;
}

void ModelConfig::validate() const {
  Q3VL_CHECK(model_type == "qwen3_vl_moe" || model_type == "qwen3_vl", "config: model_type '", model_type,
             "' is not qwen3_vl_moe or qwen3_vl");
  const TextConfig& t = text;
  Q3VL_CHECK(t.vocab_size > 0 && t.hidden_size > 0 && t.num_hidden_layers > 0 && t.head_dim > 0,
             "config: text_config sizes must be positive");
  Q3VL_CHECK(t.num_attention_heads > 0 && t.num_key_value_heads > 0 &&
                 t.num_attention_heads % t.num_key_value_heads == 0,
             "config: text_config.num_attention_heads ", t.num_attention_heads,
             " is not a positive multiple of num_key_value_heads ", t.num_key_value_heads);
  Q3VL_CHECK(t.head_dim % 2 == 0, "config: text_config.head_dim ", t.head_dim, " is odd");
  Q3VL_CHECK(t.mrope_section[0] + t.mrope_section[1] + t.mrope_section[2] == t.head_dim / 2,
             "config: text_config.mrope_section sums to ",
             t.mrope_section[0] + t.mrope_section[1] + t.mrope_section[2], ", expected head_dim/2 = ", t.head_dim / 2);
  Q3VL_CHECK(t.mrope_interleaved, "config: only interleaved MRoPE (Qwen3-VL) is supported");
  Q3VL_CHECK(t.hidden_act == "silu", "config: text_config.hidden_act '", t.hidden_act, "' is not silu");
  Q3VL_CHECK(!t.attention_bias, "config: text_config.attention_bias is not supported (Qwen3-VL has none)");
  if (is_moe_model() && t.num_experts > 0) {
    Q3VL_CHECK(t.num_experts_per_tok > 0 && t.num_experts_per_tok <= t.num_experts,
               "config: text_config.num_experts_per_tok ", t.num_experts_per_tok, " not in [1, num_experts=",
               t.num_experts, "]");
    Q3VL_CHECK(t.moe_intermediate_size > 0, "config: text_config.moe_intermediate_size must be positive");
    Q3VL_CHECK(t.decoder_sparse_step > 0, "config: text_config.decoder_sparse_step must be positive");
  }
  if (num_moe_layers() < t.num_hidden_layers)
    Q3VL_CHECK(t.intermediate_size > 0, "config: text_config.intermediate_size must be positive for dense layers");

  const VisionConfig& v = vision;
  Q3VL_CHECK(v.depth > 0 && v.hidden_size > 0 && v.num_heads > 0 && v.hidden_size % v.num_heads == 0,
             "config: vision_config.hidden_size ", v.hidden_size, " is not a multiple of num_heads ", v.num_heads);
  Q3VL_CHECK(v.head_dim() % 4 == 0, "config: vision head_dim ", v.head_dim(),
             " must be a multiple of 4 (2-D rotary over half of it)");
  Q3VL_CHECK(v.out_hidden_size == t.hidden_size, "config: vision_config.out_hidden_size ", v.out_hidden_size,
             " != text_config.hidden_size ", t.hidden_size);
  Q3VL_CHECK(v.hidden_act == "gelu_pytorch_tanh", "config: vision_config.hidden_act '", v.hidden_act,
             "' is not gelu_pytorch_tanh");
  Q3VL_CHECK(v.spatial_merge_size > 0 && v.patch_size > 0 && v.temporal_patch_size > 0 && v.in_channels > 0,
             "config: vision patch sizes must be positive");
  v.num_grid_per_side();
  for (size_t k = 0; k < v.deepstack_visual_indexes.size(); ++k) {
    const int idx = v.deepstack_visual_indexes[k];
    Q3VL_CHECK(idx >= 0 && idx < v.depth, "config: vision_config.deepstack_visual_indexes[", k, "] = ", idx,
               " outside the vision depth ", v.depth);
    for (size_t j = 0; j < k; ++j)
      Q3VL_CHECK(v.deepstack_visual_indexes[j] != idx, "config: vision_config.deepstack_visual_indexes repeats ",
                 idx);
  }
  Q3VL_CHECK(static_cast<int>(v.deepstack_visual_indexes.size()) <= t.num_hidden_layers,
             "config: more deepstack taps (", v.deepstack_visual_indexes.size(), ") than text layers (",
             t.num_hidden_layers, ")");
  Q3VL_CHECK(t.pad_token_id >= -1 && t.pad_token_id < t.vocab_size, "config: text_config.pad_token_id ",
             t.pad_token_id, " outside the vocabulary of ", t.vocab_size);
  for (int64_t id : {image_token_id, video_token_id, vision_start_token_id, vision_end_token_id})
    Q3VL_CHECK(id >= 0 && id < t.vocab_size, "config: special token id ", id, " outside the vocabulary of ",
               t.vocab_size);
}

namespace {

ModelConfig dense_config(int64_t hidden, int layers, int heads, int kv_heads, int64_t ffn, bool tied,
                         int vision_depth, int64_t vision_hidden, int64_t vision_ffn, std::vector<int> deepstack) {
  ModelConfig c;
  c.model_type = "qwen3_vl";
  c.text.hidden_size = hidden;
  c.text.num_hidden_layers = layers;
  c.text.num_attention_heads = heads;
  c.text.num_key_value_heads = kv_heads;
  c.text.intermediate_size = ffn;
  c.text.num_experts = 0;
  c.text.num_experts_per_tok = 0;
  c.text.moe_intermediate_size = 0;
  c.tie_word_embeddings = tied;
  c.vision.depth = vision_depth;
  c.vision.hidden_size = vision_hidden;
  c.vision.intermediate_size = vision_ffn;
  c.vision.out_hidden_size = hidden;
  c.vision.deepstack_visual_indexes = std::move(deepstack);
  return c;
}

}  // namespace

ModelConfig qwen3_vl_30b_a3b_config() { return ModelConfig{}; }

ModelConfig qwen3_vl_235b_a22b_config() {
  ModelConfig c;
  c.text.hidden_size = 4096;
  c.text.num_hidden_layers = 94;
  c.text.num_attention_heads = 64;
  c.text.num_key_value_heads = 4;
  c.text.intermediate_size = 12288;
  c.text.moe_intermediate_size = 1536;
  c.vision.out_hidden_size = 4096;
  return c;
}

ModelConfig qwen3_vl_2b_config() { return dense_config(2048, 28, 16, 8, 6144, true, 24, 1024, 4096, {5, 11, 17}); }
ModelConfig qwen3_vl_4b_config() { return dense_config(2560, 36, 32, 8, 9728, true, 24, 1024, 4096, {5, 11, 17}); }
ModelConfig qwen3_vl_8b_config() {
  return dense_config(4096, 36, 32, 8, 12288, false, 27, 1152, 4304, {8, 16, 24});
}

}  // namespace q3vl
