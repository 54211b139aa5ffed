// The per-rank memory model of a parallel layout of Qwen3-VL(-MoE) fp32 training: the process grid, the FSDP
// units and their shards, and the bytes one rank holds. `q3vl plan` prints it; the trainer's measured memory
// is checked against it.
//
// Process grid: world = dp x fsdp x ep x tp. Each of the dp replicas holds the whole model on fsdp x ep x tp
// ranks; every rank reads its own token stream, so dp x fsdp x ep ranks train data-parallel (the tp ranks of
// one stream share it).
// - Tensor parallelism splits attention heads, MLP columns, the vision tower's heads and MLP, the merger MLPs,
//   and the token embedding and lm_head (vocabulary-parallel) by tp. Norms, row-parallel biases, the router,
//   the patch embedding and the vision position table are replicated over tp and counted in full.
// - Experts: with ep > 1 each rank holds num_experts / ep whole experts (expert tensor-parallel degree 1, the
//   torchtitan and Megatron default with EP), the same on the tp ranks of its ep index; with ep = 1 their FFN
//   columns are split by tp like a dense MLP.
// - FSDP units: the vision embeddings, each vision block, the vision mergers, the token embedding, each text
//   layer, and the final norm + lm_head (a tied lm_head is the token embedding). A unit's tp-local non-expert
//   parameters are sharded over the fsdp x ep ranks sharing a tp index (for them the ep ranks are one more
//   data-parallel dimension, torchtitan's dp_shard = fsdp x ep); its local experts over the fsdp ranks holding
//   the same experts. Each part is padded to a multiple of its shard group.
// - Memory (PlanMemory): weights and gradients fp32 (4 B per element), AdamW moments 2 x 4 B. FSDP gathers a
//   unit before its forward and again before its backward: 2 x the largest unit's local weights (in use +
//   the collective's staging buffer, or a prefetched next unit) + 1 x its gradients before their reduce-scatter; a part whose
//   shard group is one rank is not gathered. Activations and scratch are the model's workspace sizes
//   (Workspace::activation_bytes / scratch_bytes) of the rank's micro-batch, computed at tp = 1 (TP would
//   shrink attention and MLP activations; not modelled). With ep > 1 the rows a rank receives for its experts
//   are kept for the backward: under balanced routing tokens x top-k rows of hidden (input) + 2 x
//   moe_intermediate (gate and up outputs) fp32 values per MoE layer.
// - Pure data parallelism (fsdp = ep = tp = 1): the weights and gradients are whole on every rank and only the
//   AdamW moments are split over the dp ranks (each unit one group); the collectives stage dp + 1 chunks of the
//   largest unit, counted as `gathered`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "core/model/model.h"

namespace q3vl::app {

struct PlanLayoutArgs {
  int64_t dp = 1, fsdp = 1, ep = 1, tp = 1;
  int64_t world() const { return dp * fsdp * ep * tp; }
  bool data_parallel_only() const { return fsdp * ep * tp == 1; }  // whole weights on every rank (ZeRO-1)
  int64_t data_parallel() const { return dp * fsdp * ep; }   // distinct token streams
  int64_t dense_shard_group() const { return fsdp * ep; }    // ranks sharding a unit's non-expert parameters
  int64_t expert_shard_group() const { return fsdp; }        // ranks sharding the same local experts
  int64_t expert_split() const { return ep > 1 ? ep : tp; }  // ways each expert tensor is divided over ranks
};

// Refuses a layout the model cannot be split by (ep must divide num_experts, ep > 1 needs MoE layers, tp must
// divide the head counts and FFN widths); the message names the flag and the rule.
void check_plan_layout(const ModelConfig& config, const PlanLayoutArgs& layout);

// One FSDP unit on one rank before sharding: its tp-local non-expert elements and its local experts' elements.
struct PlanUnit {
  std::string name;
  int64_t dense = 0, experts = 0;
};

// The model's FSDP units in parameter order.
std::vector<PlanUnit> plan_units(const ModelConfig& config, const PlanLayoutArgs& layout);

// The shards of every unit on one rank.
struct PlanShards {
  int64_t stored = 0;          // parameter elements this rank stores (its padded shards)
  int64_t foreign_shards = 0;  // elements of the other ranks' shards of every unit (s - 1 per group of s ranks)
  int64_t largest_unit = 0;    // local elements of the largest gathered unit (parts sharded over > 1 rank)
  std::string largest_unit_name;  // empty when nothing is sharded
};

PlanShards plan_shards(const ModelConfig& config, const PlanLayoutArgs& layout);

struct PlanMemory {  // bytes per rank
  int64_t weight_shard = 0, grad_shard = 0, adamw = 0;  // this rank's shards (fp32; AdamW 2 x 4 B)
  int64_t gathered = 0;     // FSDP working set: 2 x the largest unit's local weights + 1 x its gradients
  int64_t activations = 0, scratch = 0;  // Workspace::activation_bytes / scratch_bytes of the shape
  int64_t ep_buffers = 0;   // ep > 1: received expert rows kept for the backward (balanced routing)
  int64_t total() const;
};

// `shape` is one whole micro-batch of one rank (tokens, image and video patches, items, frames).
PlanMemory plan_memory(const ModelConfig& config, const PlanLayoutArgs& layout, const BatchShape& shape);

}  // namespace q3vl::app
