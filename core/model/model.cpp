// Model: the vision tower, the merge of visual features into the token sequence, the text decoder, the
// losses, and their backward, over a Workspace sized up front.
#include "core/model/model.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <span>

#include "core/arena_layout.h"
#include "core/checked_math.h"
#include "core/layer_checks.h"
#include "core/layers/cross_entropy.h"
#include "core/layers/embedding.h"
#include "core/layers/linear.h"
#include "core/layers/norms.h"
#include "core/layers/rotary.h"
#include "core/layers/vocab_parallel.h"
#include "core/model/rope_index.h"
#include "core/model/row_ops.h"

namespace q3vl {

namespace {

constexpr const char* kForward = "Model::forward";

// The aux loss's d / d probs: [E] (pooled) or [MoE layers, E] (per-layer), sized for the larger.
size_t aux_dprob_bytes(const ModelConfig& c, DType dtype) {
  return arena_bytes(std::max(c.num_moe_layers(), 1) * static_cast<int64_t>(std::max(c.text.num_experts, 1)), dtype);
}

// Merged tokens and frames of the items of one grid tensor (undefined: none).
struct GridTotals {
  int64_t items = 0, patches = 0, frames = 0;
};
GridTotals grid_totals(const char* what, const Tensor& grid) {
  GridTotals t;
  if (!grid.defined()) return t;
  require(kForward, what, grid, DType::i64, {-1, 3});
  const int64_t* g = grid.data<int64_t>();
  t.items = grid.size(0);
  for (int64_t i = 0; i < t.items; ++i) {
    Q3VL_CHECK(g[3 * i] > 0 && g[3 * i + 1] > 0 && g[3 * i + 2] > 0, kForward, ": ", what, "[", i, "] = (", g[3 * i],
               ", ", g[3 * i + 1], ", ", g[3 * i + 2], ") must be positive");
    const std::optional<int64_t> patches = checked_product({g[3 * i], g[3 * i + 1], g[3 * i + 2]});
    const std::optional<int64_t> sum = patches ? checked_sum(t.patches, *patches) : std::nullopt;
    Q3VL_CHECK(sum, kForward, ": ", what, "[", i, "] = (", g[3 * i], ", ", g[3 * i + 1], ", ", g[3 * i + 2],
               "): the patch count t*h*w (summed over items) overflows int64");
    t.patches = *sum;
    t.frames += g[3 * i];
  }
  return t;
}

void check_pixels(const ModelConfig& c, const char* pixels_name, const Tensor& pixels, const char* grid_name,
                  const Tensor& grid, DType dt) {
  Q3VL_CHECK(pixels.defined() == grid.defined(), kForward, ": ", pixels_name, " and ", grid_name,
             " must be given together");
  if (!pixels.defined()) return;
  const GridTotals t = grid_totals(grid_name, grid);
  require(kForward, pixels_name, pixels, dt, {t.patches, c.vision.patch_features()});
}

}  // namespace

BatchShape BatchShape::of(const Batch& b) {
  require("BatchShape::of", "input_ids", b.input_ids, DType::i64, {-1, -1});
  BatchShape s;
  s.batch = b.input_ids.size(0);
  s.seq = b.input_ids.size(1);
  const GridTotals img = grid_totals("image_grid_thw", b.image_grid_thw);
  const GridTotals vid = grid_totals("video_grid_thw", b.video_grid_thw);
  s.image_patches = img.patches;
  s.video_patches = vid.patches;
  s.items = img.items + vid.items;
  s.frames = img.frames + vid.frames;
  return s;
}

size_t Workspace::activation_bytes(const ModelConfig& c, const BatchShape& s, DType dt, bool expert_parallel) {
  const int64_t n = s.tokens(), h = c.text.hidden_size, visual = s.patches() / c.vision.merge_unit();
  // Layout: ids copy, targets, valid, cu_seqlens, doc_real, cos, sin, visual positions.
  size_t total = 2 * arena_bytes(n, DType::i64) + arena_bytes(n, DType::u8) + arena_bytes(n + 1, DType::i64) +
                 arena_bytes(n, DType::i64) + 2 * arena_bytes(n * c.text.head_dim, dt) + arena_bytes(visual, DType::i64);
  if (s.patches() > 0) {
    total += arena_bytes(3 * s.items, DType::i64);
    total += vision_tower_activation_bytes(c.vision, {s.patches(), s.items, s.frames}, dt);
  }
  total += arena_bytes(n * h, dt);
  size_t transient = 0;
  for (int l = 0; l < c.text.num_hidden_layers; ++l) {
    const size_t t = decoder_layer_transient_bytes(c, l, n, dt, expert_parallel);
    total += decoder_layer_activation_bytes(c, l, n, dt, expert_parallel) - t;
    transient = std::max(transient, t);
  }
  total += transient;
  total += arena_bytes(n * h, dt) + 2 * arena_bytes(n, dt) + arena_bytes(n * c.text.vocab_size, dt) + aux_dprob_bytes(c, dt);
  return total;
}

size_t Workspace::scratch_bytes(const ModelConfig& c, const BatchShape& s, DType dt, bool expert_parallel) {
  const int64_t n = s.tokens(), h = c.text.hidden_size, visual = s.patches() / c.vision.merge_unit();
  const size_t visual_grads =
      (1 + c.vision.deepstack_visual_indexes.size()) * arena_bytes(visual * c.vision.out_hidden_size, dt);
  size_t layer = 0;
  for (int l = 0; l < c.text.num_hidden_layers; ++l)
    layer = std::max(layer, decoder_layer_scratch_bytes(c, l, n, s.seq, dt, expert_parallel));
  const size_t text = 2 * arena_bytes(n * h, dt) + aux_dprob_bytes(c, dt) + layer;
  const size_t vision =
      s.patches() > 0 ? vision_tower_scratch_bytes(c.vision, {s.patches(), s.items, s.frames}, dt) : 0;
  // The forward borrows the position ids [3, N] before anything else.
  return std::max(arena_bytes(3 * n, DType::i64), visual_grads + std::max(text, vision));
}

Workspace::Workspace(const Model& model, const BatchShape& capacity)
    : capacity_(capacity),
      acts_("activations", activation_bytes(model.config(), capacity, model.dtype(), model.expert_parallel())),
      scratch_("scratch", scratch_bytes(model.config(), capacity, model.dtype(), model.expert_parallel())),
      vision(model.config().vision),
      layers(model.config().text.num_hidden_layers),
      d_deepstack(model.config().vision.deepstack_visual_indexes.size()),
      moe_stats(model.config().num_moe_layers()) {}

std::vector<size_t> Workspace::expert_parallel_bytes() const {
  std::vector<size_t> out;
  for (const DecoderLayerSaved& l : layers) out.push_back(moe_expert_parallel_bytes(l.moe));
  return out;
}

Model::Model(const ModelConfig& config, DType dtype, const TpLayout& tp)
    : config_(config), weights_(config, dtype, "weights", tp), grads_(config, dtype, "gradients", tp) {
  config_.validate();
  vision_w_ = vision_tower_weights(config_.vision, weights_);
  vision_g_ = vision_tower_weights(config_.vision, grads_);
  text_w_ = text_weights(config_, weights_);
  text_g_ = text_weights(config_, grads_);
  unit_ids_ = unit_ids(weights_.units());
  // Both stores start zero-filled (fresh anonymous pages).
}

void Model::enable_router_bias() {
  const int64_t layers = config_.num_moe_layers(), experts = config_.text.num_experts;
  Q3VL_CHECK(layers > 0, "Model::enable_router_bias: the model has no MoE layers");
  if (router_bias_.defined()) return;
  router_bias_storage_.assign(static_cast<size_t>(layers * experts), 0.0f);
  router_bias_ = Tensor(router_bias_storage_.data(), DType::f32, {layers, experts});
  int64_t moe_layer = 0;
  for (DecoderLayerWeights& l : text_w_.layers) {
    if (l.moe) l.experts.score_bias = router_bias_.narrow(0, moe_layer++, 1).view({experts});
  }
}

void Model::set_tensor_parallel(TensorParallel* tp) {
  const TpLayout& l = tp_layout();
  if (tp != nullptr)
    Q3VL_CHECK(tp->size() == l.size && tp->rank() == l.rank, "Model: tensor-parallel group (rank ", tp->rank(), " of ",
               tp->size(), ") does not match the model's layout (rank ", l.rank, " of ", l.size, ")");
  else
    Q3VL_CHECK(l.size == 1, "Model: a model split over ", l.size, " tensor-parallel ranks needs their group");
  tp_ = tp;
}

void Model::init_weights(uint64_t seed) { weights_.init(seed, config_.text.initializer_range); }

ForwardResult Model::forward(const Batch& batch, Workspace& ws, const ForwardOptions& options) const {
  const ModelConfig& c = config_;
  const DType dt = dtype();
  // ---- Checks of the whole batch before any computation ----
  require(kForward, "input_ids", batch.input_ids, DType::i64, {-1, -1});
  const int64_t B = batch.input_ids.size(0), S = batch.input_ids.size(1), n = B * S;
  Q3VL_CHECK(B > 0 && S > 0, kForward, ": input_ids is empty ", batch.input_ids.str());
  if (batch.attention_mask.defined()) require(kForward, "attention_mask", batch.attention_mask, DType::i64, {B, S});
  if (batch.labels.defined()) require(kForward, "labels", batch.labels, DType::i64, {B, S});
  check_pixels(c, "pixel_values", batch.pixel_values, "image_grid_thw", batch.image_grid_thw, dt);
  check_pixels(c, "pixel_values_videos", batch.pixel_values_videos, "video_grid_thw", batch.video_grid_thw, dt);
  const BatchShape shape = BatchShape::of(batch);
  const BatchShape& cap = ws.capacity_;
  Q3VL_CHECK(shape.tokens() <= cap.tokens() && shape.seq <= cap.seq && shape.image_patches <= cap.image_patches &&
                 shape.video_patches <= cap.video_patches && shape.patches() <= cap.patches() &&
                 shape.items <= cap.items && shape.frames <= cap.frames,
             kForward, ": the batch (", B, "x", S, " tokens, ", shape.image_patches, "+", shape.video_patches,
             " patches, ", shape.items, " items, ", shape.frames, " frames) exceeds the workspace (", cap.batch, "x",
             cap.seq, ", ", cap.image_patches, "+", cap.video_patches, ", ", cap.items, ", ", cap.frames, ")");
  const int64_t* ids = batch.input_ids.data<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    Q3VL_CHECK(ids[i] >= 0 && ids[i] < c.text.vocab_size, kForward, ": input_ids[", i / S, ", ", i % S, "] = ",
               ids[i], " outside the vocabulary of ", c.text.vocab_size);

  // Placeholder counts first, with HF's message, before anything else reads the spans.
  {
    int64_t image_tokens = 0, video_tokens = 0;
    for (int64_t i = 0; i < n; ++i) {
      image_tokens += ids[i] == c.image_token_id;
      video_tokens += ids[i] == c.video_token_id;
    }
    const int64_t merge_unit = c.vision.merge_unit();
    if (batch.pixel_values.defined())
      Q3VL_CHECK(image_tokens == shape.image_patches / merge_unit, kForward,
                 ": image features and image tokens do not match: ", image_tokens, " <|image_pad|> tokens (id ",
                 c.image_token_id, "), ", shape.image_patches / merge_unit, " features from ",
                 batch.image_grid_thw.size(0), " images");
    if (batch.pixel_values_videos.defined())
      Q3VL_CHECK(video_tokens == shape.video_patches / merge_unit, kForward,
                 ": video features and video tokens do not match: ", video_tokens, " <|video_pad|> tokens (id ",
                 c.video_token_id, "), ", shape.video_patches / merge_unit, " features from ",
                 batch.video_grid_thw.size(0), " videos");
  }

  ws.ready_ = false;
  Arena& acts = ws.acts_;
  Arena& scratch = ws.scratch_;
  acts.reset();
  scratch.reset();

  // ---- Token layout: documents, real-token mask, targets, positions ----
  TextContext& ctx = ws.ctx;
  int64_t docs = B;
  if (batch.cu_seqlens.defined()) {
    check_document_boundaries(batch.cu_seqlens, B, S);
    docs = batch.cu_seqlens.size(0) - 1;
  }
  ctx.cu_seqlens = Tensor::empty(acts, {docs + 1}, DType::i64);
  if (batch.cu_seqlens.defined()) {
    copy(ctx.cu_seqlens, batch.cu_seqlens);
  } else {
    for (int64_t b = 0; b <= B; ++b) ctx.cu_seqlens.data<int64_t>()[b] = b * S;
  }
  const int64_t* cu = ctx.cu_seqlens.data<int64_t>();
  ctx.valid = Tensor::empty(acts, {n}, DType::u8);
  ctx.doc_real = Tensor::empty(acts, {docs}, DType::i64);
  {
    uint8_t* valid = ctx.valid.data<uint8_t>();
    const int64_t* mask = nullptr;
    if (batch.attention_mask.defined()) {
      check_attention_mask(batch.attention_mask, ctx.cu_seqlens);
      mask = batch.attention_mask.data<int64_t>();
    }
    for (int64_t i = 0; i < n; ++i) valid[i] = mask ? static_cast<uint8_t>(mask[i]) : 1;
    for (int64_t d = 0; d < docs; ++d) {
      int64_t real = 0;
      for (int64_t i = cu[d]; i < cu[d + 1]; ++i) real += valid[i];
      ctx.doc_real.data<int64_t>()[d] = real;
    }
  }
  ws.ids = Tensor::empty(acts, {n}, DType::i64);
  copy(ws.ids, batch.input_ids.view({n}));
  ws.targets = Tensor::empty(acts, {n}, DType::i64);
  {
    int64_t* tg = ws.targets.data<int64_t>();
    const int64_t* lab = batch.labels.defined() ? batch.labels.data<int64_t>() : nullptr;
    const uint8_t* valid = ctx.valid.data<uint8_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (lab != nullptr) {
        Q3VL_CHECK(valid[i] || lab[i] == kIgnoreIndex, kForward, ": labels[", i / S, ", ", i % S, "] = ", lab[i],
                   " at a padding position; padding must be labelled -100");
        Q3VL_CHECK(lab[i] == kIgnoreIndex || (lab[i] >= 0 && lab[i] < c.text.vocab_size), kForward, ": labels[",
                   i / S, ", ", i % S, "] = ", lab[i], " is neither -100 nor inside the vocabulary");
      }
      tg[i] = (lab != nullptr && i + 1 < n) ? lab[i + 1] : kIgnoreIndex;
    }
    // A position predicts the next label of its own document: the last token of a row or packed document
    // has no target (its successor starts another sample).
    for (int64_t d = 0; d < docs; ++d) tg[cu[d + 1] - 1] = kIgnoreIndex;
  }
  {
    const size_t mark = scratch.mark();
    const Tensor positions = Tensor::empty(scratch, {3, n}, DType::i64);
    get_rope_index(c, batch.input_ids, batch.attention_mask,
                   batch.pixel_values.defined() ? batch.image_grid_thw : Tensor{},
                   batch.pixel_values_videos.defined() ? batch.video_grid_thw : Tensor{}, batch.cu_seqlens, positions);
    ctx.cos = Tensor::empty(acts, {n, c.text.head_dim}, dt);
    ctx.sin = Tensor::empty(acts, {n, c.text.head_dim}, dt);
    const auto& sec = c.text.mrope_section;
    mrope_cos_sin(positions, c.text.head_dim, c.text.rope_theta, {sec[0], sec[1], sec[2]}, ctx.cos, ctx.sin);
    scratch.release(mark);
  }

  ctx.expert_exchange = exchange_;
  ctx.tp = tp_;
  ctx.tp_experts_split = tp_layout().experts_split;
  const int64_t vocab_begin = tp_ ? tp_->rank() * (c.text.vocab_size / tp_->size()) : 0;

  // ---- Vision tower and the visual token rows ----
  ws.has_vision = batch.pixel_values.defined() || batch.pixel_values_videos.defined();
  const int64_t merge_unit = c.vision.merge_unit();
  const int64_t image_rows = shape.image_patches / merge_unit, video_rows = shape.video_patches / merge_unit;
  ws.vis_pos = Tensor::empty(acts, {image_rows + video_rows}, DType::i64);
  if (ws.has_vision) {
    int64_t* vp = ws.vis_pos.data<int64_t>();
    int64_t next_image = 0, next_video = image_rows;
    for (int64_t i = 0; i < n; ++i) {
      if (batch.pixel_values.defined() && ids[i] == c.image_token_id) vp[next_image++] = i;
      if (batch.pixel_values_videos.defined() && ids[i] == c.video_token_id) vp[next_video++] = i;
    }
    const Tensor grid = Tensor::empty(acts, {shape.items, 3}, DType::i64);
    const int64_t images = batch.pixel_values.defined() ? batch.image_grid_thw.size(0) : 0;
    if (images > 0) copy(grid.narrow(0, 0, images), batch.image_grid_thw);
    if (shape.items > images) copy(grid.narrow(0, images, shape.items - images), batch.video_grid_thw);
    // The mergers run at the DeepStack taps between blocks, so they stay gathered through the tower.
    acquire(unit_ids_.vision_embeddings);
    acquire(unit_ids_.vision_mergers);
    VisionBlockCalls calls;
    bool embeddings_held = true;
    calls.before = [&](int b) {
      if (embeddings_held) release(unit_ids_.vision_embeddings);
      embeddings_held = false;
      acquire(unit_ids_.vision_blocks[b]);
    };
    calls.after = [&](int b) { release(unit_ids_.vision_blocks[b]); };
    vision_tower_forward(c.vision, vision_w_, batch.pixel_values, batch.pixel_values_videos, grid, acts, scratch,
                         ws.vision, calls, tp_);
    if (embeddings_held) release(unit_ids_.vision_embeddings);
    release(unit_ids_.vision_mergers);
  } else if (hooks_ != nullptr) {
    // A sharded store gathers units collectively: a rank without images still takes part in the vision units'
    // gathers, in the same order as the ranks that run the tower.
    acquire(unit_ids_.vision_embeddings);
    acquire(unit_ids_.vision_mergers);
    release(unit_ids_.vision_embeddings);
    for (const int u : unit_ids_.vision_blocks) {
      acquire(u);
      release(u);
    }
    release(unit_ids_.vision_mergers);
  }

  // ---- Text decoder ----
  Tensor h = Tensor::empty(acts, {n, c.text.hidden_size}, dt);
  acquire(unit_ids_.token_embedding);
  if (tp_) vocab_parallel_embedding_forward(ws.ids, text_w_.embed, vocab_begin, h, *tp_);
  else embedding_forward(ws.ids, text_w_.embed, h);
  // A tied lm_head is the embedding table: it stays gathered until the logits.
  if (!c.tie_word_embeddings) release(unit_ids_.token_embedding);
  if (ws.has_vision) scatter_rows(h, ws.vis_pos, ws.vision.embeds);
  const size_t taps = ws.has_vision ? ws.vision.deepstack.size() : 0;
  size_t moe_layer = 0;
  for (int l = 0; l < c.text.num_hidden_layers; ++l) {
    DecoderLayerSaved& s = ws.layers[l];
    acquire(unit_ids_.text_layers[l]);
    decoder_layer_forward(c, l, text_w_.layers[l], ctx, h, acts, scratch, s);
    release(unit_ids_.text_layers[l]);
    h = s.h_out;
    if (static_cast<size_t>(l) < taps) scatter_add_rows(h, ws.vis_pos, ws.vision.deepstack[l]);
    if (text_w_.layers[l].moe) ws.moe_stats[moe_layer++] = s.stats;
  }
  ws.final_normed = Tensor::empty(acts, {n, c.text.hidden_size}, dt);
  ws.final_rstd = Tensor::empty(acts, {n}, dt);
  acquire(unit_ids_.head);
  rmsnorm_forward(h, text_w_.final_norm, c.text.rms_norm_eps, ws.final_normed, ws.final_rstd);
  ForwardResult r;
  r.logits = Tensor::empty(acts, {n, text_w_.lm_head.size(0)}, dt);
  linear_forward(ws.final_normed, text_w_.lm_head, Tensor{}, r.logits);
  release(unit_ids_.head);
  if (c.tie_word_embeddings) release(unit_ids_.token_embedding);
  ws.lse = Tensor::empty(acts, {n}, dt);
  if (batch.labels.defined()) {
    const CrossEntropySum ce = tp_ ? vocab_parallel_cross_entropy_forward(r.logits, ws.targets, vocab_begin, ws.lse, *tp_)
                                   : cross_entropy_forward(r.logits, ws.targets, ws.lse);
    r.ce_loss = ce.mean();
    r.ce_tokens = ce.count;
  }
  r.loss = r.ce_loss;
  ws.aux_dprob = Tensor{};
  if (!ws.moe_stats.empty()) {
    if (options.expert_stats_reducer) options.expert_stats_reducer(ws.moe_stats);
    const bool train_aux = options.aux_loss;
    const int64_t experts = c.text.num_experts, layers = static_cast<int64_t>(ws.moe_stats.size());
    if (options.aux_per_layer) {
      if (train_aux) ws.aux_dprob = Tensor::empty(acts, {layers, experts}, dt);
      r.aux_loss = moe_aux_loss_per_layer(experts, ws.moe_stats, c.text.router_aux_loss_coef, ws.aux_dprob);
    } else {
      if (train_aux) ws.aux_dprob = Tensor::empty(acts, {experts}, dt);
      r.aux_loss = moe_aux_loss(experts, ws.moe_stats, c.text.router_aux_loss_coef, ws.aux_dprob);
    }
    if (train_aux) r.loss += c.text.router_aux_loss_coef * r.aux_loss;
  }
  ws.result_ = r;
  ws.ready_ = true;
  return r;
}

void Model::backward(Workspace& ws, const BackwardOptions& options) {
  const char* L = "Model::backward";
  Q3VL_CHECK(ws.ready_, L, ": no forward to differentiate (run forward first; backward consumes it once)");
  ws.ready_ = false;
  const ModelConfig& c = config_;
  const DType dt = dtype();
  Arena& scratch = ws.scratch_;
  scratch.reset();
  const ForwardResult& r = ws.result_;
  const int64_t n = ws.ids.size(0), h = c.text.hidden_size;
  const int64_t visual = ws.vis_pos.size(0);
  const size_t taps = ws.has_vision ? ws.vision.deepstack.size() : 0;

  // Gradients of the visual features, filled during the text backward and consumed by the vision backward.
  Tensor d_embeds;
  std::vector<Tensor>& d_deepstack = ws.d_deepstack;
  if (ws.has_vision) {
    d_embeds = Tensor::empty(scratch, {visual, c.vision.out_hidden_size}, dt);
    for (size_t k = 0; k < taps; ++k) d_deepstack[k] = Tensor::empty(scratch, {visual, c.vision.out_hidden_size}, dt);
  }
  const size_t text_mark = scratch.mark();

  // Cross-entropy into the logits buffer, then lm_head and the final norm.
  const Tensor& dlogits = r.logits;
  if (r.ce_tokens > 0) {
    const int64_t normalizer = options.ce_normalizer > 0 ? options.ce_normalizer : r.ce_tokens;
    const double scale = options.loss_scale / static_cast<double>(normalizer);
    if (tp_) {
      const int64_t vocab_begin = tp_->rank() * (c.text.vocab_size / tp_->size());
      vocab_parallel_cross_entropy_backward(r.logits, ws.targets, ws.lse, vocab_begin, scale, dlogits);
    } else {
      cross_entropy_backward(r.logits, ws.targets, ws.lse, scale, dlogits);
    }
  } else {
    fill(dlogits, 0.0);
  }
  const Tensor d_normed = Tensor::empty(scratch, {n, h}, dt);
  const Tensor dh = Tensor::empty(scratch, {n, h}, dt);
  acquire(unit_ids_.head);
  if (c.tie_word_embeddings) acquire(unit_ids_.token_embedding);
  linear_backward(ws.final_normed, text_w_.lm_head, dlogits, d_normed, text_g_.lm_head, Tensor{});
  // The vocabulary-parallel lm_head gives each rank its columns' share of d final_normed.
  tp_all_reduce(tp_, d_normed);
  const Tensor& h_last = ws.layers[c.text.num_hidden_layers - 1].h_out;
  rmsnorm_backward(h_last, text_w_.final_norm, ws.final_rstd, d_normed, dh, text_g_.final_norm);
  gradients_ready(unit_ids_.head);
  release(unit_ids_.head);
  if (c.tie_word_embeddings) {
    gradients_ready(unit_ids_.token_embedding);
    release(unit_ids_.token_embedding);
  }

  // [E] shared by every MoE layer (pooled) or [MoE layers, E], a row per layer (per-layer aux loss).
  Tensor aux_dprob;
  if (ws.aux_dprob.defined()) {
    aux_dprob = Tensor::empty(scratch, ws.aux_dprob.shape(), dt);
    copy(aux_dprob, ws.aux_dprob);
    dispatch_float(L, dt, [&](auto tag) {
      using T = decltype(tag);
      T* p = aux_dprob.data<T>();
      // Split experts: every tp rank adds the aux term to its partial router gradient, so each adds 1 / tp.
      const double split = tp_ && tp_layout().experts_split ? 1.0 / tp_->size() : 1.0;
      const double scale = (options.aux_scale >= 0 ? options.aux_scale : options.loss_scale) * split;
      for (int64_t i = 0; i < aux_dprob.numel(); ++i) p[i] *= static_cast<T>(scale);
    });
  }
  const bool aux_per_layer = aux_dprob.defined() && aux_dprob.ndim() == 2;
  int64_t moe_layer = c.num_moe_layers();
  for (int l = c.text.num_hidden_layers - 1; l >= 0; --l) {
    if (static_cast<size_t>(l) < taps) gather_rows(d_deepstack[l], dh, ws.vis_pos);
    if (text_w_.layers[l].moe) --moe_layer;
    Tensor layer_aux = aux_dprob;
    if (aux_per_layer)
      layer_aux = text_w_.layers[l].moe ? aux_dprob.narrow(0, moe_layer, 1).view({c.text.num_experts}) : Tensor{};
    acquire(unit_ids_.text_layers[l]);
    decoder_layer_backward(c, l, text_w_.layers[l], ws.ctx, ws.layers[l], dh, layer_aux, text_g_.layers[l], scratch);
    gradients_ready(unit_ids_.text_layers[l]);
    release(unit_ids_.text_layers[l]);
  }
  if (ws.has_vision) {
    gather_rows(d_embeds, dh, ws.vis_pos);
    // The placeholder embeddings were replaced, so their table rows get no gradient from these positions.
    zero_rows(dh, ws.vis_pos);
  }
  if (c.text.pad_token_id >= 0) {
    // nn.Embedding(padding_idx = pad_token_id): the padding row of the table takes no gradient.
    const int64_t* id = ws.ids.data<int64_t>();
    dispatch_float(L, dt, [&](auto tag) {
      using T = decltype(tag);
      T* g = dh.data<T>();
      for (int64_t i = 0; i < n; ++i)
        if (id[i] == c.text.pad_token_id) std::fill(g + i * h, g + (i + 1) * h, T(0));
    });
  }
  // The embedding backward reads no weights, only the token ids.
  if (tp_) vocab_parallel_embedding_backward(ws.ids, dh, tp_->rank() * (c.text.vocab_size / tp_->size()), text_g_.embed);
  else embedding_backward(ws.ids, dh, text_g_.embed);
  gradients_ready(unit_ids_.token_embedding);
  scratch.release(text_mark);

  if (ws.has_vision) {
    acquire(unit_ids_.vision_mergers);
    VisionBlockCalls calls;
    calls.before = [&](int b) { acquire(unit_ids_.vision_blocks[b]); };
    calls.after = [&](int b) {
      gradients_ready(unit_ids_.vision_blocks[b]);
      release(unit_ids_.vision_blocks[b]);
    };
    // The patch embedding's and position table's gradients need no weights (the pixels take no gradient).
    vision_tower_backward(c.vision, vision_w_, ws.vision, d_embeds,
                          std::span<const Tensor>(d_deepstack.data(), taps), vision_g_, scratch, calls, tp_);
    gradients_ready(unit_ids_.vision_mergers);
    release(unit_ids_.vision_mergers);
    gradients_ready(unit_ids_.vision_embeddings);
  } else if (hooks_ != nullptr) {
    // The same collectives as the backward above, with zero gradients (see the forward).
    acquire(unit_ids_.vision_mergers);
    for (auto b = unit_ids_.vision_blocks.rbegin(); b != unit_ids_.vision_blocks.rend(); ++b) {
      acquire(*b);
      gradients_ready(*b);
      release(*b);
    }
    gradients_ready(unit_ids_.vision_mergers);
    release(unit_ids_.vision_mergers);
    gradients_ready(unit_ids_.vision_embeddings);
  }
  scratch.reset();
}

}  // namespace q3vl
