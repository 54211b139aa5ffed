// The Qwen3-VL(-MoE) text decoder layer (HF Qwen3VLMoeTextDecoderLayer) forward and backward:
//   h_mid = h + o_proj(attn(RMSNorm(h)))   (q/k RMSNorm per head, interleaved MRoPE, GQA, causal per document)
//   h_out = h_mid + MLP(RMSNorm(h_mid))    (sparse MoE block or dense SwiGLU MLP)
// Padding follows HF's masks: a padding token (after the real tokens of its document) attends to the real
// tokens of its document only; it still runs through the MLP/MoE but is left out of the routing statistics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/arena.h"
#include "core/layers/attention_block.h"
#include "core/layers/moe.h"
#include "core/layers/swiglu_mlp.h"
#include "core/layers/tensor_parallel.h"
#include "core/model/config.h"
#include "core/model/param_store.h"
#include "core/tensor.h"

namespace q3vl {

struct DecoderLayerWeights {
  Tensor input_norm, post_norm;
  AttentionWeights attn;
  bool moe = false;
  MoeWeights experts;                   // MoE layers: router, fused gate_up [E,H,2I], down [E,I,H]
  SwigluMlpWeights mlp;                  // dense layers
};

// Views into a ParamStore (weights or gradients). lm_head is the embedding table when tied, so its
// gradient lands in the embedding gradient.
struct TextWeights {
  Tensor embed;
  std::vector<DecoderLayerWeights> layers;
  Tensor final_norm;
  Tensor lm_head;
};
TextWeights text_weights(const ModelConfig& config, const ParamStore& store);

// Per-batch inputs every layer shares.
struct TextContext {
  Tensor cos, sin;    // [N, head_dim] MRoPE tables
  Tensor cu_seqlens;  // i64 [D + 1] documents over the N tokens
  Tensor doc_real;    // i64 [D] real tokens at the start of each document; the rest is padding
  Tensor valid;       // u8 [N] 1 = real token
  ExpertExchange* expert_exchange = nullptr;  // expert parallelism of the MoE layers (moe.h), or none
  Arena* expert_rows = nullptr;               // with expert_exchange: MoeConfig::expert_rows (the workspace's)
  // Tensor parallelism (tensor_parallel.h), or none: the layer weights are this rank's slices (tp_layout.h):
  // local query/key-value heads, dense MLP columns, and the experts' FFN columns when tp_experts_split.
  TensorParallel* tp = nullptr;
  bool tp_experts_split = true;
};

struct DecoderLayerSaved {
  Tensor h_in, normed1, rstd1;
  AttentionSaved attn;
  Tensor h_mid, normed2, rstd2;
  MoeSaved moe;
  MoeStats stats;
  SwigluMlpSaved mlp;  // dense layers
  Tensor h_out;
};

AttentionConfig text_attention_config(const TextConfig& config);
MoeConfig text_moe_config(const TextConfig& config);

// Activation-arena bytes of one layer for n tokens (saved tensors plus the MoE's transient scratch).
// expert_parallel: sized for MoE layers on the expert-parallel path (moe.h).
size_t decoder_layer_activation_bytes(const ModelConfig& config, int layer, int64_t n, DType dtype,
                                      bool expert_parallel = false);
// The part of decoder_layer_activation_bytes the forward only borrows (released before it returns).
size_t decoder_layer_transient_bytes(const ModelConfig& config, int layer, int64_t n, DType dtype,
                                     bool expert_parallel = false);
// Scratch-arena bytes of the forward (padding attention) and the backward of one layer.
size_t decoder_layer_scratch_bytes(const ModelConfig& config, int layer, int64_t n, int64_t max_padding,
                                   DType dtype, bool expert_parallel = false);

// h_in [N, H]; writes s.h_out (allocated in acts) and everything the backward needs.
void decoder_layer_forward(const ModelConfig& config, int layer, const DecoderLayerWeights& w,
                           const TextContext& ctx, const Tensor& h_in, Arena& acts, Arena& scratch,
                           DecoderLayerSaved& s);

// dh [N, H] holds d h_out on entry and d h_in on return. aux_dprob [E] (coefficient included) or
// undefined; parameter gradients accumulate into g.
void decoder_layer_backward(const ModelConfig& config, int layer, const DecoderLayerWeights& w,
                            const TextContext& ctx, const DecoderLayerSaved& s, const Tensor& dh,
                            const Tensor& aux_dprob, const DecoderLayerWeights& g, Arena& scratch);

}  // namespace q3vl
