// q3vl plan --model FLAVOR_OR_DIR [--tokens N] [--seq-len S] [--patches-per-image P] [--dp N] [--fsdp N]
// [--tp N] [--ep N]: parameter counts (total, vision, active per text token), training FLOPs per token and per
// image patch, the memory of fp32 training on one rank, and the per-rank memory and per-step communication of
// a parallel layout.
//
// FLOPs: core/model/flops.h (matmuls 2 FLOPs per active weight, attention per (query, key) pair, training =
// 3 x forward).
//
// Layout model (printed with the numbers). world = dp x fsdp x tp; each of the dp replicas is one fsdp x tp
// group, and inside it experts are split over ep ranks (torchtitan / Megatron): each rank holds E/ep experts,
// shared by the fsdp x tp / ep ranks of its expert group.
// - Tensor parallelism splits attention heads, MLP columns, the vision tower's heads and MLP, the merger
//   MLPs, and the token embedding and lm_head (vocabulary-parallel) by tp. Norms, row-parallel biases, the
//   router, the patch embedding and the vision position table are replicated over tp and counted in full.
//   Experts are split by ep and are whole on each rank (expert tensor-parallel degree 1, the torchtitan and
//   Megatron default with EP); with ep = 1 their FFN columns are split by tp like a dense MLP.
// - FSDP units: each vision block, each text layer, and the vision embeddings, the mergers, the token
//   embedding and final norm + lm_head. A unit's tp-local non-expert parameters are sharded over the fsdp
//   ranks, its local experts over their expert group (fsdp x tp / ep ranks, or fsdp when ep = 1), each padded
//   to a multiple of the shard group. Weights and gradients are fp32 (4 B per element), AdamW moments 8 B.
// - Gathered working set: FSDP gathers a unit before its forward and again before its backward, the next one
//   prefetched. Counted as twice the largest gathered unit for weights (in use + prefetch) and once for that
//   unit's gradients before their reduce-scatter. A part whose shard group is one rank is not gathered.
// - Activations and scratch: the model's workspace sizes (Workspace::activation_bytes / scratch_bytes) for the
//   --tokens text tokens of one rank, as one sequence, computed at tp = 1 (TP would shrink the attention
//   and MLP parts; not modelled), with balanced routing (a rank's experts then see tokens x top-k rows, as
//   without EP). Images add vision activations not counted here.
// - Communication per step and rank, bytes sent by ring / pairwise algorithms, one micro-batch per step:
//   FSDP all-gather (forward and backward re-gather: 2 x (s-1) shards per unit and shard group of s ranks),
//   FSDP reduce-scatter of the gradients ((s-1) shards per unit), EP all-to-all (dispatch + combine, forward
//   + backward: tokens x top-k x hidden x 4 B x 4 x (ep-1)/ep per MoE layer, uniform routing), TP all-reduce
//   (2 per text layer forward and 2 backward, plus the vocabulary-parallel embedding output and the lm_head
//   input gradient: tokens x hidden x 4 B x 2 (tp-1)/tp each; vision-tower TP traffic needs images and is not
//   counted), DP all-reduce of the gradient shard (2 (dp-1)/dp of it). Fractional bytes are rounded down.
#include <algorithm>
#include <cstdio>
#include <map>

#include <nlohmann/json.hpp>

#include "app/cli_args.h"
#include "app/commands.h"
#include "core/check.h"
#include "core/model/flops.h"
#include "core/model/model.h"
#include "core/model/param_specs.h"
#include "io/hf_config.h"

namespace q3vl::app {

namespace {

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) { b /= 1024; ++u; }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f %s", b, units[u]);
  return buf;
}

struct Layout {
  int64_t dp = 1, fsdp = 1, tp = 1, ep = 1;
  int64_t group() const { return fsdp * tp; }
  int64_t world() const { return dp * group(); }
  // Ranks splitting one expert's FFN columns: tp without EP, 1 with it.
  int64_t expert_tp() const { return ep == 1 ? tp : 1; }
  // Ranks sharing (FSDP-sharding) the same local experts.
  int64_t expert_shard_group() const { return group() / (ep * expert_tp()); }
};

void check_layout(const ModelConfig& c, const Layout& l) {
  Q3VL_CHECK(l.group() % l.ep == 0, "plan: --ep ", l.ep, " must divide fsdp x tp = ", l.group(),
             " (experts are split over ep ranks inside each fsdp x tp group)");
  if (l.ep > 1) {
    Q3VL_CHECK(c.num_moe_layers() > 0, "plan: --ep ", l.ep, " needs an MoE model; this ", c.model_type,
               " model has no MoE layer");
    Q3VL_CHECK(c.text.num_experts % l.ep == 0, "plan: --ep ", l.ep, " must divide num_experts = ", c.text.num_experts);
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

// Whether tensor parallelism splits a non-expert parameter (see the file comment).
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

// One FSDP unit on one rank: its tp-local non-expert elements and its local experts' elements, before sharding.
struct Unit {
  std::string name;
  int64_t dense = 0, experts = 0;
};

std::string unit_name(const ParamSpec& s) {
  if (s.layer >= 0) return (s.tower == ParamTower::vision ? "vision block " : "text layer ") + std::to_string(s.layer);
  if (s.tower == ParamTower::vision)
    return s.hf_key.find("merger") != std::string::npos ? "vision mergers" : "vision embeddings";
  return s.kind == ParamKind::embedding ? "token embedding" : "final norm + lm_head";
}

std::vector<Unit> fsdp_units(const ModelConfig& c, const Layout& l) {
  std::vector<Unit> units;
  std::map<std::string, size_t> index;
  for (const ParamSpec& s : model_param_specs(c)) {
    const std::string name = unit_name(s);
    auto [it, added] = index.try_emplace(name, units.size());
    if (added) units.push_back({name});
    Unit& u = units[it->second];
    if (s.kind == ParamKind::experts) u.experts += s.numel() / (l.ep * l.expert_tp());
    else u.dense += split_by_tp(s) ? ceil_div(s.numel(), l.tp) : s.numel();
  }
  return units;
}

struct LayoutPlan {
  int64_t stored = 0;         // parameter elements one rank stores (its shards, padded)
  int64_t largest_unit = 0;   // elements of the largest gathered unit
  std::string largest_unit_name;
  int64_t allgather_bytes = 0, reduce_scatter_bytes = 0, alltoall_bytes = 0, tp_allreduce_bytes = 0,
          dp_allreduce_bytes = 0;
};

LayoutPlan plan_layout(const ModelConfig& c, const Layout& l, int64_t tokens) {
  LayoutPlan p;
  const int64_t dense_group = l.fsdp, expert_group = l.expert_shard_group();
  int64_t shards_moved = 0;  // elements of the (s-1) foreign shards of every unit, summed over units
  for (const Unit& u : fsdp_units(c, l)) {
    const int64_t dense_shard = ceil_div(u.dense, dense_group), expert_shard = ceil_div(u.experts, expert_group);
    p.stored += dense_shard + expert_shard;
    shards_moved += (dense_group - 1) * dense_shard + (expert_group - 1) * expert_shard;
    const int64_t gathered = (dense_group > 1 ? u.dense : 0) + (expert_group > 1 ? u.experts : 0);
    if (gathered > p.largest_unit) {
      p.largest_unit = gathered;
      p.largest_unit_name = u.name;
    }
  }
  p.allgather_bytes = 2 * 4 * shards_moved;
  p.reduce_scatter_bytes = 4 * shards_moved;
  const int64_t hidden = c.text.hidden_size;
  p.alltoall_bytes = c.num_moe_layers() * (tokens * c.text.num_experts_per_tok * hidden * 4 * 4 * (l.ep - 1) / l.ep);
  const int64_t tp_allreduces = 4 * static_cast<int64_t>(c.text.num_hidden_layers) + 2;
  p.tp_allreduce_bytes = tp_allreduces * (tokens * hidden * 4 * 2 * (l.tp - 1) / l.tp);
  p.dp_allreduce_bytes = 4 * p.stored * 2 * (l.dp - 1) / l.dp;
  return p;
}

}  // namespace

int run_plan(const std::vector<std::string>& args) {
  const CliArgs a(args, "plan",
                  {"--model", "--tokens", "--seq-len", "--patches-per-image", "--dp", "--fsdp", "--tp", "--ep"}, {});
  const std::string name = a.required("--model");
  const ModelConfig c = io::load_model_config(name);
  const int64_t tokens = a.get_int("--tokens", 4096, 1);
  const int64_t seq = a.get_int("--seq-len", tokens, 1);
  const int64_t patches = a.get_int("--patches-per-image", 1024, 4);
  Layout l;
  l.dp = a.get_int("--dp", 1, 1);
  l.fsdp = a.get_int("--fsdp", 1, 1);
  l.tp = a.get_int("--tp", 1, 1);
  l.ep = a.get_int("--ep", 1, 1);
  check_layout(c, l);

  const int64_t total = count_parameters(c), vision = count_vision_parameters(c);
  const int64_t active = count_active_text_parameters(c);
  const FlopModel fm = flop_model(c);
  const double text_train = train_flops_per_token(fm, seq);
  const double vis_train = train_flops_per_patch(fm, patches);

  BatchShape shape;
  shape.batch = 1;
  shape.seq = tokens;
  const double w = 4.0 * total, g = 4.0 * total, adam = 8.0 * total;
  const int64_t acts = static_cast<int64_t>(Workspace::activation_bytes(c, shape, DType::f32));
  const int64_t scratch = static_cast<int64_t>(Workspace::scratch_bytes(c, shape, DType::f32));

  std::printf("model %s (%s): %d text layers (%d MoE), hidden %lld, %d experts top-%d; vision depth %d, hidden %lld\n",
              name.c_str(), c.model_type.c_str(), c.text.num_hidden_layers, c.num_moe_layers(),
              (long long)c.text.hidden_size, c.text.num_experts, c.text.num_experts_per_tok, c.vision.depth,
              (long long)c.vision.hidden_size);
  std::printf("parameters: %lld total (vision %lld, text %lld), %lld active per text token\n", (long long)total,
              (long long)vision, (long long)(total - vision), (long long)active);
  std::printf("training FLOPs: %.4g per text token (seq %lld), %.4g per image patch (%lld patches per image)\n",
              text_train, (long long)seq, vis_train, (long long)patches);
  std::printf("memory on one rank for %lld text tokens (fp32): weights %s, gradients %s, AdamW states %s, "
              "activations %s, scratch %s, total %s\n",
              (long long)tokens, human_bytes(w).c_str(), human_bytes(g).c_str(), human_bytes(adam).c_str(),
              human_bytes(acts).c_str(), human_bytes(scratch).c_str(), human_bytes(w + g + adam + acts + scratch).c_str());
  std::printf("{\"event\":\"plan\",\"model\":\"%s\",\"parameters\":%lld,\"vision_parameters\":%lld,\"active_parameters\":%lld,"
              "\"train_flops_per_token\":%.6g,\"train_flops_per_patch\":%.6g,\"tokens\":%lld,\"weight_bytes\":%.0f,"
              "\"grad_bytes\":%.0f,\"adamw_bytes\":%.0f,\"activation_bytes\":%lld,\"scratch_bytes\":%lld}\n",
              name.c_str(), (long long)total, (long long)vision, (long long)active, text_train, vis_train, (long long)tokens,
              w, g, adam, (long long)acts, (long long)scratch);

  const LayoutPlan p = plan_layout(c, l, tokens);
  const int64_t weights = 4 * p.stored, grads = 4 * p.stored, moments = 8 * p.stored;
  const int64_t gathered_w = 2 * 4 * p.largest_unit, gathered_g = 4 * p.largest_unit;
  const int64_t mem_total = weights + grads + moments + gathered_w + gathered_g + acts + scratch;
  const int64_t comm_total =
      p.allgather_bytes + p.reduce_scatter_bytes + p.alltoall_bytes + p.tp_allreduce_bytes + p.dp_allreduce_bytes;
  const bool moe = c.num_moe_layers() > 0;

  std::printf("\nlayout: world %lld = dp %lld x fsdp %lld x tp %lld, ep %lld", (long long)l.world(), (long long)l.dp,
              (long long)l.fsdp, (long long)l.tp, (long long)l.ep);
  if (moe)
    std::printf(" (%lld experts per rank, each expert sharded over %lld ranks)", (long long)(c.text.num_experts / l.ep),
                (long long)l.expert_shard_group());
  std::printf("\nmodel: fp32 weights and gradients (4 B) and AdamW moments (8 B) sharded over fsdp within tp (experts: "
              "over their expert group);\n  norms, row-parallel biases, router, patch and position embeddings "
              "replicated over tp; experts whole per rank when ep > 1;\n  gathered = 2 x the largest FSDP unit "
              "(in use + prefetch) + its gradients; activations at tp = 1, text only, balanced routing;\n  "
              "communication = bytes sent per rank and step (ring), one micro-batch, uniform routing, no vision TP\n");
  std::printf("per-rank memory (%lld tokens per rank)\n", (long long)tokens);
  const auto row = [](const char* what, int64_t bytes) {
    std::printf("  %-44s %14s  %16lld B\n", what, human_bytes(static_cast<double>(bytes)).c_str(), (long long)bytes);
  };
  row("weights (shard)", weights);
  row("gradients (shard)", grads);
  row("AdamW moments (shard)", moments);
  row("gathered weights (2 x largest unit)", gathered_w);
  row("gathered gradients (1 x largest unit)", gathered_g);
  row("activations (tp = 1)", acts);
  row("scratch (tp = 1)", scratch);
  row("total", mem_total);
  std::printf("  largest gathered FSDP unit: %s (%lld elements on a rank)\n",
              p.largest_unit_name.empty() ? "none (nothing is sharded)" : p.largest_unit_name.c_str(),
              (long long)p.largest_unit);
  std::printf("per-rank communication per step\n");
  row("FSDP all-gather (forward + backward)", p.allgather_bytes);
  row("FSDP reduce-scatter (gradients)", p.reduce_scatter_bytes);
  row("EP all-to-all (dispatch + combine, fwd + bwd)", p.alltoall_bytes);
  row("TP all-reduce", p.tp_allreduce_bytes);
  row("DP all-reduce (gradient shard)", p.dp_allreduce_bytes);
  row("total", comm_total);

  const nlohmann::ordered_json j = {
      {"event", "plan_layout"},
      {"model", name},
      {"tokens", tokens},
      {"world", l.world()},
      {"dp", l.dp},
      {"fsdp", l.fsdp},
      {"tp", l.tp},
      {"ep", l.ep},
      {"experts_per_rank", moe ? c.text.num_experts / l.ep : 0},
      {"stored_parameters", p.stored},
      {"weight_bytes", weights},
      {"grad_bytes", grads},
      {"adamw_bytes", moments},
      {"largest_unit", p.largest_unit_name},
      {"largest_unit_parameters", p.largest_unit},
      {"gathered_weight_bytes", gathered_w},
      {"gathered_grad_bytes", gathered_g},
      {"activation_bytes", acts},
      {"scratch_bytes", scratch},
      {"total_bytes", mem_total},
      {"fsdp_allgather_bytes", p.allgather_bytes},
      {"fsdp_reduce_scatter_bytes", p.reduce_scatter_bytes},
      {"ep_alltoall_bytes", p.alltoall_bytes},
      {"tp_allreduce_bytes", p.tp_allreduce_bytes},
      {"dp_allreduce_bytes", p.dp_allreduce_bytes},
      {"comm_bytes", comm_total},
  };
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

}  // namespace q3vl::app
