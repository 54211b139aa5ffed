// Glue between files and the model: load a Hugging Face model directory (config.json + safetensors) into a
// q3vl Model, and turn a host batch read from HDF5 into the model's Batch of tensors.
#pragma once

#include <memory>
#include <functional>
#include <string>

#include "core/arena.h"
#include "core/model/model.h"
#include "io/hdf5_batch.h"

namespace q3vl::io {

// Reads DIR/config.json, builds the fp32 model and loads every weight (errors name key and file).
std::unique_ptr<Model> load_hf_model(const std::string& dir);

// Writes config.json and the weights of `model` into DIR as an HF checkpoint.
// before_write: see save_hf_checkpoint.
void save_hf_model(const std::string& dir, const Model& model, DType dtype, uint64_t max_shard_bytes,
                   const std::function<void(const std::string& key)>& before_write = {});

// The limits a batch must satisfy for `config` (feature count, merge size, vocabulary, placeholder counts).
BatchLimits batch_limits(const ModelConfig& config);

// Owns the tensors of one model Batch, copied from a HostBatch (pixels converted to `dtype`).
class BatchTensors {
 public:
  BatchTensors(const HostBatch& host, DType dtype);
  const Batch& batch() const { return batch_; }

 private:
  Arena arena_;
  Batch batch_;
};

}  // namespace q3vl::io
