// Model: the vision tower, the merge of visual features into the token sequence, the text decoder, the
// losses, and their backward, over a Workspace sized up front.
#include "core/model/model.h"

#include <algorithm>
#include <cstring>
#include <span>

#include "core/arena_layout.h"
#include "core/layer_checks.h"
#include "core/layers/cross_entropy.h"
#include "core/layers/embedding.h"
#include "core/layers/linear.h"
#include "core/layers/norms.h"
#include "core/layers/rotary.h"
#include "core/layers/vocab_parallel.h"
#include "core/model/row_ops.h"

namespace q3vl {

namespace {

// The aux loss's d / d probs: [E] (pooled) or [MoE layers, E] (per-layer), sized for the larger.
size_t aux_dprob_bytes(const ModelConfig& c, DType dtype) {
  return arena_bytes(std::max(c.num_moe_layers(), 1) * static_cast<int64_t>(std::max(c.text.num_experts, 1)), dtype);
}

}  // namespace

size_t Workspace::activation_bytes(const ModelConfig& c, const BatchShape& s, DType dt, bool expert_parallel) {
  const int64_t n = s.tokens(), h = c.text.hidden_size;
  // The MRoPE cos and sin (the batch's metadata lives in its plan), the vision tower, the embeddings.
  size_t total = 2 * arena_bytes(n * c.text.head_dim, dt);
  if (s.patches() > 0) total += vision_tower_activation_bytes(c.vision, {s.patches(), s.items, s.frames}, dt);
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
  return visual_grads + std::max(text, vision);
}

Workspace::Workspace(const Model& model, const BatchShape& capacity, int64_t expert_group_tokens)
    : capacity_(capacity),
      expert_group_tokens_(std::max(expert_group_tokens, capacity.tokens())),
      acts_("activations", activation_bytes(model.config(), capacity, model.dtype(), model.expert_parallel())),
      scratch_("scratch", scratch_bytes(model.config(), capacity, model.dtype(), model.expert_parallel())),
      expert_rows_("expert-parallel rows", model.expert_rows_bytes(expert_group_tokens_)),
      vision(model.config().vision),
      layers(model.config().text.num_hidden_layers),
      d_deepstack(model.config().vision.deepstack_visual_indexes.size()),
      moe_stats(model.config().num_moe_layers()) {}


size_t Model::expert_rows_bytes(int64_t max_tokens) const {
  if (exchange_ == nullptr) return 0;
  MoeConfig m = text_moe_config(config_.text);
  m.exchange = exchange_;
  if (tp_ != nullptr && tp_layout().experts_split) m.expert_ffn /= tp_->size();
  return moe_expert_rows_bytes(m, max_tokens, config_.num_moe_layers());
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

ForwardResult Model::forward(const BatchPlan& plan, const Batch& batch, Workspace& ws,
                             const ForwardOptions& options) const {
  check_plan(plan, batch, ws);
  const ModelConfig& c = config_;
  ws.ready_ = false;
  ws.plan_ = &plan;
  ws.acts_.reset();
  ws.scratch_.reset();
  ws.expert_rows_.reset();
  ws.ids = batch.input_ids.view({plan.shape.tokens()});
  text_context(plan, ws);

  // The vision tower; its merged features replace the placeholder embeddings.
  vision_forward(plan, batch, ws);
  Tensor h = embed_tokens(plan, ws);

  // The decoder layers; DeepStack feature k is added to the visual rows after layer k.
  const size_t taps = plan.has_vision ? ws.vision.deepstack.size() : 0;
  size_t moe_layer = 0;
  for (int l = 0; l < c.text.num_hidden_layers; ++l) {
    DecoderLayerSaved& s = ws.layers[l];
    acquire(unit_ids_.text_layers[l]);
    decoder_layer_forward(c, l, text_w_.layers[l], ws.ctx, h, ws.acts_, ws.scratch_, s);
    release(unit_ids_.text_layers[l]);
    h = s.h_out;
    if (static_cast<size_t>(l) < taps) scatter_add_rows(h, plan.visual_rows, ws.vision.deepstack[l]);
    if (text_w_.layers[l].moe) ws.moe_stats[moe_layer++] = s.stats;
  }

  // Final norm, lm_head and cross-entropy, then the MoE load-balancing loss.
  ForwardResult r = head_forward(plan, h, ws);
  aux_loss_forward(options, ws, r);
  ws.result_ = r;
  ws.ready_ = true;
  return r;
}

void Model::check_plan(const BatchPlan& plan, const Batch& batch, const Workspace& ws) const {
  const char* L = "Model::forward";
  const BatchShape& shape = plan.shape;
  Q3VL_CHECK(plan.storage != nullptr, L, ": the plan is empty (make it with plan_batch)");
  Q3VL_CHECK(plan.dtype == dtype(), L, ": the plan was made for ", dtype_name(plan.dtype), ", the model is ",
             dtype_name(dtype()));
  const auto rows = [](const Tensor& t) { return t.defined() ? t.size(0) : 0; };
  Q3VL_CHECK(batch.input_ids.defined() && batch.input_ids.ndim() == 2 && batch.input_ids.size(0) == shape.batch &&
                 batch.input_ids.size(1) == shape.seq && rows(batch.pixel_values) == shape.image_patches &&
                 rows(batch.pixel_values_videos) == shape.video_patches,
             L, ": the plan (", shape.batch, "x", shape.seq, " tokens, ", shape.image_patches, "+",
             shape.video_patches, " patches) is not the plan of this batch");
  const BatchShape& cap = ws.capacity_;
  Q3VL_CHECK(shape.tokens() <= cap.tokens() && shape.seq <= cap.seq && shape.image_patches <= cap.image_patches &&
                 shape.video_patches <= cap.video_patches && shape.patches() <= cap.patches() &&
                 shape.items <= cap.items && shape.frames <= cap.frames,
             L, ": the batch (", shape.batch, "x", shape.seq, " tokens, ", shape.image_patches, "+",
             shape.video_patches, " patches, ", shape.items, " items, ", shape.frames,
             " frames) exceeds the workspace (", cap.batch, "x", cap.seq, ", ", cap.image_patches, "+",
             cap.video_patches, ", ", cap.items, ", ", cap.frames, ")");
}

int64_t Model::vocab_begin() const { return tp_ ? tp_->rank() * (config_.text.vocab_size / tp_->size()) : 0; }

void Model::text_context(const BatchPlan& plan, Workspace& ws) const {
  const ModelConfig& c = config_;
  const int64_t n = plan.shape.tokens();
  TextContext& ctx = ws.ctx;
  ctx.cu_seqlens = plan.cu_seqlens;
  ctx.valid = plan.valid;
  ctx.doc_real = plan.doc_real;
  ctx.cos = Tensor::empty(ws.acts_, {n, c.text.head_dim}, dtype());
  ctx.sin = Tensor::empty(ws.acts_, {n, c.text.head_dim}, dtype());
  const auto& sec = c.text.mrope_section;
  mrope_cos_sin(plan.positions, c.text.head_dim, c.text.rope_theta, {sec[0], sec[1], sec[2]}, ctx.cos, ctx.sin);
  ctx.expert_exchange = exchange_;
  ctx.expert_rows = exchange_ ? &ws.expert_rows_ : nullptr;
  ctx.tp = tp_;
  ctx.tp_experts_split = tp_layout().experts_split;
}

void Model::vision_forward(const BatchPlan& plan, const Batch& batch, Workspace& ws) const {
  if (plan.has_vision) {
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
    vision_tower_forward(config_.vision, vision_w_, batch.pixel_values, batch.pixel_values_videos, plan.vision,
                         ws.acts_, ws.vision, calls, tp_);
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
}

Tensor Model::embed_tokens(const BatchPlan& plan, Workspace& ws) const {
  const Tensor h = Tensor::empty(ws.acts_, {plan.shape.tokens(), config_.text.hidden_size}, dtype());
  acquire(unit_ids_.token_embedding);
  if (tp_) vocab_parallel_embedding_forward(ws.ids, text_w_.embed, vocab_begin(), h, *tp_);
  else embedding_forward(ws.ids, text_w_.embed, h);
  // A tied lm_head is the embedding table: it stays gathered until the logits.
  if (!config_.tie_word_embeddings) release(unit_ids_.token_embedding);
  if (plan.has_vision) scatter_rows(h, plan.visual_rows, ws.vision.embeds);
  return h;
}

ForwardResult Model::head_forward(const BatchPlan& plan, const Tensor& h, Workspace& ws) const {
  const ModelConfig& c = config_;
  const DType dt = dtype();
  const int64_t n = plan.shape.tokens();
  Arena& acts = ws.acts_;
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
  if (plan.has_labels) {
    const CrossEntropySum ce =
        tp_ ? vocab_parallel_cross_entropy_forward(r.logits, plan.targets, vocab_begin(), ws.lse, *tp_)
            : cross_entropy_forward(r.logits, plan.targets, ws.lse);
    r.ce_loss = ce.mean();
    r.ce_tokens = ce.count;
  }
  r.loss = r.ce_loss;
  return r;
}

void Model::aux_loss_forward(const ForwardOptions& options, Workspace& ws, ForwardResult& r) const {
  const ModelConfig& c = config_;
  ws.aux_dprob = Tensor{};
  if (ws.moe_stats.empty()) return;
  if (options.expert_stats_reducer) options.expert_stats_reducer(ws.moe_stats);
  const bool train_aux = options.aux_loss;
  const int64_t experts = c.text.num_experts, layers = static_cast<int64_t>(ws.moe_stats.size());
  if (options.aux_per_layer) {
    if (train_aux) ws.aux_dprob = Tensor::empty(ws.acts_, {layers, experts}, dtype());
    r.aux_loss = moe_aux_loss_per_layer(experts, ws.moe_stats, c.text.router_aux_loss_coef, ws.aux_dprob);
  } else {
    if (train_aux) ws.aux_dprob = Tensor::empty(ws.acts_, {experts}, dtype());
    r.aux_loss = moe_aux_loss(experts, ws.moe_stats, c.text.router_aux_loss_coef, ws.aux_dprob);
  }
  if (train_aux) r.loss += c.text.router_aux_loss_coef * r.aux_loss;
}

void Model::backward(const BatchPlan& plan, Workspace& ws, const BackwardOptions& options) {
  const char* L = "Model::backward";
  Q3VL_CHECK(ws.ready_, L, ": no forward to differentiate (run forward first; backward consumes it once)");
  Q3VL_CHECK(&plan == ws.plan_, L, ": the plan is not the last forward's");
  ws.ready_ = false;
  const ModelConfig& c = config_;
  const DType dt = dtype();
  Arena& scratch = ws.scratch_;
  scratch.reset();
  const int64_t visual = plan.visual_rows.size(0);
  const size_t taps = plan.has_vision ? ws.vision.deepstack.size() : 0;

  // Gradients of the visual features, filled during the text backward and consumed by the vision backward.
  Tensor d_embeds;
  std::vector<Tensor>& d_deepstack = ws.d_deepstack;
  if (plan.has_vision) {
    d_embeds = Tensor::empty(scratch, {visual, c.vision.out_hidden_size}, dt);
    for (size_t k = 0; k < taps; ++k) d_deepstack[k] = Tensor::empty(scratch, {visual, c.vision.out_hidden_size}, dt);
  }
  const size_t text_mark = scratch.mark();

  const Tensor dh = head_backward(plan, ws, options);
  // [E] shared by every MoE layer (pooled) or [MoE layers, E], a row per layer (per-layer aux loss).
  const Tensor aux_dprob = scaled_aux_dprob(ws, options);
  const bool aux_per_layer = aux_dprob.defined() && aux_dprob.ndim() == 2;
  int64_t moe_layer = c.num_moe_layers();
  for (int l = c.text.num_hidden_layers - 1; l >= 0; --l) {
    if (static_cast<size_t>(l) < taps) gather_rows(d_deepstack[l], dh, plan.visual_rows);
    if (text_w_.layers[l].moe) --moe_layer;
    Tensor layer_aux = aux_dprob;
    if (aux_per_layer)
      layer_aux = text_w_.layers[l].moe ? aux_dprob.narrow(0, moe_layer, 1).view({c.text.num_experts}) : Tensor{};
    acquire(unit_ids_.text_layers[l]);
    decoder_layer_backward(c, l, text_w_.layers[l], ws.ctx, ws.layers[l], dh, layer_aux, text_g_.layers[l], scratch);
    gradients_ready(unit_ids_.text_layers[l]);
    release(unit_ids_.text_layers[l]);
  }
  if (plan.has_vision) {
    gather_rows(d_embeds, dh, plan.visual_rows);
    // The placeholder embeddings were replaced, so their table rows get no gradient from these positions.
    zero_rows(dh, plan.visual_rows);
  }
  embedding_backward_into_grads(ws, dh);
  scratch.release(text_mark);
  vision_backward(plan, ws, d_embeds);
  scratch.reset();
}

Tensor Model::head_backward(const BatchPlan& plan, Workspace& ws, const BackwardOptions& options) {
  const ModelConfig& c = config_;
  const DType dt = dtype();
  const ForwardResult& r = ws.result_;
  const int64_t n = plan.shape.tokens(), h = c.text.hidden_size;
  // Cross-entropy into the logits buffer, then lm_head and the final norm.
  const Tensor& dlogits = r.logits;
  if (r.ce_tokens > 0) {
    const int64_t normalizer = options.ce_normalizer > 0 ? options.ce_normalizer : r.ce_tokens;
    const double scale = options.loss_scale / static_cast<double>(normalizer);
    if (tp_) vocab_parallel_cross_entropy_backward(r.logits, plan.targets, ws.lse, vocab_begin(), scale, dlogits);
    else cross_entropy_backward(r.logits, plan.targets, ws.lse, scale, dlogits);
  } else {
    fill(dlogits, 0.0);
  }
  const Tensor d_normed = Tensor::empty(ws.scratch_, {n, h}, dt);
  const Tensor dh = Tensor::empty(ws.scratch_, {n, h}, dt);
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
  return dh;
}

Tensor Model::scaled_aux_dprob(Workspace& ws, const BackwardOptions& options) const {
  if (!ws.aux_dprob.defined()) return Tensor{};
  const Tensor aux_dprob = Tensor::empty(ws.scratch_, ws.aux_dprob.shape(), dtype());
  copy(aux_dprob, ws.aux_dprob);
  dispatch_float("Model::backward", dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = aux_dprob.data<T>();
    // Split experts: every tp rank adds the aux term to its partial router gradient, so each adds 1 / tp.
    const double split = tp_ && tp_layout().experts_split ? 1.0 / tp_->size() : 1.0;
    const double scale = (options.aux_scale >= 0 ? options.aux_scale : options.loss_scale) * split;
    for (int64_t i = 0; i < aux_dprob.numel(); ++i) p[i] *= static_cast<T>(scale);
  });
  return aux_dprob;
}

void Model::embedding_backward_into_grads(Workspace& ws, const Tensor& dh) {
  const ModelConfig& c = config_;
  if (c.text.pad_token_id >= 0) {
    // nn.Embedding(padding_idx = pad_token_id): the padding row of the table takes no gradient.
    const int64_t* id = ws.ids.data<int64_t>();
    const int64_t n = ws.ids.size(0), h = c.text.hidden_size;
    dispatch_float("Model::backward", dtype(), [&](auto tag) {
      using T = decltype(tag);
      T* g = dh.data<T>();
      for (int64_t i = 0; i < n; ++i)
        if (id[i] == c.text.pad_token_id) std::fill(g + i * h, g + (i + 1) * h, T(0));
    });
  }
  // The embedding backward reads no weights, only the token ids.
  if (tp_) vocab_parallel_embedding_backward(ws.ids, dh, vocab_begin(), text_g_.embed);
  else embedding_backward(ws.ids, dh, text_g_.embed);
  gradients_ready(unit_ids_.token_embedding);
}

void Model::vision_backward(const BatchPlan& plan, Workspace& ws, const Tensor& d_embeds) {
  if (plan.has_vision) {
    const size_t taps = ws.vision.deepstack.size();
    acquire(unit_ids_.vision_mergers);
    VisionBlockCalls calls;
    calls.before = [&](int b) { acquire(unit_ids_.vision_blocks[b]); };
    calls.after = [&](int b) {
      gradients_ready(unit_ids_.vision_blocks[b]);
      release(unit_ids_.vision_blocks[b]);
    };
    // The patch embedding's and position table's gradients need no weights (the pixels take no gradient).
    vision_tower_backward(config_.vision, vision_w_, ws.vision, d_embeds,
                          std::span<const Tensor>(ws.d_deepstack.data(), taps), vision_g_, ws.scratch_, calls, tp_);
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
}

}  // namespace q3vl
