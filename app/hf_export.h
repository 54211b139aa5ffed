// Export of a model as a Hugging Face folder that transformers' from_pretrained loads: config.json, the
// weights as (sharded) safetensors with an index, and the tokenizer files copied beside them. Written into
// DIR.tmp-<pid> and renamed to DIR at the end (an existing DIR is replaced only then).
#pragma once

#include <cstdint>
#include <functional>
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
};

// The tokenizer/processor files copied from a tokenizer folder when present.
const std::vector<std::string>& tokenizer_file_names();

void export_hf(const std::string& dir, const Model& model, const HfExportOptions& options);

}  // namespace q3vl::app
