// Text decoder layer forward/backward composed from RMSNorm, the attention block, the padding-query attention
// (padding rows equal to HF's), and MoE or the dense SwiGLU MLP.
#include "core/model/text_decoder.h"

#include <algorithm>
#include <string>

#include "core/arena_layout.h"
#include "core/layer_checks.h"
#include "core/layers/norms.h"
#include "core/layers/padding_attention.h"
#include "core/layers/swiglu_mlp.h"
#include "core/model/row_ops.h"

namespace q3vl {

namespace {

// The layer's own saved tensors (its sub-layers carve theirs), in carving order; the routing statistics on MoE
// layers only.
template <class Carve>
void own_tensors(const TextConfig& c, bool moe, int64_t n, DType dt, Carve&& carve, DecoderLayerSaved& s) {
  const int64_t h = c.hidden_size;
  s.normed1 = carve({n, h}, dt);
  s.rstd1 = carve({n}, dt);
  s.h_mid = carve({n, h}, dt);
  s.normed2 = carve({n, h}, dt);
  s.rstd2 = carve({n}, dt);
  s.h_out = carve({n, h}, dt);
  if (moe) {
    s.stats.counts = carve({c.num_experts}, DType::i64);
    s.stats.prob_sum = carve({c.num_experts}, DType::f64);
  }
}

// The backward's own scratch: d normed (of either norm) and the norm's input gradient before it is added.
struct BackwardScratch {
  Tensor d_normed, d_tmp;
};
template <class Carve>
BackwardScratch backward_tensors(int64_t n, int64_t h, DType dt, Carve&& carve) {
  BackwardScratch t;
  t.d_normed = carve({n, h}, dt);
  t.d_tmp = carve({n, h}, dt);
  return t;
}

// This rank's share of the attention heads and of the MoE experts' FFN columns.
AttentionConfig local_attention_config(const TextConfig& c, const TextContext& ctx) {
  AttentionConfig a = text_attention_config(c);
  if (ctx.tp != nullptr) {
    a.num_heads /= ctx.tp->size();
    a.num_kv_heads /= ctx.tp->size();
  }
  return a;
}

MoeConfig local_moe_config(const TextConfig& c, const TextContext& ctx) {
  MoeConfig m = text_moe_config(c);
  m.exchange = ctx.expert_exchange;
  m.expert_rows = ctx.expert_rows;
  if (ctx.tp != nullptr && ctx.tp_experts_split) m.expert_ffn /= ctx.tp->size();
  return m;
}

void check_context(const char* L, const TextConfig& c, const TextContext& ctx, int64_t n, DType dt) {
  require(L, "ctx.cos", ctx.cos, dt, {n, c.head_dim});
  require(L, "ctx.sin", ctx.sin, dt, {n, c.head_dim});
  require(L, "ctx.cu_seqlens", ctx.cu_seqlens, DType::i64, {-1});
  require(L, "ctx.doc_real", ctx.doc_real, DType::i64, {ctx.cu_seqlens.size(0) - 1});
  require(L, "ctx.valid", ctx.valid, DType::u8, {n});
}

}  // namespace

AttentionConfig text_attention_config(const TextConfig& c) {
  AttentionConfig a;
  a.hidden = c.hidden_size;
  a.num_heads = c.num_attention_heads;
  a.num_kv_heads = c.num_key_value_heads;
  a.head_dim = c.head_dim;
  a.qkv_bias = a.o_bias = false;
  a.qk_norm = true;
  a.causal = true;
  a.norm_eps = c.rms_norm_eps;
  return a;
}

MoeConfig text_moe_config(const TextConfig& c) {
  return {c.hidden_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size};
}

TextWeights text_weights(const ModelConfig& config, const ParamStore& s) {
  TextWeights w;
  const std::string root = "model.language_model";
  w.embed = s.at(root + ".embed_tokens.weight");
  for (int l = 0; l < config.text.num_hidden_layers; ++l) {
    const std::string p = root + ".layers." + std::to_string(l);
    DecoderLayerWeights lw;
    lw.input_norm = s.at(p + ".input_layernorm.weight");
    lw.post_norm = s.at(p + ".post_attention_layernorm.weight");
    lw.attn.wq = s.at(p + ".self_attn.q_proj.weight");
    lw.attn.wk = s.at(p + ".self_attn.k_proj.weight");
    lw.attn.wv = s.at(p + ".self_attn.v_proj.weight");
    lw.attn.wo = s.at(p + ".self_attn.o_proj.weight");
    lw.attn.q_norm = s.at(p + ".self_attn.q_norm.weight");
    lw.attn.k_norm = s.at(p + ".self_attn.k_norm.weight");
    lw.moe = config.is_moe_layer(l);
    if (lw.moe) {
      lw.experts = {s.at(p + ".mlp.gate.weight"), s.at(p + ".mlp.experts.gate_up_proj"),
                    s.at(p + ".mlp.experts.down_proj")};
    } else {
      lw.mlp = {s.at(p + ".mlp.gate_proj.weight"), s.at(p + ".mlp.up_proj.weight"),
                s.at(p + ".mlp.down_proj.weight")};
    }
    w.layers.push_back(lw);
  }
  w.final_norm = s.at(root + ".norm.weight");
  w.lm_head = config.tie_word_embeddings ? w.embed : s.at("lm_head.weight");
  return w;
}

size_t decoder_layer_activation_bytes(const ModelConfig& config, int layer, int64_t n, DType dt, bool expert_parallel) {
  const TextConfig& c = config.text;
  const bool moe = config.is_moe_layer(layer);
  ArenaSizer own;
  DecoderLayerSaved unused;
  own_tensors(c, moe, n, dt, own, unused);
  const size_t mlp = moe ? moe_forward_arena_bytes(text_moe_config(c), n, dt, expert_parallel)
                         : swiglu_mlp_saved_bytes(n, c.intermediate_size, dt);
  return own.bytes() + attention_block_saved_bytes(text_attention_config(c), n, dt) + mlp;
}

size_t decoder_layer_transient_bytes(const ModelConfig& config, int layer, int64_t n, DType dt, bool expert_parallel) {
  return config.is_moe_layer(layer) ? moe_forward_transient_bytes(text_moe_config(config.text), n, dt, expert_parallel)
                                    : 0;
}

size_t decoder_layer_scratch_bytes(const ModelConfig& config, int layer, int64_t n, int64_t max_padding, DType dt,
                                   bool expert_parallel) {
  const TextConfig& c = config.text;
  const size_t forward = padding_attention_scratch_bytes(max_padding, c.num_attention_heads, c.head_dim, dt);
  const size_t mlp = config.is_moe_layer(layer)
                         ? moe_backward_scratch_bytes(text_moe_config(c), n, dt, expert_parallel)
                         : swiglu_mlp_scratch_bytes(n, c.intermediate_size, dt);
  ArenaSizer own;
  backward_tensors(n, c.hidden_size, dt, own);
  const size_t backward =
      own.bytes() + std::max(attention_block_scratch_bytes(text_attention_config(c), n, dt), mlp);
  return std::max(forward, backward);
}

void decoder_layer_forward(const ModelConfig& config, int layer, const DecoderLayerWeights& w,
                           const TextContext& ctx, const Tensor& h_in, Arena& acts, Arena& scratch,
                           DecoderLayerSaved& s) {
  const char* L = "decoder_layer_forward";
  const TextConfig& c = config.text;
  const DType dt = h_in.dtype();
  require(L, "h_in", h_in, dt, {-1, c.hidden_size});
  const int64_t n = h_in.size(0);
  check_context(L, c, ctx, n, dt);
  Q3VL_CHECK(w.moe == config.is_moe_layer(layer), L, ": weights of layer ", layer, " are ",
             w.moe ? "MoE" : "dense", " but the config says otherwise");
  const AttentionConfig acfg = local_attention_config(c, ctx);

  s.h_in = h_in;
  own_tensors(c, w.moe, n, dt, ArenaCarver(acts), s);
  rmsnorm_forward(h_in, w.input_norm, c.rms_norm_eps, s.normed1, s.rstd1);
  s.attn = attention_block_forward(acfg, w.attn, s.normed1, ctx.cos, ctx.sin, ctx.cu_seqlens, acts, s.h_mid);
  // Padding queries: replace their rows by attention over the real tokens of their document only.
  padding_attention_forward(s.attn.q, s.attn.k, s.attn.v, ctx.cu_seqlens, ctx.doc_real, acfg.scale(), w.attn.wo,
                            s.h_mid, scratch);
  // o_proj is row-parallel under tensor parallelism: each rank holds its heads' share of the sum.
  tp_all_reduce(ctx.tp, s.h_mid);
  add_into(s.h_mid, h_in);

  rmsnorm_forward(s.h_mid, w.post_norm, c.rms_norm_eps, s.normed2, s.rstd2);
  if (w.moe) {
    moe_forward(local_moe_config(c, ctx), w.experts, s.normed2, ctx.valid, acts, s.moe, s.h_out, s.stats);
    // Split experts give partial sums; whole experts (expert parallelism) the full output on every tp rank.
    if (ctx.tp_experts_split) tp_all_reduce(ctx.tp, s.h_out);
  } else {
    s.mlp = swiglu_mlp_forward(w.mlp, s.normed2, acts, s.h_out);
    tp_all_reduce(ctx.tp, s.h_out);
  }
  add_into(s.h_out, s.h_mid);
}

void decoder_layer_backward(const ModelConfig& config, int layer, const DecoderLayerWeights& w,
                            const TextContext& ctx, const DecoderLayerSaved& s, const Tensor& dh,
                            const Tensor& aux_dprob, const DecoderLayerWeights& g, Arena& scratch) {
  const char* L = "decoder_layer_backward";
  const TextConfig& c = config.text;
  const DType dt = s.h_in.dtype();
  const int64_t n = s.h_in.size(0), h = c.hidden_size;
  require(L, "dh", dh, dt, {n, h});
  check_context(L, c, ctx, n, dt);
  Q3VL_CHECK(w.moe == config.is_moe_layer(layer) && g.moe == w.moe, L, ": layer ", layer,
             " weights, gradients and config disagree on MoE");
  const size_t mark = scratch.mark();
  const BackwardScratch t = backward_tensors(n, h, dt, ArenaCarver(scratch));
  const Tensor &d_normed = t.d_normed, &d_tmp = t.d_tmp;
  // h_out = h_mid + mlp(normed2).
  if (w.moe) {
    // g holds gradient views in the weights' layout; score_bias is state and has no gradient.
    const MoeGradients ge{g.experts.router, g.experts.gate_up, g.experts.down};
    moe_backward(local_moe_config(c, ctx), w.experts, s.normed2, ctx.valid, s.moe, dh, aux_dprob, d_normed, ge,
                 scratch);
    if (ctx.tp_experts_split) tp_all_reduce(ctx.tp, d_normed);
  } else {
    swiglu_mlp_backward(w.mlp, s.normed2, s.mlp, dh, d_normed, g.mlp, scratch);
    tp_all_reduce(ctx.tp, d_normed);
  }
  rmsnorm_backward(s.h_mid, w.post_norm, s.rstd2, d_normed, d_tmp, g.post_norm);
  add_into(dh, d_tmp);
  // h_mid = h_in + attn(normed1); padding rows of dh are zero (padding takes no loss), so the padding
  // replacement of the forward needs no backward.
  attention_block_backward(local_attention_config(c, ctx), w.attn, s.normed1, ctx.cos, ctx.sin, ctx.cu_seqlens, s.attn,
                           dh, d_normed, g.attn, scratch);
  tp_all_reduce(ctx.tp, d_normed);
  rmsnorm_backward(s.h_in, w.input_norm, s.rstd1, d_normed, d_tmp, g.input_norm);
  add_into(dh, d_tmp);
  scratch.release(mark);
}

}  // namespace q3vl
