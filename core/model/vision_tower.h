// The Qwen3-VL vision tower (HF Qwen3VLMoeVisionModel) forward and backward: patch embed, resampled
// absolute position embedding, 2-D rotary, `depth` pre-norm blocks with block-diagonal attention (one block
// per temporal patch of each item), DeepStack mergers after the blocks of deepstack_visual_indexes, and
// the final patch merger. All items (images, then videos) run in one call: every operation is per patch
// or per temporal patch, so this equals HF's separate image and video calls.
//
// Tensor parallelism (Megatron, core/layers/tensor_parallel.h): with a TensorParallel of P ranks every block
// runs num_heads / P heads (its rows of q, k and v of the fused qkv) and intermediate_size / P FFN columns,
// the mergers merged / P fc1 columns; the row-parallel outputs (attn.proj, mlp.linear_fc2, mergers' fc2) are
// summed over the ranks before the residual add, their biases added by tp rank 0 only, and the column-parallel
// input gradients before each LayerNorm backward. Activations, outputs and the replicated tensors' gradients
// are then equal on every rank; the split tensors' gradients are the rank's slices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "core/arena.h"
#include "core/layers/attention_block.h"
#include "core/layers/tensor_parallel.h"
#include "core/layers/vision.h"
#include "core/model/config.h"
#include "core/model/param_store.h"
#include "core/model/vision_plan.h"
#include "core/tensor.h"

namespace q3vl {

struct VisionBlockWeights {
  Tensor norm1_w, norm1_b, norm2_w, norm2_b;
  AttentionWeights attn;  // wq/wk/wv (and biases) are the q|k|v row blocks of the (local) fused attn.qkv tensors
  Tensor fc1_w, fc1_b, fc2_w, fc2_b;
};

// Views into a ParamStore (weights or gradients: the same layout), whole or a tensor-parallel rank's slices.
struct VisionTowerWeights {
  Tensor patch_w, patch_b, pos_table;
  std::vector<VisionBlockWeights> blocks;
  PatchMergerWeights merger;
  std::vector<PatchMergerWeights> deepstack;  // merger k of deepstack_visual_indexes[k]
};
VisionTowerWeights vision_tower_weights(const VisionConfig& config, const ParamStore& store);

struct VisionBlockSaved {
  Tensor x_in;                 // [P, D] block input (the previous block's output)
  Tensor ln1, mean1, rstd1;    // norm1 output and statistics
  AttentionSaved attn;
  Tensor x_mid;                // [P, D] after the attention residual
  Tensor ln2, mean2, rstd2;
  Tensor fc1_out, act;         // [P, I] before and after GELU
  Tensor x_out;                // [P, D]
};

// Everything the backward needs, plus the outputs. Sized for the config once (no allocation per step);
// the tensors point into the activation arena. Keeps views of the pixel tensors and of the plan, which must
// outlive the backward.
struct VisionTowerState {
  explicit VisionTowerState(const VisionConfig& config);
  Tensor pixel_parts[2];       // images, videos (either may be undefined)
  VisionPlan plan;             // the forward's plan
  Tensor cos, sin;             // [P, head_dim]
  std::vector<VisionBlockSaved> blocks;
  std::vector<PatchMergerSaved> taps;  // per DeepStack merger
  PatchMergerSaved merger;
  Tensor embeds;                   // [P / merge_unit, out_hidden] final merger output
  std::vector<Tensor> deepstack;   // per DeepStack merger [P / merge_unit, out_hidden], in tap (block) order
  std::vector<int> tap_merger;     // merger index of the k-th tap in block order
};

// Activation-arena bytes of the forward (saved tensors plus the largest transient it borrows there); sized for
// the whole tower, an upper bound under tensor parallelism.
size_t vision_tower_activation_bytes(const VisionConfig& config, const VisionShape& shape, DType dtype);
// Scratch-arena bytes of the backward (released before returning; the forward takes none); also an upper bound
// under tensor parallelism.
size_t vision_tower_scratch_bytes(const VisionConfig& config, const VisionShape& shape, DType dtype);

// Called around each block's use (forward, and again in the backward) so that a sharded store can gather that
// block's weights just in time (FSDP): before(b) first, after(b) once the block is done (after its backward,
// its gradients are complete). Either may be empty.
struct VisionBlockCalls {
  std::function<void(int)> before, after;
};

// pixel_parts: up to two [P_i, patch_features] tensors (images, videos; undefined entries are skipped)
// whose rows follow plan.grid in order (vision_plan.h, planned for the dtype of w). Fills `state`, outputs
// included. tp (null: none) splits the blocks and mergers as described above; w must then hold that rank's
// slices.
void vision_tower_forward(const VisionConfig& config, const VisionTowerWeights& w, const Tensor& image_pixels,
                          const Tensor& video_pixels, const VisionPlan& plan, Arena& acts,
                          VisionTowerState& state, const VisionBlockCalls& calls = {}, TensorParallel* tp = nullptr);

// d_embeds [M, out_hidden] and d_deepstack (one per tap, in state.deepstack order) are the gradients of
// the outputs; parameter gradients accumulate into `grads`. The pixels get no gradient. With tp (the forward's),
// the output gradients must be equal on every rank.
void vision_tower_backward(const VisionConfig& config, const VisionTowerWeights& w, const VisionTowerState& state,
                           const Tensor& d_embeds, std::span<const Tensor> d_deepstack,
                           const VisionTowerWeights& grads, Arena& scratch, const VisionBlockCalls& calls = {},
                           TensorParallel* tp = nullptr);

}  // namespace q3vl
