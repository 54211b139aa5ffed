// q3vl plan --model FLAVOR_OR_DIR [--tokens N] [--seq-len S] [--images N] [--patches-per-image P] [--dp N]
// [--fsdp N] [--ep N] [--tp N]: parameter counts (total, vision, active per text token), training FLOPs per
// token and per image patch, the memory of fp32 training on one rank, and the per-rank memory and per-step
// communication of a parallel layout.
//
// FLOPs: core/model/flops.h (matmuls 2 FLOPs per active weight, attention per (query, key) pair, training =
// 3 x forward), for sequences of --seq-len tokens and images of --patches-per-image patches.
//
// Non-trainable state: the router score bias of aux-loss-free balancing (train config moe.balance: bias |
// aux+bias), f32 [MoE layers, experts], replicated on every rank, not in the optimizer, sharding or the export.
//
// A rank's micro-batch: one sequence of --tokens tokens (the images' placeholder tokens included) and --images
// images of --patches-per-image patches each (default none).
//
// Layout: world = dp x fsdp x ep x tp; the process grid, the FSDP units and shards and the per-rank memory are
// those of app/plan_memory.h (plan_memory, which the trainer's measured memory is checked against).
//
// Communication per step and rank, bytes sent by ring / pairwise algorithms, one micro-batch per step:
// FSDP all-gather (forward and backward re-gather: 2 x (s-1) shards per unit and shard group of s ranks: fsdp
// x ep for non-expert parameters, fsdp for experts), FSDP reduce-scatter of the gradients ((s-1) shards per
// unit and group), EP all-to-all (dispatch + combine, forward + backward: tokens x top-k x hidden x 4 B x 4 x
// (ep-1)/ep per MoE layer, uniform routing), TP all-reduce (2 per text layer forward and 2 backward, plus the
// vocabulary-parallel embedding output and the lm_head input gradient: tokens x hidden x 4 B x 2 (tp-1)/tp
// each; vision-tower TP traffic is not counted), DP all-reduce of the gradient shard over dp (2 (dp-1)/dp of
// it). Fractional bytes are rounded down.
#include <cstdio>

#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "app/plan_memory.h"
#include "core/human_units.h"
#include "core/check.h"
#include "core/model/flops.h"
#include "core/model/model.h"
#include "core/model/param_specs.h"
#include "io/hf_config.h"

namespace q3vl::app {

namespace {

struct Communication {
  int64_t allgather = 0, reduce_scatter = 0, alltoall = 0, tp_allreduce = 0, dp_allreduce = 0;
  int64_t total() const { return allgather + reduce_scatter + alltoall + tp_allreduce + dp_allreduce; }
};

Communication communication(const ModelConfig& c, const PlanLayoutArgs& l, const PlanShards& p, int64_t tokens) {
  Communication m;
  m.allgather = 2 * 4 * p.foreign_shards;
  m.reduce_scatter = 4 * p.foreign_shards;
  const int64_t hidden = c.text.hidden_size;
  m.alltoall = c.num_moe_layers() * (tokens * c.text.num_experts_per_tok * hidden * 4 * 4 * (l.ep - 1) / l.ep);
  const int64_t tp_allreduces = 4 * static_cast<int64_t>(c.text.num_hidden_layers) + 2;
  m.tp_allreduce = tp_allreduces * (tokens * hidden * 4 * 2 * (l.tp - 1) / l.tp);
  m.dp_allreduce = 4 * p.stored * 2 * (l.dp - 1) / l.dp;
  return m;
}

void print_row(const char* what, int64_t bytes) {
  std::printf("  %-48s %14s  %16lld B\n", what, human_bytes(static_cast<double>(bytes)).c_str(), (long long)bytes);
}

}  // namespace

int run_plan(const std::vector<std::string>& args) {
  auto cli = make_command("plan", "Parameter counts, training FLOPs per token and per image patch, and the per-rank "
                                 "memory and communication of a parallel layout (world = dp x fsdp x ep x tp).");
  std::string name;
  int64_t tokens = 4096, seq = 0, images = 0, patches = 1024;
  PlanLayoutArgs l;
  cli->add_option("--model", name, "a jobs/flavors name, a config.json or an HF model folder")->required();
  add_int_option(*cli, "--tokens", tokens, 1, "tokens of a rank's micro-batch (image tokens included)");
  add_int_option(*cli, "--seq-len", seq, 1, "sequence length for the attention FLOPs")->default_str("--tokens");
  add_int_option(*cli, "--images", images, 0, "images in the micro-batch");
  add_int_option(*cli, "--patches-per-image", patches, 4, "patches of each image");
  add_int_option(*cli, "--dp", l.dp, 1, "data-parallel replicas");
  add_int_option(*cli, "--fsdp", l.fsdp, 1, "FSDP shard degree");
  add_int_option(*cli, "--ep", l.ep, 1, "expert-parallel degree");
  add_int_option(*cli, "--tp", l.tp, 1, "tensor-parallel degree");
  if (const auto done = parse_command(*cli, args)) return *done;
  if (seq == 0) seq = tokens;
  const ModelConfig c = io::load_model_config(name);
  check_plan_layout(c, l);

  const int64_t merge_unit = c.vision.merge_unit();
  BatchShape shape;
  shape.batch = 1;
  shape.seq = tokens;
  if (images > 0) {
    Q3VL_CHECK(patches % merge_unit == 0, "plan: --patches-per-image ", patches, " must be a multiple of ",
               merge_unit, " (spatial_merge_size^2: patches merge into one token per ", merge_unit, ")");
    Q3VL_CHECK(images * patches / merge_unit <= tokens, "plan: --images ", images, " x --patches-per-image ",
               patches, " / ", merge_unit, " = ", images * patches / merge_unit,
               " image tokens do not fit in --tokens ", tokens, " (the sequence includes them)");
    shape.image_patches = images * patches;
    shape.items = images;
    shape.frames = images;  // an image is one temporal frame (grid t = 1)
  }

  const int64_t total = count_parameters(c), vision = count_vision_parameters(c);
  const int64_t active = count_active_text_parameters(c);
  const FlopModel fm = flop_model(c);
  const double text_train = train_flops_per_token(fm, seq);
  const double vis_train = train_flops_per_patch(fm, patches);
  const PlanMemory one = plan_memory(c, PlanLayoutArgs{}, shape);
  const std::string batch_text = std::to_string(tokens) + " tokens" +
                                 (images > 0 ? " + " + std::to_string(images) + " images of " +
                                                   std::to_string(patches) + " patches"
                                             : std::string());

  std::printf("model %s (%s): %d text layers (%d MoE), hidden %lld, %d experts top-%d; vision depth %d, hidden %lld\n",
              name.c_str(), c.model_type.c_str(), c.text.num_hidden_layers, c.num_moe_layers(),
              (long long)c.text.hidden_size, c.text.num_experts, c.text.num_experts_per_tok, c.vision.depth,
              (long long)c.vision.hidden_size);
  std::printf("parameters: %lld total (vision %lld, text %lld), %lld active per text token\n", (long long)total,
              (long long)vision, (long long)(total - vision), (long long)active);
  const int64_t bias_values = static_cast<int64_t>(c.num_moe_layers()) * c.text.num_experts;
  if (bias_values > 0)
    std::printf("non-trainable state: router score bias, %d MoE layers x %d experts = %lld f32 values (%s, replicated "
                "on every rank; only with moe.balance: bias | aux+bias)\n",
                c.num_moe_layers(), c.text.num_experts, (long long)bias_values,
                human_bytes(static_cast<double>(4 * bias_values)).c_str());
  std::printf("training FLOPs: %.4g per text token (seq %lld), %.4g per image patch (%lld patches per image)\n",
              text_train, (long long)seq, vis_train, (long long)patches);
  std::printf("memory on one rank for %s (fp32): weights %s, gradients %s, AdamW states %s, activations %s, "
              "scratch %s, total %s\n",
              batch_text.c_str(), human_bytes(one.weight_shard).c_str(), human_bytes(one.grad_shard).c_str(),
              human_bytes(one.adamw).c_str(), human_bytes(one.activations).c_str(), human_bytes(one.scratch).c_str(),
              human_bytes(one.total()).c_str());
  const nlohmann::ordered_json single = {
      {"event", "plan"},
      {"model", name},
      {"parameters", total},
      {"vision_parameters", vision},
      {"active_parameters", active},
      {"router_bias_values", bias_values},
      {"train_flops_per_token", text_train},
      {"train_flops_per_patch", vis_train},
      {"tokens", tokens},
      {"images", images},
      {"weight_bytes", one.weight_shard},
      {"grad_bytes", one.grad_shard},
      {"adamw_bytes", one.adamw},
      {"activation_bytes", one.activations},
      {"scratch_bytes", one.scratch},
  };
  std::printf("%s\n", single.dump().c_str());

  const PlanShards p = plan_shards(c, l);
  const PlanMemory m = plan_memory(c, l, shape);
  const Communication comm = communication(c, l, p, tokens);
  const bool moe = c.num_moe_layers() > 0;
  const int64_t experts_per_rank = moe ? c.text.num_experts / l.ep : 0;

  std::printf("\nlayout: world %lld = dp %lld x fsdp %lld x ep %lld x tp %lld; data parallel (token streams) = dp x "
              "fsdp x ep = %lld\n",
              (long long)l.world(), (long long)l.dp, (long long)l.fsdp, (long long)l.ep, (long long)l.tp,
              (long long)l.data_parallel());
  std::printf("  non-expert parameters: tp-local, sharded over fsdp x ep = %lld ranks", (long long)l.dense_shard_group());
  if (moe)
    std::printf("; experts: %lld per rank%s, sharded over fsdp = %lld ranks", (long long)experts_per_rank,
                l.ep > 1 ? " (whole)" : " (columns split by tp)", (long long)l.expert_shard_group());
  std::printf("\nmodel: fp32 weights and gradients (4 B) and AdamW moments (8 B) of the rank's shards; norms, "
              "row-parallel biases,\n  router, patch and position embeddings replicated over tp; gathered = 2 x the "
              "largest FSDP unit (in use +\n  staging) + its gradients; activations and scratch of the micro-batch at "
              "tp = 1; EP buffers and all-to-all\n  with balanced routing; communication = bytes sent per rank and step "
              "(ring), one micro-batch, no vision TP\n");
  std::printf("per-rank memory (%s per rank)\n", batch_text.c_str());
  // Pure data parallelism keeps the weights resident (ZeRO-1): only AdamW is split, and what would be gathered
  // units is the collectives' staging.
  const bool resident = l.data_parallel_only();
  print_row(resident ? "weights (whole, every rank)" : "weights (shard)", m.weight_shard);
  print_row(resident ? "gradients (whole, every rank)" : "gradients (shard)", m.grad_shard);
  print_row(resident ? "AdamW moments (split over dp)" : "AdamW moments (shard)", m.adamw);
  print_row(resident ? "staging (dp + 1 chunks of the largest unit)" : "gathered (2 x weights + grads of largest unit)",
            m.gathered);
  print_row("activations (tp = 1)", m.activations);
  print_row("scratch (tp = 1)", m.scratch);
  print_row("EP received rows kept for the backward", m.ep_buffers);
  print_row("total", m.total());
  std::printf("  largest gathered FSDP unit: %s (%lld elements on a rank)\n",
              p.largest_unit_name.empty() ? "none (nothing is sharded)" : p.largest_unit_name.c_str(),
              (long long)p.largest_unit);
  std::printf("per-rank communication per step\n");
  print_row("FSDP all-gather (forward + backward)", comm.allgather);
  print_row("FSDP reduce-scatter (gradients)", comm.reduce_scatter);
  print_row("EP all-to-all (dispatch + combine, fwd + bwd)", comm.alltoall);
  print_row("TP all-reduce", comm.tp_allreduce);
  print_row(resident ? "DP reduce-scatter + all-gather (ZeRO-1)" : "DP all-reduce (gradient shard)", comm.dp_allreduce);
  print_row("total", comm.total());

  const nlohmann::ordered_json j = {
      {"event", "plan_layout"},
      {"model", name},
      {"tokens", tokens},
      {"images", images},
      {"patches_per_image", patches},
      {"world", l.world()},
      {"dp", l.dp},
      {"fsdp", l.fsdp},
      {"ep", l.ep},
      {"tp", l.tp},
      {"data_parallel", l.data_parallel()},
      {"experts_per_rank", experts_per_rank},
      {"stored_parameters", p.stored},
      {"weight_bytes", m.weight_shard},
      {"grad_bytes", m.grad_shard},
      {"adamw_bytes", m.adamw},
      {"largest_unit", p.largest_unit_name},
      {"largest_unit_parameters", p.largest_unit},
      {"gathered_bytes", m.gathered},
      {"activation_bytes", m.activations},
      {"scratch_bytes", m.scratch},
      {"ep_buffer_bytes", m.ep_buffers},
      {"total_bytes", m.total()},
      {"fsdp_allgather_bytes", comm.allgather},
      {"fsdp_reduce_scatter_bytes", comm.reduce_scatter},
      {"ep_alltoall_bytes", comm.alltoall},
      {"tp_allreduce_bytes", comm.tp_allreduce},
      {"dp_allreduce_bytes", comm.dp_allreduce},
      {"comm_bytes", comm.total()},
  };
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

}  // namespace q3vl::app
