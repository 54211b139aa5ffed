// model_param_specs: the HF checkpoint keys and on-disk shapes of every Qwen3-VL(-MoE) parameter, in the
// order of HF's module tree (model.visual, model.language_model, lm_head).
#include "core/model/param_specs.h"

#include "core/check.h"

namespace q3vl {

std::string_view param_kind_name(ParamKind kind) {
  switch (kind) {
    case ParamKind::embedding: return "embedding";
    case ParamKind::matrix: return "matrix";
    case ParamKind::experts: return "experts";
    case ParamKind::norm: return "norm";
    case ParamKind::bias: return "bias";
  }
  return "?";
}

namespace {

struct SpecList {
  std::vector<ParamSpec>& out;
  ParamTower tower;
  int layer;
  void add(std::string key, Shape shape, ParamKind kind, int tp_dim = -1, int tp_blocks = 1, bool tp_partial = false) {
    out.push_back({std::move(key), shape, kind, tower, layer, tp_dim, tp_blocks, tp_partial});
  }
  // Column-parallel (output features split; blocks > 1 for fused projections) or row-parallel (input features
  // split; the bias, added once, is replicated).
  void column_linear(const std::string& prefix, int64_t out_features, int64_t in_features, int blocks = 1) {
    add(prefix + ".weight", {out_features, in_features}, ParamKind::matrix, 0, blocks);
    add(prefix + ".bias", {out_features}, ParamKind::bias, 0, blocks);
  }
  void row_linear(const std::string& prefix, int64_t out_features, int64_t in_features) {
    add(prefix + ".weight", {out_features, in_features}, ParamKind::matrix, 1);
    add(prefix + ".bias", {out_features}, ParamKind::bias);
  }
  void layer_norm(const std::string& prefix, int64_t dim) {
    add(prefix + ".weight", {dim}, ParamKind::norm);
    add(prefix + ".bias", {dim}, ParamKind::bias);
  }
};

void add_merger(SpecList& s, const std::string& prefix, const VisionConfig& v, bool postshuffle_norm) {
  const int64_t merged = v.merged_hidden_size();
  s.layer_norm(prefix + ".norm", postshuffle_norm ? merged : v.hidden_size);
  s.column_linear(prefix + ".linear_fc1", merged, merged);
  s.row_linear(prefix + ".linear_fc2", v.out_hidden_size, merged);
}

void add_vision(std::vector<ParamSpec>& out, const VisionConfig& v) {
  const std::string root = "model.visual";
  const int64_t d = v.hidden_size;
  SpecList s{out, ParamTower::vision, -1};
  s.add(root + ".patch_embed.proj.weight", {d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size},
        ParamKind::matrix);
  s.add(root + ".patch_embed.proj.bias", {d}, ParamKind::bias);
  s.add(root + ".pos_embed.weight", {v.num_position_embeddings, d}, ParamKind::embedding);
  for (int b = 0; b < v.depth; ++b) {
    SpecList blk{out, ParamTower::vision, b};
    const std::string p = root + ".blocks." + std::to_string(b);
    blk.layer_norm(p + ".norm1", d);
    blk.layer_norm(p + ".norm2", d);
    blk.column_linear(p + ".attn.qkv", 3 * d, d, 3);
    blk.row_linear(p + ".attn.proj", d, d);
    blk.column_linear(p + ".mlp.linear_fc1", v.intermediate_size, d);
    blk.row_linear(p + ".mlp.linear_fc2", d, v.intermediate_size);
  }
  add_merger(s, root + ".merger", v, false);
  for (size_t k = 0; k < v.deepstack_visual_indexes.size(); ++k)
    add_merger(s, root + ".deepstack_merger_list." + std::to_string(k), v, true);
}

void add_text(std::vector<ParamSpec>& out, const ModelConfig& c) {
  const TextConfig& t = c.text;
  const std::string root = "model.language_model";
  const int64_t h = t.hidden_size;
  SpecList s{out, ParamTower::text, -1};
  s.add(root + ".embed_tokens.weight", {t.vocab_size, h}, ParamKind::embedding, 0);
  for (int l = 0; l < t.num_hidden_layers; ++l) {
    SpecList ly{out, ParamTower::text, l};
    const std::string p = root + ".layers." + std::to_string(l);
    ly.add(p + ".input_layernorm.weight", {h}, ParamKind::norm);
    ly.add(p + ".self_attn.q_proj.weight", {t.num_attention_heads * t.head_dim, h}, ParamKind::matrix, 0);
    ly.add(p + ".self_attn.k_proj.weight", {t.num_key_value_heads * t.head_dim, h}, ParamKind::matrix, 0);
    ly.add(p + ".self_attn.v_proj.weight", {t.num_key_value_heads * t.head_dim, h}, ParamKind::matrix, 0);
    ly.add(p + ".self_attn.o_proj.weight", {h, t.num_attention_heads * t.head_dim}, ParamKind::matrix, 1);
    ly.add(p + ".self_attn.q_norm.weight", {t.head_dim}, ParamKind::norm, -1, 1, true);
    ly.add(p + ".self_attn.k_norm.weight", {t.head_dim}, ParamKind::norm, -1, 1, true);
    ly.add(p + ".post_attention_layernorm.weight", {h}, ParamKind::norm);
    if (c.is_moe_layer(l)) {
      const int64_t e = t.num_experts, i = t.moe_intermediate_size;
      // Experts split like a dense MLP when tp is not combined with expert parallelism (tp_layout.h).
      ly.add(p + ".mlp.gate.weight", {e, h}, ParamKind::matrix, -1, 1, true);
      ly.add(p + ".mlp.experts.gate_up_proj", {e, h, 2 * i}, ParamKind::experts, 2, 2);
      ly.add(p + ".mlp.experts.down_proj", {e, i, h}, ParamKind::experts, 1);
    } else {
      const int64_t i = t.intermediate_size;
      ly.add(p + ".mlp.gate_proj.weight", {i, h}, ParamKind::matrix, 0);
      ly.add(p + ".mlp.up_proj.weight", {i, h}, ParamKind::matrix, 0);
      ly.add(p + ".mlp.down_proj.weight", {h, i}, ParamKind::matrix, 1);
    }
  }
  s.add(root + ".norm.weight", {h}, ParamKind::norm);
}

}  // namespace

std::vector<ParamSpec> model_param_specs(const ModelConfig& config) {
  config.validate();
  std::vector<ParamSpec> specs;
  add_vision(specs, config.vision);
  add_text(specs, config);
  if (!config.tie_word_embeddings)
    specs.push_back({"lm_head.weight", {config.text.vocab_size, config.text.hidden_size}, ParamKind::matrix,
                     ParamTower::head, -1, 0});
  return specs;
}

int64_t count_parameters(const ModelConfig& config) {
  int64_t n = 0;
  for (const ParamSpec& s : model_param_specs(config)) n += s.numel();
  return n;
}

int64_t count_vision_parameters(const ModelConfig& config) {
  int64_t n = 0;
  for (const ParamSpec& s : model_param_specs(config))
    if (s.tower == ParamTower::vision) n += s.numel();
  return n;
}

int64_t count_active_text_parameters(const ModelConfig& config) {
  int64_t n = 0;
  for (const ParamSpec& s : model_param_specs(config)) {
    if (s.tower == ParamTower::vision) continue;
    if (s.kind == ParamKind::experts)
      n += s.numel() / config.text.num_experts * config.text.num_experts_per_tok;
    else
      n += s.numel();
  }
  return n;
}

}  // namespace q3vl
