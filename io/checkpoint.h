// Hugging Face checkpoint directory <-> model weights. The key list and on-disk shapes come from
// model_param_specs(config); the caller maps each key to its f32 weight tensor (`lookup`).
//
// Loading converts tensor by tensor from the memory-mapped shards (F32, BF16 or F16 on disk), so a
// checkpoint never needs twice its size in memory. Errors name the key and the file: a missing tensor, a
// tensor the model does not have, a wrong shape (both shapes), an unconvertible dtype, and everything the
// safetensors reader rejects (truncated file, bad header JSON, offsets out of range, index/shard mismatch).
// A tied model (tie_word_embeddings) accepts a stored lm_head.weight only when it equals embed_tokens.
// Fused experts are read in the published layout (gate_up_proj [E, H, 2I], down_proj [E, I, H]) or in the
// transposed layout that transformers 5.x save_pretrained writes ([E, 2I, H], [E, H, I]), decided once per
// checkpoint by the shapes of its non-square expert tensors: a square one (H == 2I or H == I) fits both layouts,
// but the other expert tensor of its layer is then non-square. A checkpoint whose expert tensors disagree is
// refused, naming one tensor of each layout. Saving writes the published layout, except for a config with a square
// expert tensor: transformers 5.x would load that one untransposed, so all its expert tensors are written in
// transformers' layout.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "core/model/config.h"
#include "core/tensor.h"
#include "io/safetensors.h"

namespace q3vl::io {

// Returns the f32 host tensor that holds parameter `key` (its shape must be the spec's on-disk shape).
using WeightLookup = std::function<Tensor(const std::string& key)>;

// after_read(key), when set, runs once a tensor is in its destination: a sharded model hands every key the same
// staging tensor and takes its pieces from it there, so loading never holds more than one whole tensor.
void load_hf_weights(const std::string& dir, const ModelConfig& config, const WeightLookup& lookup,
                     const std::function<void(const std::string& key)>& after_read = {});

// Writes config.json and the weights in `dtype` (f32, bf16 or f16): model.safetensors, or shards of at most
// `max_shard_bytes` (0: no limit) with model.safetensors.index.json, in model_param_specs order.
// before_write(key), when set, runs just before a tensor's bytes are read (see StWriteEntry::prepare).
StDirLayout save_hf_checkpoint(const std::string& dir, const ModelConfig& config, const WeightLookup& lookup,
                               DType dtype, uint64_t max_shard_bytes,
                               const std::function<void(const std::string& key)>& before_write = {});

}  // namespace q3vl::io
