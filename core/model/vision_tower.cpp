// Vision tower forward/backward composed from the patch-embed, position, attention-block, LayerNorm,
// Linear, GELU and patch-merger layers, whole or tensor-parallel.
#include "core/model/vision_tower.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>

#include "core/arena_layout.h"
#include "core/checked_math.h"
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

int64_t check_grid(const char* L, const VisionConfig& c, const Tensor& grid) {
  require(L, "grid", grid, DType::i64, {-1, 3});
  const int64_t* g = grid.data<int64_t>();
  int64_t patches = 0;
  for (int64_t i = 0; i < grid.size(0); ++i) {
    Q3VL_CHECK(g[3 * i] > 0 && g[3 * i + 1] > 0 && g[3 * i + 2] > 0 && g[3 * i + 1] % c.spatial_merge_size == 0 &&
                   g[3 * i + 2] % c.spatial_merge_size == 0,
               L, ": grid[", i, "] = (", g[3 * i], ", ", g[3 * i + 1], ", ", g[3 * i + 2],
               ") must be positive with h and w multiples of spatial_merge_size ", c.spatial_merge_size);
    const std::optional<int64_t> item = checked_product({g[3 * i], g[3 * i + 1], g[3 * i + 2]});
    const std::optional<int64_t> sum = item ? checked_sum(patches, *item) : std::nullopt;
    Q3VL_CHECK(sum, L, ": grid[", i, "] = (", g[3 * i], ", ", g[3 * i + 1], ", ", g[3 * i + 2],
               "): the patch count t*h*w (summed over items) overflows int64");
    patches = *sum;
  }
  return patches;
}

// Calls f(p, row, col) for every patch p in pixel-row order: per item, per t, merge blocks row-major,
// patches row-major inside a block.
template <class F>
void for_each_patch(const Tensor& grid, int64_t merge, F&& f) {
  const int64_t* g = grid.data<int64_t>();
  int64_t p = 0;
  for (int64_t i = 0; i < grid.size(0); ++i) {
    const int64_t t = g[3 * i], h = g[3 * i + 1], w = g[3 * i + 2];
    for (int64_t tt = 0; tt < t; ++tt)
      for (int64_t br = 0; br < h / merge; ++br)
        for (int64_t bc = 0; bc < w / merge; ++bc)
          for (int64_t ir = 0; ir < merge; ++ir)
            for (int64_t ic = 0; ic < merge; ++ic) f(p++, br * merge + ir, bc * merge + ic, h, w);
  }
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

void vision_position_plan(const Tensor& grid, int64_t grid_side, int64_t merge, const Tensor& idx,
                          const Tensor& weight) {
  const char* L = "vision_position_plan";
  require(L, "grid", grid, DType::i64, {-1, 3});
  int64_t patches = 0;
  for (int64_t i = 0; i < grid.size(0); ++i)
    patches += grid.data<int64_t>()[3 * i] * grid.data<int64_t>()[3 * i + 1] * grid.data<int64_t>()[3 * i + 2];
  require(L, "idx", idx, DType::i64, {patches, 4});
  require(L, "weight", weight, weight.dtype(), {patches, 4});
  Q3VL_CHECK(grid_side >= 1, L, ": grid_side must be positive, got ", grid_side);
  int64_t* ip = idx.data<int64_t>();
  // One axis: the two taps and their fp32 weights, as HF's _interpolation_axis_taps_weights.
  struct Axis {
    int64_t lo, hi;
    float w_lo, w_hi;
  };
  auto axis = [&](int64_t index, int64_t size) {
    const float src = static_cast<float>(index) * static_cast<float>(grid_side - 1) /
                      static_cast<float>(std::max<int64_t>(size - 1, 1));
    const float fl = std::floor(src);
    const float d0 = src - fl;          // |src - floor - 0|
    const float d1 = std::fabs(d0 - 1.0f);  // |src - floor - 1|
    const auto lo = static_cast<int64_t>(fl);
    return Axis{std::min(lo, grid_side - 1), std::min(lo + 1, grid_side - 1), std::max(1.0f - d0, 0.0f),
                std::max(1.0f - d1, 0.0f)};
  };
  dispatch_float(L, weight.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* wp = weight.data<T>();
    for_each_patch(grid, merge, [&](int64_t p, int64_t row, int64_t col, int64_t h, int64_t w) {
      const Axis a = axis(row, h), b = axis(col, w);
      ip[4 * p + 0] = a.lo * grid_side + b.lo;
      ip[4 * p + 1] = a.lo * grid_side + b.hi;
      ip[4 * p + 2] = a.hi * grid_side + b.lo;
      ip[4 * p + 3] = a.hi * grid_side + b.hi;
      wp[4 * p + 0] = static_cast<T>(a.w_lo * b.w_lo);
      wp[4 * p + 1] = static_cast<T>(a.w_lo * b.w_hi);
      wp[4 * p + 2] = static_cast<T>(a.w_hi * b.w_lo);
      wp[4 * p + 3] = static_cast<T>(a.w_hi * b.w_hi);
    });
  });
}

void vision_rotary_coordinates(const Tensor& grid, int64_t merge, const Tensor& rows, const Tensor& cols) {
  const char* L = "vision_rotary_coordinates";
  require(L, "grid", grid, DType::i64, {-1, 3});
  require(L, "rows", rows, DType::i64, {-1});
  require(L, "cols", cols, DType::i64, {rows.size(0)});
  int64_t patches = 0;
  for (int64_t i = 0; i < grid.size(0); ++i)
    patches += grid.data<int64_t>()[3 * i] * grid.data<int64_t>()[3 * i + 1] * grid.data<int64_t>()[3 * i + 2];
  Q3VL_CHECK(patches == rows.size(0), L, ": grid has ", patches, " patches, rows has ", rows.size(0));
  int64_t *rp = rows.data<int64_t>(), *cp = cols.data<int64_t>();
  for_each_patch(grid, merge, [&](int64_t p, int64_t row, int64_t col, int64_t, int64_t) {
    rp[p] = row;
    cp[p] = col;
  });
}

size_t vision_tower_activation_bytes(const VisionConfig& c, const VisionShape& s, DType dt) {
  const int64_t p = s.patches, d = c.hidden_size, inter = c.intermediate_size, m = p / c.merge_unit();
  size_t total = arena_bytes(3 * s.items, DType::i64) + arena_bytes(s.frames + 1, DType::i64) +
                 arena_bytes(4 * p, DType::i64) + arena_bytes(4 * p, dt) + 2 * arena_bytes(p * c.head_dim(), dt) +
                 arena_bytes(p * d, dt);
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
  const size_t forward = 2 * arena_bytes(p, DType::i64);
  // Backward: dx, d_mid, d_ln [P, D] and d_act [P, I], then the largest sub-layer scratch.
  const size_t sub = std::max({attention_block_scratch_bytes(attention_config(c), p, dt),
                               patch_merger_scratch_bytes(merger_config(c, false), p, dt),
                               patch_merger_scratch_bytes(merger_config(c, true), p, dt)});
  ArenaSizer own;
  backward_tensors(p, d, inter, dt, own);
  const size_t backward = own.bytes() + sub;
  return std::max(forward, backward);
}

void vision_tower_forward(const VisionConfig& c, const VisionTowerWeights& w, const Tensor& image_pixels,
                          const Tensor& video_pixels, const Tensor& grid, Arena& acts, Arena& scratch,
                          VisionTowerState& st, const VisionBlockCalls& calls, TensorParallel* tp) {
  const char* L = "vision_tower_forward";
  const int parts = tp_parts(L, c, tp);
  const int64_t patches = check_grid(L, c, grid);
  const DType dt = w.patch_w.dtype();
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
  const int64_t items = grid.size(0), tokens = patches / c.merge_unit();

  st.pixel_parts[0] = image_pixels;
  st.pixel_parts[1] = video_pixels;
  st.grid = Tensor::empty(acts, {items, 3}, DType::i64);
  copy(st.grid, grid);
  int64_t frames = 0;
  for (int64_t i = 0; i < items; ++i) frames += grid.data<int64_t>()[3 * i];
  st.cu_seqlens = Tensor::empty(acts, {frames + 1}, DType::i64);
  {
    int64_t* cu = st.cu_seqlens.data<int64_t>();
    const int64_t* g = grid.data<int64_t>();
    int64_t f = 0;
    cu[0] = 0;
    for (int64_t i = 0; i < items; ++i)
      for (int64_t t = 0; t < g[3 * i]; ++t, ++f) cu[f + 1] = cu[f] + g[3 * i + 1] * g[3 * i + 2];
  }
  st.pos_idx = Tensor::empty(acts, {patches, 4}, DType::i64);
  st.pos_weight = Tensor::empty(acts, {patches, 4}, dt);
  vision_position_plan(grid, c.num_grid_per_side(), c.spatial_merge_size, st.pos_idx, st.pos_weight);
  st.cos = Tensor::empty(acts, {patches, hd}, dt);
  st.sin = Tensor::empty(acts, {patches, hd}, dt);
  {
    const size_t mark = scratch.mark();
    const Tensor rows = Tensor::empty(scratch, {patches}, DType::i64);
    const Tensor cols = Tensor::empty(scratch, {patches}, DType::i64);
    vision_rotary_coordinates(grid, c.spatial_merge_size, rows, cols);
    vision_rope_cos_sin(rows, cols, hd, c.rope_theta, st.cos, st.sin);
    scratch.release(mark);
  }

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
    vision_pos_embed_forward(w.pos_table, st.pos_idx, st.pos_weight, pos);
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
    s.attn = attention_block_forward(acfg, attn_w, s.ln1, st.cos, st.sin, st.cu_seqlens, acts, s.x_mid);
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
  const int64_t patches = st.pos_idx.size(0), d = c.hidden_size, inter = c.intermediate_size / parts;
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
    attention_block_backward(acfg, bw.attn, s.ln1, st.cos, st.sin, st.cu_seqlens, s.attn, d_mid, d_ln, bg.attn,
                             scratch);
    tp_all_reduce(tp, d_ln);  // column-parallel qkv: partial input gradient
    layernorm_backward(s.x_in, bw.norm1_w, s.mean1, s.rstd1, d_ln, dx, bg.norm1_w, bg.norm1_b);
    add_into(dx, d_mid);
    if (calls.after) calls.after(b);
  }
  vision_pos_embed_backward(st.pos_idx, st.pos_weight, dx, grads.pos_table);
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
