// The FLOP model `q3vl plan` prints and the trainer's MFU estimate uses.
//
// A matmul with p active weights costs 2p FLOPs per row forward; attention costs 4 * heads * head_dim FLOPs per
// (query, key) pair and layer forward (QK^T and PV): causal text attention over a document of S tokens has
// S (S + 1) / 2 pairs, the vision tower's full attention over an item of P patches P^2. Training = 3 x forward
// (backward = 2 x forward). MoE layers count top-k of E experts plus the router; mergers run once per merge
// unit of patches.
#pragma once

#include <cstdint>
#include <span>

#include "core/model/config.h"

namespace q3vl {

struct FlopModel {
  double text_matmul_params = 0;    // active weights a text token multiplies (incl. lm_head)
  double vision_matmul_params = 0;  // weights a patch multiplies (merger weights divided by the merge unit)
  double text_attention_per_pair = 0;    // forward FLOPs per (query, key) pair over all text layers
  double vision_attention_per_pair = 0;  // same for the vision blocks
};

FlopModel flop_model(const ModelConfig& config);

// Training FLOPs of one text token in a document of `seq` tokens (its share of the causal pairs).
double train_flops_per_token(const FlopModel& model, int64_t seq);
// Training FLOPs of one patch of an item of `patches` patches.
double train_flops_per_patch(const FlopModel& model, int64_t patches);
// Training FLOPs of a batch: documents of the given token counts and vision items of the given patch counts.
double train_flops(const FlopModel& model, std::span<const int64_t> document_tokens, std::span<const int64_t> item_patches);

}  // namespace q3vl
