// Model configuration of Qwen3-VL (dense, model_type "qwen3_vl") and Qwen3-VL-MoE ("qwen3_vl_moe"): the
// fields of Hugging Face's Qwen3VL(Moe)Config / TextConfig / VisionConfig that change what the model
// computes, with HF's field names. Defaults are the Qwen3-VL-30B-A3B-Instruct values (SPEC "Configs");
// a config.json reader overwrites every key the file has.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace q3vl {

struct TextConfig {
  int64_t vocab_size = 151936;
  int64_t hidden_size = 2048;
  int64_t intermediate_size = 6144;  // dense FFN width (dense layers and the dense model)
  int num_hidden_layers = 48;
  int num_attention_heads = 32;
  int num_key_value_heads = 4;
  int64_t head_dim = 128;
  double rms_norm_eps = 1e-6;
  double rope_theta = 5'000'000.0;             // rope_parameters.rope_theta (or legacy rope_scaling)
  std::array<int, 3> mrope_section{24, 20, 20};  // frequencies for T, H, W; sum = head_dim / 2
  bool mrope_interleaved = true;               // Qwen3-VL always interleaves (T,H,W,T,H,W,...)
  int num_experts = 128;                       // 0: no MoE layer at all (the dense qwen3_vl text model)
  int num_experts_per_tok = 8;
  int64_t moe_intermediate_size = 768;
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;  // layers that use the dense MLP although the step would make them MoE
  bool norm_topk_prob = true;        // HF's Qwen3-VL-MoE router always renormalises the top-k weights
  double router_aux_loss_coef = 0.001;
  std::string hidden_act = "silu";
  bool attention_bias = false;
  double initializer_range = 0.02;
  int64_t max_position_embeddings = 262144;
  // text_config.pad_token_id, or -1 when absent (null). HF builds embed_tokens with padding_idx =
  // pad_token_id, so that table row receives no gradient.
  int64_t pad_token_id = -1;
};

struct VisionConfig {
  int depth = 27;
  int64_t hidden_size = 1152;
  int64_t intermediate_size = 4304;
  int num_heads = 16;
  int64_t patch_size = 16;
  int64_t temporal_patch_size = 2;
  int64_t spatial_merge_size = 2;
  int64_t in_channels = 3;
  int64_t out_hidden_size = 2048;  // must equal text hidden_size
  int64_t num_position_embeddings = 2304;
  std::vector<int> deepstack_visual_indexes{8, 16, 24};
  std::string hidden_act = "gelu_pytorch_tanh";
  double layer_norm_eps = 1e-6;  // hard-coded in HF (nn.LayerNorm(..., eps=1e-6)), not a config key
  double rope_theta = 10000.0;   // hard-coded in HF's VisionRotaryEmbedding

  int64_t head_dim() const { return hidden_size / num_heads; }
  int64_t patch_features() const { return in_channels * temporal_patch_size * patch_size * patch_size; }
  int64_t merge_unit() const { return spatial_merge_size * spatial_merge_size; }
  int64_t merged_hidden_size() const { return hidden_size * merge_unit(); }
  int64_t num_grid_per_side() const;  // sqrt(num_position_embeddings), checked to be a perfect square
};

struct ModelConfig {
  std::string model_type = "qwen3_vl_moe";  // or "qwen3_vl" (dense text decoder)
  TextConfig text;
  VisionConfig vision;
  int64_t image_token_id = 151655;
  int64_t video_token_id = 151656;
  int64_t vision_start_token_id = 151652;
  int64_t vision_end_token_id = 151653;
  // The top-level key decides (HF ties lm_head to embed_tokens from the composite config); the 30B MoE
  // model is untied, the 2B/4B dense models are tied.
  bool tie_word_embeddings = false;

  bool is_moe_model() const { return model_type == "qwen3_vl_moe"; }
  // HF Qwen3VLMoeTextDecoderLayer: MoE iff layer not in mlp_only_layers, num_experts > 0 and
  // (layer + 1) % decoder_sparse_step == 0. The dense qwen3_vl decoder never has MoE layers.
  bool is_moe_layer(int layer) const;
  int num_moe_layers() const;

  // Consistency of sizes (heads divide, mrope sections sum to head_dim/2, out_hidden == hidden, deepstack
  // indexes inside the vision depth and at most the number of text layers, token ids inside the vocab...);
  // throws q3vl::Error naming the offending field.
  void validate() const;
};

// Reference configurations (SPEC "Configs"), for planning and tests.
ModelConfig qwen3_vl_30b_a3b_config();
ModelConfig qwen3_vl_235b_a22b_config();
ModelConfig qwen3_vl_2b_config();
ModelConfig qwen3_vl_4b_config();
ModelConfig qwen3_vl_8b_config();

}  // namespace q3vl
