// Hugging Face config.json <-> ModelConfig for model_type "qwen3_vl_moe" and "qwen3_vl", and the named
// flavors in jobs/flavors/<name>.json (HF-style config.json files).
//
// Reading follows what transformers builds from the file:
// - a key the file omits takes the default of HF's config class (Qwen3VL(Moe)TextConfig / VisionConfig /
//   Qwen3VL(Moe)Config), not the 30B values of ModelConfig's own defaults;
// - tie_word_embeddings is read at the top level only: the composite config decides the tying, and a
//   text_config.tie_word_embeddings (which HF's save writes as `true` even for the untied 30B/235B
//   models) is ignored;
// - rope settings come from the legacy text_config.rope_theta + rope_scaling {rope_type|type,
//   mrope_section, mrope_interleaved} or from transformers v5's rope_parameters {rope_type, rope_theta,
//   mrope_section, mrope_interleaved}; the rope type must be "default" (or the legacy "mrope");
// - num_experts may be spelled num_local_experts (v5's serialisation).
//
// Unknown keys are errors naming the key path and the file. Accepted besides the fields ModelConfig
// holds, because they do not change what the model computes (or are checked to their only supported value):
//   top level:  architectures (must name the class of model_type), transformers_version, q3vl_version (the q3vl that exported it), dtype,
//               torch_dtype, _name_or_path, use_cache, bos/eos/pad_token_id, initializer_range
//   text:       model_type (qwen3_vl_moe_text / qwen3_vl_text), dtype, torch_dtype, use_cache,
//               bos/eos/pad_token_id, tie_word_embeddings (ignored, see above), attention_dropout (0 only),
//               sliding_window (null only), use_sliding_window (false only), layer_types (all
//               "full_attention"), output_router_logits, norm_topk_prob (true only)
//   vision:     model_type, dtype, torch_dtype, initializer_range, rope_parameters {rope_type "axial",
//               rope_theta} (transformers 5.x; rope_theta sets VisionConfig::rope_theta, default 1e4)
// Inconsistent values (kv heads not dividing heads, top-k above the expert count, mrope sections not summing
// to head_dim/2, deepstack index outside the vision depth, mlp_only_layers outside the text depth, ...)
// are errors naming the file and the key.
#pragma once

#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/model/config.h"

namespace q3vl::io {

// Parses config.json text; `source` names the file in errors.
ModelConfig parse_hf_config(const std::string& json_text, const std::string& source);
ModelConfig read_hf_config(const std::string& path);

// config.json text (sorted keys, indent 2, trailing newline) in the layout of the published Qwen3-VL
// configs (legacy rope_scaling + rope_theta, which transformers 4.57 and 5.x both read). `dtype` is recorded
// as the checkpoint's "dtype" (float32 / bfloat16 / float16).
std::string hf_config_json(const ModelConfig& config, DType dtype = DType::bf16);
void write_hf_config(const std::string& path, const ModelConfig& config, DType dtype = DType::bf16);

// The flavors folder: $Q3VL_FLAVORS_DIR, else the first `jobs/flavors` found walking up from the running
// executable's directory, then from the working directory.
std::string flavors_dir();
std::vector<std::string> flavor_names();  // sorted

// `name_or_path` is a directory holding config.json, a .json file, or a flavor name (tiny-moe, tiny-dense,
// 2B, 4B, 8B, 32B, 30B-A3B, 235B-A22B).
ModelConfig load_model_config(const std::string& name_or_path);

}  // namespace q3vl::io
