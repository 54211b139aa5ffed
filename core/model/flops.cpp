// FLOP model of training (see flops.h).
#include "core/model/flops.h"

#include <string>

#include "core/model/param_specs.h"

namespace q3vl {

FlopModel flop_model(const ModelConfig& c) {
  FlopModel f;
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
  f.text_attention_per_pair = 4.0 * c.text.num_attention_heads * c.text.head_dim * c.text.num_hidden_layers;
  f.vision_attention_per_pair = 4.0 * static_cast<double>(c.vision.hidden_size) * c.vision.depth;
  return f;
}

double train_flops_per_token(const FlopModel& m, int64_t seq) {
  const double pairs_per_token = (static_cast<double>(seq) + 1) / 2;
  return 3 * (2 * m.text_matmul_params + m.text_attention_per_pair * pairs_per_token);
}

double train_flops_per_patch(const FlopModel& m, int64_t patches) {
  return 3 * (2 * m.vision_matmul_params + m.vision_attention_per_pair * static_cast<double>(patches));
}

double train_flops(const FlopModel& m, std::span<const int64_t> document_tokens, std::span<const int64_t> item_patches) {
  double total = 0;
  for (const int64_t s : document_tokens) total += static_cast<double>(s) * train_flops_per_token(m, s);
  for (const int64_t p : item_patches) total += static_cast<double>(p) * train_flops_per_patch(m, p);
  return total;
}

}  // namespace q3vl
