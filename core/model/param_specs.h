// The parameter list of Qwen3-VL(-MoE): every tensor with its Hugging Face checkpoint key and on-disk
// shape, in one fixed order (vision tower, then text decoder, then lm_head). Checkpoint loading/saving,
// the weight and gradient arenas of the model and the parameter counts of the planner all use this list.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "core/tensor.h"

namespace q3vl {

// What a tensor is, which decides its deterministic initialisation (see Model::init_weights) and lets an
// optimizer tell decayed matrices from norms and biases.
enum class ParamKind : uint8_t {
  embedding,  // token embedding table [V,H], vision position table [P,D]: normal(0, std)
  matrix,     // Linear weights [out,in], the router [E,H], the patch-embed Conv3d kernel: normal(0, std)
  experts,    // fused expert tensors [E,H,2I] / [E,I,H] (x@W layout on disk): normal(0, std)
  norm,       // RMSNorm / LayerNorm weights: ones
  bias,       // Linear / Conv3d / LayerNorm biases: zeros
};

enum class ParamTower : uint8_t { vision, text, head };

struct ParamSpec {
  std::string hf_key;  // e.g. "model.language_model.layers.3.mlp.experts.gate_up_proj"
  Shape shape;         // on-disk (safetensors) shape
  ParamKind kind;
  ParamTower tower;
  int layer = -1;      // vision block / text layer index, -1 for tensors outside the repeated blocks
  // Tensor parallelism (core/model/tp_layout.h): the dimension split over the tp ranks (-1: replicated), cut
  // into tp_blocks equal blocks each split over the ranks (fused q|k|v, gate|up); tp_partial_grad: a replicated
  // tensor whose gradient each rank computes from its own heads or expert columns only (summed over tp).
  int tp_dim = -1;
  int tp_blocks = 1;
  bool tp_partial_grad = false;
  int64_t numel() const { return shape.numel(); }
};

std::string_view param_kind_name(ParamKind kind);

// Every parameter of the model (HF named_parameters() after tying: lm_head.weight only when untied).
std::vector<ParamSpec> model_param_specs(const ModelConfig& config);

// Sum of numel over model_param_specs: equals HF's model.num_parameters().
int64_t count_parameters(const ModelConfig& config);

// Parameters one text token touches: everything except the vision tower, with only
// num_experts_per_tok of num_experts expert tensors counted in each MoE layer (the router counts fully).
// The tied embedding table is counted once.
int64_t count_active_text_parameters(const ModelConfig& config);

// Parameters of the vision tower alone (patch embed, position table, blocks, mergers).
int64_t count_vision_parameters(const ModelConfig& config);

}  // namespace q3vl
