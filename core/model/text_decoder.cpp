// Text decoder layer forward/backward composed from RMSNorm, the attention block, MoE and a dense SwiGLU
// MLP, plus the padding-query attention that makes padding rows equal HF's.
#include "core/model/text_decoder.h"

#include <algorithm>
#include <cmath>
#include <span>
#include <string>

#include "core/kernels/cpu/gemm.h"
#include "core/layer_checks.h"
#include "core/layers/activations.h"
#include "core/layers/linear.h"
#include "core/layers/norms.h"
#include "core/model/row_ops.h"

namespace q3vl {

namespace {

size_t bytes(int64_t elems, DType dtype) { return Arena::aligned(static_cast<size_t>(elems) * dtype_size(dtype)); }

// The MoE forward's own scratch (released before it returns): the gathered rows and the SwiGLU output (the
// expert-parallel path keeps its expert-side rows outside the arena).
size_t moe_transient_bytes(const MoeConfig& m, int64_t n, DType dt, bool expert_parallel) {
  const size_t rows = bytes(n * m.top_k * m.hidden, dt);
  return expert_parallel ? rows : rows + bytes(n * m.top_k * m.expert_ffn, dt);
}

// Dense MLP projections: gate and up written side by side into gate_up [N, 2I] (the fused layout swiglu
// expects) by two GEMMs with row stride 2I.
template <class T>
void dense_gate_up(const Tensor& x, const Tensor& wg, const Tensor& wu, const Tensor& gate_up) {
  const int64_t n = x.size(0), h = x.size(1), i = wg.size(0);
  T* out = gate_up.data<T>();
  cpu::gemm<T>(false, true, n, i, h, T(1), x.data<T>(), h, wg.data<T>(), h, T(0), out, 2 * i);
  cpu::gemm<T>(false, true, n, i, h, T(1), x.data<T>(), h, wu.data<T>(), h, T(0), out + i, 2 * i);
}

// Gradients of the two projections from d_gate_up [N, 2I]: dWg, dWu accumulate; dx written.
template <class T>
void dense_gate_up_backward(const Tensor& x, const Tensor& wg, const Tensor& wu, const Tensor& d_gate_up,
                            const Tensor& dx, const Tensor& dwg, const Tensor& dwu) {
  const int64_t n = x.size(0), h = x.size(1), i = wg.size(0);
  const T* dgu = d_gate_up.data<T>();
  cpu::gemm<T>(true, false, i, h, n, T(1), dgu, 2 * i, x.data<T>(), h, T(1), dwg.data<T>(), h);
  cpu::gemm<T>(true, false, i, h, n, T(1), dgu + i, 2 * i, x.data<T>(), h, T(1), dwu.data<T>(), h);
  cpu::gemm<T>(false, false, n, h, i, T(1), dgu, 2 * i, wg.data<T>(), h, T(0), dx.data<T>(), h);
  cpu::gemm<T>(false, false, n, h, i, T(1), dgu + i, 2 * i, wu.data<T>(), h, T(1), dx.data<T>(), h);
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
      lw.gate_proj = s.at(p + ".mlp.gate_proj.weight");
      lw.up_proj = s.at(p + ".mlp.up_proj.weight");
      lw.down_proj = s.at(p + ".mlp.down_proj.weight");
    }
    w.layers.push_back(lw);
  }
  w.final_norm = s.at(root + ".norm.weight");
  w.lm_head = config.tie_word_embeddings ? w.embed : s.at("lm_head.weight");
  return w;
}

size_t decoder_layer_activation_bytes(const ModelConfig& config, int layer, int64_t n, DType dt, bool expert_parallel) {
  const TextConfig& c = config.text;
  const int64_t h = c.hidden_size;
  size_t total = 4 * bytes(n * h, dt) + 2 * bytes(n, dt) + attention_block_saved_bytes(text_attention_config(c), n, dt);
  if (config.is_moe_layer(layer)) {
    total += moe_forward_arena_bytes(text_moe_config(c), n, dt, expert_parallel) + bytes(c.num_experts, DType::i64) +
             bytes(c.num_experts, DType::f64);
  } else {
    total += bytes(n * 2 * c.intermediate_size, dt) + bytes(n * c.intermediate_size, dt);
  }
  return total;
}

size_t decoder_layer_transient_bytes(const ModelConfig& config, int layer, int64_t n, DType dt, bool expert_parallel) {
  return config.is_moe_layer(layer) ? moe_transient_bytes(text_moe_config(config.text), n, dt, expert_parallel) : 0;
}

size_t decoder_layer_scratch_bytes(const ModelConfig& config, int layer, int64_t n, int64_t max_padding, DType dt,
                                   bool expert_parallel) {
  const TextConfig& c = config.text;
  const size_t forward = bytes(max_padding * c.num_attention_heads * c.head_dim, dt);
  const size_t mlp = config.is_moe_layer(layer)
                         ? moe_backward_scratch_bytes(text_moe_config(c), n, dt, expert_parallel)
                         : bytes(n * c.intermediate_size, dt) + bytes(n * 2 * c.intermediate_size, dt);
  const size_t backward =
      2 * bytes(n * c.hidden_size, dt) + std::max(attention_block_scratch_bytes(text_attention_config(c), n, dt), mlp);
  return std::max(forward, backward);
}

void padding_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t doc_begin, int64_t real,
                       double scale, const Tensor& out) {
  const char* L = "padding_attention";
  const DType dt = q.dtype();
  require(L, "q", q, dt, {-1, -1, -1});
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  require(L, "k", k, dt, {n, -1, d});
  const int64_t hkv = k.size(1);
  require(L, "v", v, dt, {n, hkv, d});
  Q3VL_CHECK(hkv > 0 && hq % hkv == 0, L, ": ", hq, " query heads are not a multiple of ", hkv, " kv heads");
  require(L, "out", out, dt, {-1, hq, d});
  const int64_t pads = out.size(0);
  Q3VL_CHECK(real >= 1 && doc_begin >= 0 && doc_begin + real + pads <= n, L, ": document at ", doc_begin, " with ",
             real, " real and ", pads, " padding tokens exceeds ", n, " tokens");
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    T* op = out.data<T>();
    const int64_t group = hq / hkv;
    const T sc = static_cast<T>(scale);
#pragma omp parallel for schedule(static)
    for (int64_t job = 0; job < pads * hq; ++job) {
      const int64_t p = job / hq, head = job % hq, kvh = head / group;
      const T* qrow = qp + ((doc_begin + real + p) * hq + head) * d;
      auto score = [&](int64_t j) {
        const T* krow = kp + ((doc_begin + j) * hkv + kvh) * d;
        T s = 0;
        for (int64_t e = 0; e < d; ++e) s += qrow[e] * krow[e];
        return s * sc;
      };
      T mx = score(0);
      for (int64_t j = 1; j < real; ++j) mx = std::max(mx, score(j));
      T* o = op + (p * hq + head) * d;
      std::fill(o, o + d, T(0));
      T sum = 0;
      for (int64_t j = 0; j < real; ++j) {
        const T e = std::exp(score(j) - mx);
        sum += e;
        const T* vrow = vp + ((doc_begin + j) * hkv + kvh) * d;
        for (int64_t x = 0; x < d; ++x) o[x] += e * vrow[x];
      }
      for (int64_t x = 0; x < d; ++x) o[x] /= sum;
    }
  });
}

void decoder_layer_forward(const ModelConfig& config, int layer, const DecoderLayerWeights& w,
                           const TextContext& ctx, const Tensor& h_in, Arena& acts, Arena& scratch,
                           DecoderLayerSaved& s) {
  const char* L = "decoder_layer_forward";
  const TextConfig& c = config.text;
  const DType dt = h_in.dtype();
  require(L, "h_in", h_in, dt, {-1, c.hidden_size});
  const int64_t n = h_in.size(0), h = c.hidden_size;
  check_context(L, c, ctx, n, dt);
  Q3VL_CHECK(w.moe == config.is_moe_layer(layer), L, ": weights of layer ", layer, " are ",
             w.moe ? "MoE" : "dense", " but the config says otherwise");
  const AttentionConfig acfg = local_attention_config(c, ctx);

  s.h_in = h_in;
  s.normed1 = Tensor::empty(acts, {n, h}, dt);
  s.rstd1 = Tensor::empty(acts, {n}, dt);
  rmsnorm_forward(h_in, w.input_norm, c.rms_norm_eps, s.normed1, s.rstd1);
  s.h_mid = Tensor::empty(acts, {n, h}, dt);
  s.attn = attention_block_forward(acfg, w.attn, s.normed1, ctx.cos, ctx.sin, ctx.cu_seqlens, acts, s.h_mid);
  // Padding queries: replace their rows by attention over the real tokens of their document only.
  const int64_t* cu = ctx.cu_seqlens.data<int64_t>();
  const int64_t* real = ctx.doc_real.data<int64_t>();
  const int64_t qd = acfg.num_heads * acfg.head_dim;
  for (int64_t d = 0; d + 1 < ctx.cu_seqlens.size(0); ++d) {
    const int64_t pads = cu[d + 1] - cu[d] - real[d];
    if (pads == 0) continue;
    const size_t mark = scratch.mark();
    const Tensor out = Tensor::empty(scratch, {pads, acfg.num_heads, acfg.head_dim}, dt);
    padding_attention(s.attn.q, s.attn.k, s.attn.v, cu[d], real[d], acfg.scale(), out);
    linear_forward(out.view({pads, qd}), w.attn.wo, Tensor{}, s.h_mid.narrow(0, cu[d] + real[d], pads));
    scratch.release(mark);
  }
  // o_proj is row-parallel under tensor parallelism: each rank holds its heads' share of the sum.
  tp_all_reduce(ctx.tp, s.h_mid);
  add_into(s.h_mid, h_in);

  s.normed2 = Tensor::empty(acts, {n, h}, dt);
  s.rstd2 = Tensor::empty(acts, {n}, dt);
  rmsnorm_forward(s.h_mid, w.post_norm, c.rms_norm_eps, s.normed2, s.rstd2);
  s.h_out = Tensor::empty(acts, {n, h}, dt);
  if (w.moe) {
    s.stats.counts = Tensor::empty(acts, {c.num_experts}, DType::i64);
    s.stats.prob_sum = Tensor::empty(acts, {c.num_experts}, DType::f64);
    moe_forward(local_moe_config(c, ctx), w.experts, s.normed2, ctx.valid, acts, s.moe, s.h_out, s.stats);
    // Split experts give partial sums; whole experts (expert parallelism) the full output on every tp rank.
    if (ctx.tp_experts_split) tp_all_reduce(ctx.tp, s.h_out);
  } else {
    const int64_t inter = w.gate_proj.size(0);
    s.gate_up = Tensor::empty(acts, {n, 2 * inter}, dt);
    s.act = Tensor::empty(acts, {n, inter}, dt);
    require(L, "gate_proj", w.gate_proj, dt, {inter, h});
    require(L, "up_proj", w.up_proj, dt, {inter, h});
    dispatch_float(L, dt, [&](auto tag) { dense_gate_up<decltype(tag)>(s.normed2, w.gate_proj, w.up_proj, s.gate_up); });
    swiglu_forward(s.gate_up, s.act);
    linear_forward(s.act, w.down_proj, Tensor{}, s.h_out);
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
  const Tensor d_normed = Tensor::empty(scratch, {n, h}, dt);
  const Tensor d_tmp = Tensor::empty(scratch, {n, h}, dt);
  // h_out = h_mid + mlp(normed2).
  if (w.moe) {
    moe_backward(local_moe_config(c, ctx), w.experts, s.normed2, ctx.valid, s.moe, dh, aux_dprob, d_normed, g.experts,
                 scratch);
    if (ctx.tp_experts_split) tp_all_reduce(ctx.tp, d_normed);
  } else {
    const int64_t inter = w.gate_proj.size(0);
    const size_t m = scratch.mark();
    const Tensor d_act = Tensor::empty(scratch, {n, inter}, dt);
    const Tensor d_gate_up = Tensor::empty(scratch, {n, 2 * inter}, dt);
    linear_backward(s.act, w.down_proj, dh, d_act, g.down_proj, Tensor{});
    swiglu_backward(s.gate_up, d_act, d_gate_up);
    require(L, "grad gate_proj", g.gate_proj, dt, {inter, h});
    require(L, "grad up_proj", g.up_proj, dt, {inter, h});
    dispatch_float(L, dt, [&](auto tag) {
      dense_gate_up_backward<decltype(tag)>(s.normed2, w.gate_proj, w.up_proj, d_gate_up, d_normed, g.gate_proj,
                                            g.up_proj);
    });
    scratch.release(m);
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
