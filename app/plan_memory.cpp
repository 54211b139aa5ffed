// The layout checks, FSDP units, shards and per-rank memory of app/plan_memory.h.
#include "app/plan_memory.h"

#include <algorithm>

#include "core/check.h"
#include "core/model/param_specs.h"
#include "core/model/param_units.h"

namespace q3vl::app {

namespace {

// Whether tensor parallelism splits a non-expert parameter (see the file comment of plan_memory.h).
bool split_by_tp(const ParamSpec& s) {
  const auto has = [&](const char* part) { return s.hf_key.find(part) != std::string::npos; };
  switch (s.kind) {
    case ParamKind::embedding: return s.tower != ParamTower::vision;
    case ParamKind::matrix: return !has(".mlp.gate.weight") && !has("patch_embed");
    case ParamKind::bias: return has(".qkv.") || has(".linear_fc1.");
    case ParamKind::norm: return false;
    case ParamKind::experts: break;
  }
  Q3VL_FAIL("plan: experts are split by ep, not through split_by_tp (", s.hf_key, ")");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void check_plan_layout(const ModelConfig& c, const PlanLayoutArgs& l) {
  Q3VL_CHECK(l.dp >= 1 && l.fsdp >= 1 && l.ep >= 1 && l.tp >= 1, "plan: --dp, --fsdp, --ep and --tp must be >= 1 (got ",
             l.dp, ", ", l.fsdp, ", ", l.ep, ", ", l.tp, ")");
  if (l.ep > 1) {
    Q3VL_CHECK(c.num_moe_layers() > 0, "plan: --ep ", l.ep, " needs an MoE model; this ", c.model_type,
               " model has no MoE layer");
    Q3VL_CHECK(c.text.num_experts % l.ep == 0, "plan: --ep ", l.ep, " must divide num_experts = ", c.text.num_experts,
               " (each ep rank holds num_experts / ep whole experts)");
  }
  const auto tp_divides = [&](const char* field, int64_t n) {
    Q3VL_CHECK(n % l.tp == 0, "plan: --tp ", l.tp, " must divide ", field, " = ", n);
  };
  tp_divides("num_attention_heads", c.text.num_attention_heads);
  tp_divides("num_key_value_heads", c.text.num_key_value_heads);
  if (c.num_moe_layers() < c.text.num_hidden_layers) tp_divides("intermediate_size", c.text.intermediate_size);
  if (c.num_moe_layers() > 0) tp_divides("moe_intermediate_size", c.text.moe_intermediate_size);
  tp_divides("vision num_heads", c.vision.num_heads);
  tp_divides("vision intermediate_size", c.vision.intermediate_size);
}

std::vector<PlanUnit> plan_units(const ModelConfig& c, const PlanLayoutArgs& l) {
  // The trainer's FSDP units (core/model/param_units.h), counted for this layout.
  const std::vector<ParamSpec> specs = model_param_specs(c);
  std::vector<PlanUnit> units;
  for (const ParamUnit& pu : param_units(c)) {
    PlanUnit u{pu.name};
    for (size_t i = pu.first_spec; i < pu.end_spec; ++i) {
      const ParamSpec& s = specs[i];
      if (s.kind == ParamKind::experts) u.experts += s.numel() / l.expert_split();
      else u.dense += split_by_tp(s) ? ceil_div(s.numel(), l.tp) : s.numel();
    }
    units.push_back(u);
  }
  return units;
}

PlanShards plan_shards(const ModelConfig& c, const PlanLayoutArgs& l) {
  check_plan_layout(c, l);
  PlanShards p;
  const int64_t dense_group = l.dense_shard_group(), expert_group = l.expert_shard_group();
  for (const PlanUnit& u : plan_units(c, l)) {
    const int64_t dense_shard = ceil_div(u.dense, dense_group), expert_shard = ceil_div(u.experts, expert_group);
    p.stored += dense_shard + expert_shard;
    p.foreign_shards += (dense_group - 1) * dense_shard + (expert_group - 1) * expert_shard;
    const int64_t gathered = (dense_group > 1 ? u.dense : 0) + (expert_group > 1 ? u.experts : 0);
    if (gathered > p.largest_unit) {
      p.largest_unit = gathered;
      p.largest_unit_name = u.name;
    }
  }
  return p;
}

int64_t PlanMemory::total() const {
  return weight_shard + grad_shard + adamw + gathered + activations + scratch + ep_buffers;
}

PlanMemory plan_memory(const ModelConfig& c, const PlanLayoutArgs& l, const BatchShape& shape) {
  const PlanShards p = plan_shards(c, l);
  constexpr int64_t kF32 = 4;
  PlanMemory m;
  m.weight_shard = kF32 * p.stored;
  m.grad_shard = kF32 * p.stored;
  m.adamw = 2 * kF32 * p.stored;
  m.gathered = (2 + 1) * kF32 * p.largest_unit;
  if (l.data_parallel_only()) {
    // Resident sharding (pure data parallelism): each unit is one group split over the dp ranks for AdamW only;
    // the reduce-scatter and all-gather stage dp + 1 chunks of the largest unit.
    int64_t moments = 0, largest_chunk = 0;
    for (const PlanUnit& u : plan_units(c, l)) {
      const int64_t chunk = ceil_div(u.dense + u.experts, l.dp);  // rank 0's share, the largest
      moments += chunk;
      largest_chunk = std::max(largest_chunk, chunk);
    }
    m.adamw = 2 * kF32 * moments;
    m.gathered = l.dp > 1 ? kF32 * (l.dp + 1) * largest_chunk : 0;
  }
  m.activations = static_cast<int64_t>(Workspace::activation_bytes(c, shape, DType::f32, l.ep > 1));
  m.scratch = static_cast<int64_t>(Workspace::scratch_bytes(c, shape, DType::f32, l.ep > 1));
  if (l.ep > 1) {
    const int64_t row = c.text.hidden_size + 2 * c.text.moe_intermediate_size;
    m.ep_buffers = c.num_moe_layers() * shape.tokens() * c.text.num_experts_per_tok * row * kF32;
  }
  return m;
}

}  // namespace q3vl::app
