// Vision tower forward/backward composed from the patch-embed, position, attention-block, LayerNorm,
// Linear, GELU and patch-merger layers, whole or tensor-parallel.
#include "core/model/vision_tower.h"

#include <algorithm>
#include <string>

#include "core/arena_layout.h"
#include "core/layer_checks.h"
#include "core/layers/activations.h"
#include "core/layers/linear.h"
#include "core/layers/norms.h"
#include "core/layers/rotary.h"
#include "core/model/row_ops.h"

namespace q3vl {

namespace {

// A block's own saved tensors (the attention block carves its own), in carving order, for p patches and inter
// local MLP features.
template <class Carve>
void block_tensors(int64_t p, int64_t d, int64_t inter, DType dt, Carve&& carve, VisionBlockSaved& s) {
  s.ln1 = carve({p, d}, dt);
  s.mean1 = carve({p}, dt);
  s.rstd1 = carve({p}, dt);
  s.x_mid = carve({p, d}, dt);
  s.ln2 = carve({p, d}, dt);
  s.mean2 = carve({p}, dt);
  s.rstd2 = carve({p}, dt);
  s.fc1_out = carve({p, inter}, dt);
  s.act = carve({p, inter}, dt);
  s.x_out = carve({p, d}, dt);
}

// The backward's own scratch: dx, d_mid, d_ln [P, D] and d_act [P, I].
struct BackwardScratch {
  Tensor dx, d_mid, d_ln, d_act;
};
template <class Carve>
BackwardScratch backward_tensors(int64_t p, int64_t d, int64_t inter, DType dt, Carve&& carve) {
  BackwardScratch t;
  t.dx = carve({p, d}, dt);
  t.d_mid = carve({p, d}, dt);
  t.d_ln = carve({p, d}, dt);
  t.d_act = carve({p, inter}, dt);
  return t;
}

// The attention of one block on a rank holding 1 / parts of the heads.
AttentionConfig attention_config(const VisionConfig& c, int parts = 1) {
  AttentionConfig a;
  a.hidden = c.hidden_size;
  a.num_heads = a.num_kv_heads = c.num_heads / parts;
  a.head_dim = c.head_dim();
  a.qkv_bias = a.o_bias = true;
  a.qk_norm = false;
  a.causal = false;
  return a;
}

PatchMergerConfig merger_config(const VisionConfig& c, bool postshuffle) {
  PatchMergerConfig m;
  m.hidden = c.hidden_size;
  m.out_hidden = c.out_hidden_size;
  m.merge_unit = c.merge_unit();
  m.use_postshuffle_norm = postshuffle;
  m.eps = c.layer_norm_eps;
  return m;
}

// The number of tp ranks the heads and FFN columns are split over (1 without tp), checked to divide them.
int tp_parts(const char* L, const VisionConfig& c, const TensorParallel* tp) {
  if (tp == nullptr) return 1;
  const int parts = tp->size();
  Q3VL_CHECK(parts >= 1 && c.num_heads % parts == 0 && c.intermediate_size % parts == 0, L,
             ": tensor parallelism over ", parts, " ranks must divide vision num_heads ", c.num_heads,
             " and intermediate_size ", c.intermediate_size);
  return parts;
}

PatchEmbedGeometry patch_geometry(const VisionConfig& c) {
  return {c.in_channels, c.temporal_patch_size, c.patch_size};
}

PatchMergerWeights merger_weights(const ParamStore& s, const std::string& p) {
  return {s.at(p + ".norm.weight"), s.at(p + ".norm.bias"), s.at(p + ".linear_fc1.weight"),
          s.at(p + ".linear_fc1.bias"), s.at(p + ".linear_fc2.weight"), s.at(p + ".linear_fc2.bias")};
}

// The merger index of each tap in block order (HF: deepstack_visual_indexes.index(block)).
std::vector<int> tap_mergers(const VisionConfig& c) {
  std::vector<int> order;
  for (int b = 0; b < c.depth; ++b) {
    const auto& ix = c.deepstack_visual_indexes;
    const auto it = std::find(ix.begin(), ix.end(), b);
    if (it != ix.end()) order.push_back(static_cast<int>(it - ix.begin()));
  }
  return order;
}

}  // namespace

VisionTowerWeights vision_tower_weights(const VisionConfig& c, const ParamStore& s) {
  VisionTowerWeights w;
  const std::string root = "model.visual";
  w.patch_w = s.at(root + ".patch_embed.proj.weight");
  w.patch_b = s.at(root + ".patch_embed.proj.bias");
  w.pos_table = s.at(root + ".pos_embed.weight");
  for (int b = 0; b < c.depth; ++b) {
    const std::string p = root + ".blocks." + std::to_string(b);
    VisionBlockWeights bw;
    bw.norm1_w = s.at(p + ".norm1.weight");
    bw.norm1_b = s.at(p + ".norm1.bias");
    bw.norm2_w = s.at(p + ".norm2.weight");
    bw.norm2_b = s.at(p + ".norm2.bias");
    const Tensor& qkv_w = s.at(p + ".attn.qkv.weight");
    const Tensor& qkv_b = s.at(p + ".attn.qkv.bias");
    // Rows q|k|v, each this store's share of the heads (all of them in a whole store).
    const int64_t d = qkv_w.size(0) / 3;
    bw.attn.wq = qkv_w.narrow(0, 0, d);
    bw.attn.wk = qkv_w.narrow(0, d, d);
    bw.attn.wv = qkv_w.narrow(0, 2 * d, d);
    bw.attn.bq = qkv_b.narrow(0, 0, d);
    bw.attn.bk = qkv_b.narrow(0, d, d);
    bw.attn.bv = qkv_b.narrow(0, 2 * d, d);
    bw.attn.wo = s.at(p + ".attn.proj.weight");
    bw.attn.bo = s.at(p + ".attn.proj.bias");
    bw.fc1_w = s.at(p + ".mlp.linear_fc1.weight");
    bw.fc1_b = s.at(p + ".mlp.linear_fc1.bias");
    bw.fc2_w = s.at(p + ".mlp.linear_fc2.weight");
    bw.fc2_b = s.at(p + ".mlp.linear_fc2.bias");
    w.blocks.push_back(bw);
  }
  w.merger = merger_weights(s, root + ".merger");
  for (size_t k = 0; k < c.deepstack_visual_indexes.size(); ++k)
    w.deepstack.push_back(merger_weights(s, root + ".deepstack_merger_list." + std::to_string(k)));
  return w;
}

VisionTowerState::VisionTowerState(const VisionConfig& config)
    : blocks(config.depth), taps(config.deepstack_visual_indexes.size()),
      deepstack(config.deepstack_visual_indexes.size()), tap_merger(tap_mergers(config)) {}

size_t vision_tower_activation_bytes(const VisionConfig& c, const VisionShape& s, DType dt) {
  const int64_t p = s.patches, d = c.hidden_size, inter = c.intermediate_size, m = p / c.merge_unit();
  size_t total = 2 * arena_bytes(p * c.head_dim(), dt) + arena_bytes(p * d, dt);
  ArenaSizer block;
  VisionBlockSaved unused;
  block_tensors(p, d, inter, dt, block, unused);
  total += static_cast<size_t>(c.depth) * (block.bytes() + attention_block_saved_bytes(attention_config(c), p, dt));
  const size_t out = arena_bytes(m * c.out_hidden_size, dt);
  total += patch_merger_saved_bytes(merger_config(c, false), p, dt) + out;
  total += c.deepstack_visual_indexes.size() * (patch_merger_saved_bytes(merger_config(c, true), p, dt) + out);
  // Transients on top of the activation arena: the position embedding before it is added, and the
  // mergers' GELU buffer.
  total += std::max({arena_bytes(p * d, dt), patch_merger_scratch_bytes(merger_config(c, false), p, dt),
                     patch_merger_scratch_bytes(merger_config(c, true), p, dt)});
  return total;
}

size_t vision_tower_scratch_bytes(const VisionConfig& c, const VisionShape& s, DType dt) {
  const int64_t p = s.patches, d = c.hidden_size, inter = c.intermediate_size;
  // dx, d_mid, d_ln [P, D] and d_act [P, I], then the largest sub-layer scratch.
  const size_t sub = std::max({attention_block_scratch_bytes(attention_config(c), p, dt),
                               patch_merger_scratch_bytes(merger_config(c, false), p, dt),
                               patch_merger_scratch_bytes(merger_config(c, true), p, dt)});
  ArenaSizer own;
  backward_tensors(p, d, inter, dt, own);
  return own.bytes() + sub;
}

void vision_tower_forward(const VisionConfig& c, const VisionTowerWeights& w, const Tensor& image_pixels,
                          const Tensor& video_pixels, const VisionPlan& plan, Arena& acts,
                          VisionTowerState& st, const VisionBlockCalls& calls, TensorParallel* tp) {
  const char* L = "vision_tower_forward";
  const int parts = tp_parts(L, c, tp);
  const DType dt = w.patch_w.dtype();
  require(L, "plan.pos_idx", plan.pos_idx, DType::i64, {-1, 4});
  const int64_t patches = plan.pos_idx.size(0);
  require(L, "plan.pos_weight", plan.pos_weight, dt, {patches, 4});
  const int64_t features = c.patch_features();
  int64_t given = 0;
  for (const Tensor* px : {&image_pixels, &video_pixels}) {
    if (!px->defined()) continue;
    require(L, px == &image_pixels ? "pixel_values" : "pixel_values_videos", *px, dt, {-1, features});
    given += px->size(0);
  }
  Q3VL_CHECK(given == patches, L, ": the pixel tensors have ", given, " patch rows but the grids need ", patches);
  Q3VL_CHECK(static_cast<int64_t>(st.blocks.size()) == c.depth, L, ": state was made for another config");
  const int64_t d = c.hidden_size, hd = c.head_dim(), inter = c.intermediate_size / parts;
  const int64_t tokens = patches / c.merge_unit();

  st.pixel_parts[0] = image_pixels;
  st.pixel_parts[1] = video_pixels;
  st.plan = plan;
  st.cos = Tensor::empty(acts, {patches, hd}, dt);
  st.sin = Tensor::empty(acts, {patches, hd}, dt);
  vision_rope_cos_sin(plan.rotary_rows, plan.rotary_cols, hd, c.rope_theta, st.cos, st.sin);

  // Patch embedding (per pixel tensor into its rows) plus the resampled position embedding.
  Tensor x = Tensor::empty(acts, {patches, d}, dt);
  int64_t row = 0;
  for (const Tensor* px : {&image_pixels, &video_pixels}) {
    if (!px->defined() || px->size(0) == 0) continue;
    patch_embed_forward(patch_geometry(c), *px, w.patch_w, w.patch_b, x.narrow(0, row, px->size(0)));
    row += px->size(0);
  }
  {
    const size_t mark = acts.mark();
    const Tensor pos = Tensor::empty(acts, {patches, d}, dt);
    vision_pos_embed_forward(w.pos_table, plan.pos_idx, plan.pos_weight, pos);
    add_into(x, pos);
    acts.release(mark);
  }

  // Row-parallel projections add their bias on tp rank 0 only: the sum over ranks counts it once.
  const bool adds_bias = tp == nullptr || tp->rank() == 0;
  AttentionConfig acfg = attention_config(c, parts);
  acfg.o_bias = adds_bias;
  size_t tap = 0;
  for (int b = 0; b < c.depth; ++b) {
    if (calls.before) calls.before(b);
    VisionBlockSaved& s = st.blocks[b];
    const VisionBlockWeights& bw = w.blocks[b];
    s.x_in = x;
    block_tensors(patches, d, inter, dt, ArenaCarver(acts), s);
    layernorm_forward(x, bw.norm1_w, bw.norm1_b, c.layer_norm_eps, s.ln1, s.mean1, s.rstd1);
    AttentionWeights attn_w = bw.attn;
    if (!adds_bias) attn_w.bo = Tensor{};
    s.attn = attention_block_forward(acfg, attn_w, s.ln1, st.cos, st.sin, plan.cu_seqlens, acts, s.x_mid);
    tp_all_reduce(tp, s.x_mid);
    add_into(s.x_mid, x);
    layernorm_forward(s.x_mid, bw.norm2_w, bw.norm2_b, c.layer_norm_eps, s.ln2, s.mean2, s.rstd2);
    linear_forward(s.ln2, bw.fc1_w, bw.fc1_b, s.fc1_out);
    gelu_forward(Gelu::tanh, s.fc1_out, s.act);
    linear_forward(s.act, bw.fc2_w, adds_bias ? bw.fc2_b : Tensor{}, s.x_out);
    tp_all_reduce(tp, s.x_out);
    add_into(s.x_out, s.x_mid);
    if (calls.after) calls.after(b);
    x = s.x_out;
    if (tap < st.tap_merger.size() && c.deepstack_visual_indexes[st.tap_merger[tap]] == b) {
      const int k = st.tap_merger[tap];
      st.deepstack[tap] = Tensor::empty(acts, {tokens, c.out_hidden_size}, dt);
      st.taps[tap] = patch_merger_forward(merger_config(c, true), w.deepstack[k], x, st.deepstack[tap], acts, tp);
      ++tap;
    }
  }
  st.embeds = Tensor::empty(acts, {tokens, c.out_hidden_size}, dt);
  st.merger = patch_merger_forward(merger_config(c, false), w.merger, x, st.embeds, acts, tp);
}

void vision_tower_backward(const VisionConfig& c, const VisionTowerWeights& w, const VisionTowerState& st,
                           const Tensor& d_embeds, std::span<const Tensor> d_deepstack,
                           const VisionTowerWeights& grads, Arena& scratch, const VisionBlockCalls& calls,
                           TensorParallel* tp) {
  const char* L = "vision_tower_backward";
  const int parts = tp_parts(L, c, tp);
  const DType dt = w.patch_w.dtype();
  const int64_t patches = st.plan.pos_idx.size(0), d = c.hidden_size, inter = c.intermediate_size / parts;
  require(L, "d_embeds", d_embeds, dt, {st.embeds.size(0), c.out_hidden_size});
  Q3VL_CHECK(d_deepstack.size() == st.tap_merger.size(), L, ": ", d_deepstack.size(),
             " DeepStack gradients for ", st.tap_merger.size(), " taps");
  for (size_t k = 0; k < d_deepstack.size(); ++k)
    require(L, "d_deepstack", d_deepstack[k], dt, {st.embeds.size(0), c.out_hidden_size});

  const size_t mark = scratch.mark();
  const BackwardScratch t = backward_tensors(patches, d, inter, dt, ArenaCarver(scratch));
  const Tensor &dx = t.dx, &d_mid = t.d_mid, &d_ln = t.d_ln, &d_act = t.d_act;
  const Tensor& x_last = st.blocks[c.depth - 1].x_out;
  patch_merger_backward(merger_config(c, false), w.merger, x_last, st.merger, d_embeds, dx, grads.merger, scratch,
                        tp);

  // Every rank accumulates the gradient of attn.proj's bias (replicated), whichever rank added it.
  const AttentionConfig acfg = attention_config(c, parts);
  int tap = static_cast<int>(st.tap_merger.size()) - 1;
  for (int b = c.depth - 1; b >= 0; --b) {
    if (calls.before) calls.before(b);
    const VisionBlockSaved& s = st.blocks[b];
    const VisionBlockWeights& bw = w.blocks[b];
    const VisionBlockWeights& bg = grads.blocks[b];
    if (tap >= 0 && c.deepstack_visual_indexes[st.tap_merger[tap]] == b) {
      const int k = st.tap_merger[tap];
      patch_merger_backward(merger_config(c, true), w.deepstack[k], s.x_out, st.taps[tap], d_deepstack[tap], d_ln,
                            grads.deepstack[k], scratch, tp);
      add_into(dx, d_ln);
      --tap;
    }
    // x_out = x_mid + fc2(gelu(fc1(ln2(x_mid)))): dx is d x_out.
    linear_backward(s.act, bw.fc2_w, dx, d_act, bg.fc2_w, bg.fc2_b);
    gelu_backward(Gelu::tanh, s.fc1_out, d_act, d_act);
    linear_backward(s.ln2, bw.fc1_w, d_act, d_ln, bg.fc1_w, bg.fc1_b);
    tp_all_reduce(tp, d_ln);  // column-parallel fc1: partial input gradient
    layernorm_backward(s.x_mid, bw.norm2_w, s.mean2, s.rstd2, d_ln, d_mid, bg.norm2_w, bg.norm2_b);
    add_into(d_mid, dx);
    // x_mid = x_in + attn(ln1(x_in)).
    attention_block_backward(acfg, bw.attn, s.ln1, st.cos, st.sin, st.plan.cu_seqlens, s.attn, d_mid, d_ln, bg.attn,
                             scratch);
    tp_all_reduce(tp, d_ln);  // column-parallel qkv: partial input gradient
    layernorm_backward(s.x_in, bw.norm1_w, s.mean1, s.rstd1, d_ln, dx, bg.norm1_w, bg.norm1_b);
    add_into(dx, d_mid);
    if (calls.after) calls.after(b);
  }
  vision_pos_embed_backward(st.plan.pos_idx, st.plan.pos_weight, dx, grads.pos_table);
  int64_t row = 0;
  for (const Tensor& px : st.pixel_parts) {
    if (!px.defined() || px.size(0) == 0) continue;
    patch_embed_backward(patch_geometry(c), px, w.patch_w, dx.narrow(0, row, px.size(0)), Tensor{}, grads.patch_w,
                         grads.patch_b);
    row += px.size(0);
  }
  scratch.release(mark);
}

}  // namespace q3vl
