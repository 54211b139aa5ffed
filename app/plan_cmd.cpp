// q3vl plan --model FLAVOR_OR_DIR [--tokens N] [--seq-len S] [--patches-per-image P]: parameter counts
// (total, vision, active per text token), training FLOPs per token and per image patch, and the memory of
// fp32 weights, gradients, AdamW states and activations for N tokens on one rank (the CPU backend's layout).
//
// FLOP model: a matmul with p active weights costs 2p FLOPs per token forward; causal attention over a
// document of S tokens costs 4 * heads * head_dim * (S+1)/2 per token and layer forward (QK^T and PV);
// training = 3 x forward (backward = 2 x forward). MoE layers count top-k of E experts plus the router.
#include <cstdio>

#include "app/cli_args.h"
#include "app/commands.h"
#include "core/model/model.h"
#include "core/model/param_specs.h"
#include "io/hf_config.h"

namespace q3vl::app {

namespace {

struct FlopsPerToken {
  double text_matmul_params = 0;    // active weights a text token multiplies (incl. lm_head)
  double vision_matmul_params = 0;  // weights a patch multiplies (mergers per patch: / merge unit)
};

FlopsPerToken matmul_params(const ModelConfig& c) {
  FlopsPerToken f;
  const double expert_share = c.text.num_experts > 0 ? double(c.text.num_experts_per_tok) / c.text.num_experts : 0;
  for (const ParamSpec& s : model_param_specs(c)) {
    const double n = static_cast<double>(s.numel());
    if (s.tower == ParamTower::vision) {
      if (s.kind != ParamKind::matrix) continue;  // the position table is a lookup
      const bool merger = s.hf_key.find("merger") != std::string::npos;
      f.vision_matmul_params += merger ? n / static_cast<double>(c.vision.merge_unit()) : n;
      continue;
    }
    if (s.kind == ParamKind::experts) f.text_matmul_params += n * expert_share;
    else if (s.kind == ParamKind::matrix) f.text_matmul_params += n;
    else if (s.kind == ParamKind::embedding && c.tie_word_embeddings) f.text_matmul_params += n;  // tied lm_head
  }
  return f;
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) { b /= 1024; ++u; }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f %s", b, units[u]);
  return buf;
}

}  // namespace

int run_plan(const std::vector<std::string>& args) {
  const CliArgs a(args, "plan", {"--model", "--tokens", "--seq-len", "--patches-per-image"}, {});
  const std::string name = a.required("--model");
  const ModelConfig c = io::load_model_config(name);
  const int64_t tokens = a.get_int("--tokens", 4096, 1);
  const int64_t seq = a.get_int("--seq-len", tokens, 1);
  const int64_t patches = a.get_int("--patches-per-image", 1024, 4);

  const int64_t total = count_parameters(c), vision = count_vision_parameters(c);
  const int64_t active = count_active_text_parameters(c);
  const FlopsPerToken mp = matmul_params(c);
  const double ctx = (static_cast<double>(seq) + 1) / 2;
  const double attn_fwd = 4.0 * c.text.num_attention_heads * c.text.head_dim * ctx * c.text.num_hidden_layers;
  const double text_train = 3 * (2 * mp.text_matmul_params + attn_fwd);
  const double vis_attn_fwd = 4.0 * c.vision.hidden_size * static_cast<double>(patches) * c.vision.depth;
  const double vis_train = 3 * (2 * mp.vision_matmul_params + vis_attn_fwd);

  BatchShape shape;
  shape.batch = 1;
  shape.seq = tokens;
  const double w = 4.0 * total, g = 4.0 * total, adam = 8.0 * total;
  const double acts = static_cast<double>(Workspace::activation_bytes(c, shape, DType::f32));
  const double scratch = static_cast<double>(Workspace::scratch_bytes(c, shape, DType::f32));

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
              "\"grad_bytes\":%.0f,\"adamw_bytes\":%.0f,\"activation_bytes\":%.0f,\"scratch_bytes\":%.0f}\n",
              name.c_str(), (long long)total, (long long)vision, (long long)active, text_train, vis_train, (long long)tokens,
              w, g, adam, acts, scratch);
  return 0;
}

}  // namespace q3vl::app
