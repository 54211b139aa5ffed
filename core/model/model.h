// The assembled Qwen3-VL / Qwen3-VL-MoE model (HF Qwen3VLMoeForConditionalGeneration and
// Qwen3VLForConditionalGeneration) on the CPU: forward to logits, cross-entropy and the MoE load-balancing
// aux loss, and backward into a gradient store of the same layout as the weights.
//
// Usage (a test or the trainer):
//   Model model(config);                 // f32; DType::f64 for finite-difference tests
//   model.init_weights(seed);            // or fill model.weights() from a checkpoint (HF keys)
//   BatchPlan plan = plan_batch(model.config(), model.dtype(), batch);  // every check (batch_plan.h)
//   Workspace ws(model, plan.shape);                      // arenas sized up front
//   ForwardResult r = model.forward(plan, batch, ws);     // r.logits [B*S, V], r.ce_loss, r.aux_loss, r.loss
//   model.backward(plan, ws);            // accumulates d r.loss into model.grads(); overwrites r.logits
//
// Semantics (all as HF computes them in fp32):
// - Images, then videos, run through the vision tower; their merged features replace, in order, the
//   <|image_pad|> / <|video_pad|> token embeddings (counts must match), and DeepStack tap k is added to the
//   visual rows after decoder layer k.
// - Position ids: get_rope_index (core/model/rope_index.h), in the plan; cos/sin by interleaved MRoPE.
// - Tokens are handled as one flat list of B*S rows cut into documents (a row, or the packed documents of
//   Batch::cu_seqlens); attention is causal inside a document. Padding (attention_mask 0, right padding)
//   runs through every layer like in HF, attends to its document's real tokens, is excluded from the aux
//   loss, and must carry label -100 (HF would otherwise count it in the loss).
// - ce_loss: labels shifted inside each document (position i predicts labels[i + 1]; a row's or packed
//   document's last position predicts nothing), -100 ignored, mean over
//   the counted targets. aux_loss: HF load_balancing_loss_func over all MoE layers with the attention mask.
//   loss = ce_loss + router_aux_loss_coef * aux_loss when ForwardOptions::aux_loss (HF's
//   output_router_logits) and the model has MoE layers, else ce_loss.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/arena.h"
#include "core/model/batch_plan.h"
#include "core/model/config.h"
#include "core/model/param_store.h"
#include "core/model/param_units.h"
#include "core/model/tp_layout.h"
#include "core/model/text_decoder.h"
#include "core/model/vision_tower.h"
#include "core/tensor.h"

namespace q3vl {

struct ForwardOptions {
  bool aux_loss = true;  // add router_aux_loss_coef * aux_loss to `loss` (MoE models)
  // aux_loss is the mean of each MoE layer's own balance loss (moe_aux_loss_per_layer) instead of HF's loss
  // pooled over the layers (moe_aux_loss).
  bool aux_per_layer = false;
  // Data parallelism: called with every MoE layer's routing statistics (counts, prob_sum, valid_tokens) before
  // the aux loss is computed, to sum them over ranks in place, so that the aux loss and its gradient are those
  // of the global batch (HF's load_balancing_loss_func over the concatenated batch). Unset: this batch alone.
  std::function<void(std::vector<MoeStats>&)> expert_stats_reducer;
};

struct ForwardResult {
  Tensor logits;           // [B*S, V] in the workspace; the next forward or backward overwrites it
  double ce_loss = 0;      // mean cross-entropy over ce_tokens
  int64_t ce_tokens = 0;   // targets counted (not -100)
  double aux_loss = 0;     // load-balancing loss (0 without MoE layers)
  double loss = 0;         // the training loss the backward differentiates
};

struct BackwardOptions {
  double loss_scale = 1.0;     // gradients of loss_scale * loss
  int64_t ce_normalizer = 0;   // divide the CE sum by this instead of ce_tokens (gradient accumulation)
  double aux_scale = -1.0;     // multiplies the aux-loss term's gradient instead of loss_scale when >= 0
                               // (gradient accumulation: 1 / micro-batches, the aux loss being a mean)
};

class Model;

// Activations and scratch of one forward/backward, sized up front for a BatchShape, plus the per-layer
// records the backward reads. Reused across steps; forward resets it.
class Workspace {
 public:
  // expert_group_tokens: with expert parallelism, the most tokens any rank of the group brings to a forward
  // (their rows may all come here); 0 for this capacity's.
  Workspace(const Model& model, const BatchShape& capacity, int64_t expert_group_tokens = 0);

  // expert_parallel: the MoE layers take the expert-parallel path (Model::set_expert_exchange).
  static size_t activation_bytes(const ModelConfig& config, const BatchShape& shape, DType dtype,
                                 bool expert_parallel = false);
  static size_t scratch_bytes(const ModelConfig& config, const BatchShape& shape, DType dtype,
                              bool expert_parallel = false);

  const BatchShape& capacity() const { return capacity_; }
  int64_t expert_group_tokens() const { return expert_group_tokens_; }
  Arena& activations() { return acts_; }
  Arena& scratch() { return scratch_; }
  // Routing counts of the last forward, one entry per MoE layer in layer order (expert-load statistics).
  const std::vector<MoeStats>& expert_load() const { return moe_stats; }
  // Expert parallelism: the MoE layers' received rows and the exchange's transient rows (MoeConfig::expert_rows),
  // sized for the worst case; its high_water() is what the routing used.
  Arena& expert_rows() { return expert_rows_; }

 private:
  friend class Model;
  BatchShape capacity_;
  int64_t expert_group_tokens_;
  Arena acts_, scratch_, expert_rows_;
  // Filled by forward, read by backward.
  bool ready_ = false;
  const BatchPlan* plan_ = nullptr;  // the forward's plan
  ForwardResult result_;
  Tensor ids;  // i64 [N] view of the batch's input_ids
  TextContext ctx;
  VisionTowerState vision;
  std::vector<DecoderLayerSaved> layers;
  std::vector<Tensor> d_deepstack;  // backward: gradients of the DeepStack features
  std::vector<MoeStats> moe_stats;
  Tensor final_normed, final_rstd, lse, aux_dprob;
};

class Model {
 public:
  // `tp`: this rank's tensor-parallel slice of the parameters (tp_layout.h); whole tensors by default.
  explicit Model(const ModelConfig& config, DType dtype = DType::f32, const TpLayout& tp = {});

  const ModelConfig& config() const { return config_; }
  DType dtype() const { return weights_.dtype(); }
  ParamStore& weights() { return weights_; }
  ParamStore& grads() { return grads_; }
  const ParamStore& weights() const { return weights_; }
  const ParamStore& grads() const { return grads_; }

  // ParamStore::init(seed, text_config.initializer_range): normal(0, 0.02) matrices, embeddings and
  // experts, ones for norm weights, zeros for biases.
  void init_weights(uint64_t seed);
  void zero_grads() { grads_.fill_zero(); }

  // `plan` is plan_batch's plan of `batch` for this model; the batch must fit the workspace.
  ForwardResult forward(const BatchPlan& plan, const Batch& batch, Workspace& ws,
                        const ForwardOptions& options = {}) const;
  // Gradient of the last forward's loss (scaled) accumulated into grads(). `plan` is the forward's, and the
  // batch's tensors must still be alive; the logits in the workspace are overwritten with their gradient.
  void backward(const BatchPlan& plan, Workspace& ws, const BackwardOptions& options = {});

  // FSDP: the model calls `hooks` around every use of a unit's weights and after its gradients are complete
  // (param_units.h), so a sharded store materialises only the units in use. nullptr: all weights are present.
  void set_param_hooks(ParamUnitHooks* hooks) { hooks_ = hooks; }
  // Expert parallelism: the MoE layers compute only this rank's experts and exchange rows through
  // `exchange` (core/layers/moe.h). nullptr: every expert is local.
  void set_expert_exchange(ExpertExchange* exchange) { exchange_ = exchange; }
  // Tensor parallelism over the ranks of the model's TpLayout (size and rank must match). Heads, FFN columns
  // and the vocabulary are split; the logits of forward() are then this rank's vocabulary columns
  // [rank * V / size, (rank + 1) * V / size), while the losses are global.
  void set_tensor_parallel(TensorParallel* tp);
  const TpLayout& tp_layout() const { return weights_.tp(); }
  bool expert_parallel() const { return exchange_ != nullptr; }
  // Bytes of a workspace's expert-rows arena (moe_expert_rows_bytes of every MoE layer) when no rank of the
  // expert-parallel group has more than max_tokens tokens; 0 without expert parallelism.
  size_t expert_rows_bytes(int64_t max_tokens) const;
  const std::vector<ParamUnit>& units() const { return weights_.units(); }

  // Aux-loss-free load balancing: gives every MoE layer a router score bias (MoeWeights::score_bias), rows of
  // one f32 [num_moe_layers, E] tensor, zero at first. It is state, not a parameter: no gradient, not in
  // weights(), so neither the optimizer nor FSDP nor the HF export see it; the caller updates it in place.
  void enable_router_bias();
  const Tensor& router_bias() const { return router_bias_; }  // undefined until enabled

 private:
  // The forward's and backward's parts, in model order.
  void check_plan(const BatchPlan& plan, const Batch& batch, const Workspace& ws) const;
  void text_context(const BatchPlan& plan, Workspace& ws) const;
  void vision_forward(const BatchPlan& plan, const Batch& batch, Workspace& ws) const;
  Tensor embed_tokens(const BatchPlan& plan, Workspace& ws) const;
  ForwardResult head_forward(const BatchPlan& plan, const Tensor& h, Workspace& ws) const;
  void aux_loss_forward(const ForwardOptions& options, Workspace& ws, ForwardResult& r) const;
  Tensor head_backward(const BatchPlan& plan, Workspace& ws, const BackwardOptions& options);
  Tensor scaled_aux_dprob(Workspace& ws, const BackwardOptions& options) const;
  void embedding_backward_into_grads(Workspace& ws, const Tensor& dh);
  void vision_backward(const BatchPlan& plan, Workspace& ws, const Tensor& d_embeds);
  int64_t vocab_begin() const;  // the first vocabulary row of this rank's slice (0 without tp)

  void acquire(int unit) const {
    if (hooks_) hooks_->acquire(unit);
  }
  void release(int unit) const {
    if (hooks_) hooks_->release(unit);
  }
  void gradients_ready(int unit) {
    if (hooks_) hooks_->gradients_ready(unit);
  }

  ModelConfig config_;
  ParamStore weights_, grads_;
  UnitIds unit_ids_;
  ParamUnitHooks* hooks_ = nullptr;
  ExpertExchange* exchange_ = nullptr;
  TensorParallel* tp_ = nullptr;
  VisionTowerWeights vision_w_, vision_g_;
  TextWeights text_w_, text_g_;
  std::vector<float> router_bias_storage_;
  Tensor router_bias_;
};

}  // namespace q3vl
