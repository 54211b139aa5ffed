// Export of a model as a Hugging Face folder that transformers' from_pretrained loads: config.json, the
// weights as (sharded) safetensors with an index, and the tokenizer files copied beside them. Written into
// DIR.tmp-<pid> and renamed to DIR at the end (an existing DIR is replaced only then).
// HF's model has no router score bias (moe.balance: bias | aux+bias): when the run has one, it goes to the side
// file DIR/router_bias.safetensors ("model.language_model.layers.<l>.mlp.gate.score_bias" f32 [E] per MoE
// layer), which from_pretrained ignores, so routing at inference differs from training unless the bias is
// added back (to the softmax probabilities, for choosing the top-k only).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string>
#include <vector>

#include "core/model/model.h"
#include "io/checkpoint.h"

namespace q3vl::app {

struct HfExportOptions {
  DType dtype = DType::bf16;                   // f32, bf16 or f16 on disk
  uint64_t max_shard_bytes = uint64_t{4} << 30;  // 0: one file
  std::string tokenizer_dir;                   // folder whose tokenizer files are copied (empty: none)
  // Runs just before each tensor is written (a sharded model gathers it into the weight store then).
  std::function<void(const std::string& key)> before_write;
  // Where each tensor's values are read (whole, HF-shaped); default: the model's weight store.
  io::WeightLookup lookup;
  Tensor router_bias;  // f32 [MoE layers, E] written to router_bias.safetensors; undefined: none
};

inline constexpr const char* kRouterBiasFile = "router_bias.safetensors";
// What the caller prints when it exports a router bias.
std::string router_bias_warning(const std::string& dir);

// The tokenizer/processor files copied from a tokenizer folder when present.
const std::vector<std::string>& tokenizer_file_names();

void export_hf(const std::string& dir, const Model& model, const HfExportOptions& options);

}  // namespace q3vl::app
