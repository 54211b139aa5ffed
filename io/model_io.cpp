// HF directory -> Model, Model -> HF directory, and HostBatch -> Batch.
#include "io/model_io.h"

#include <cstring>
#include <filesystem>

#include "io/checkpoint.h"
#include "io/hf_config.h"

namespace q3vl::io {

std::unique_ptr<Model> load_hf_model(const std::string& dir) {
  const ModelConfig config = read_hf_config((std::filesystem::path(dir) / "config.json").string());
  auto model = std::make_unique<Model>(config, DType::f32);
  load_hf_weights(dir, config, [&](const std::string& key) { return model->weights().at(key); });
  return model;
}

void save_hf_model(const std::string& dir, const Model& model, DType dtype, uint64_t max_shard_bytes,
                   const std::function<void(const std::string& key)>& before_write) {
  save_hf_checkpoint(dir, model.config(), [&](const std::string& key) { return model.weights().at(key); }, dtype,
                     max_shard_bytes, before_write);
}

BatchLimits batch_limits(const ModelConfig& config) {
  BatchLimits l;
  l.patch_features = config.vision.patch_features();
  l.spatial_merge_size = config.vision.spatial_merge_size;
  l.vocab_size = config.text.vocab_size;
  l.image_token_id = config.image_token_id;
  l.video_token_id = config.video_token_id;
  return l;
}

namespace {
size_t bytes_of(const HostBatch& h, DType dtype) {
  const size_t ids = Arena::aligned(h.input_ids.size() * 8);
  return 3 * ids + Arena::aligned(h.pixel_values.size() * dtype_size(dtype)) +
         Arena::aligned(h.pixel_values_videos.size() * dtype_size(dtype)) + Arena::aligned(h.image_grid_thw.size() * 8) +
         Arena::aligned(h.video_grid_thw.size() * 8) + 64;
}

Tensor copy_i64(Arena& arena, const std::vector<int64_t>& v, Shape shape) {
  Tensor t = Tensor::empty(arena, shape, DType::i64);
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(int64_t));
  return t;
}

Tensor copy_pixels(Arena& arena, const std::vector<float>& v, int64_t features, DType dtype) {
  const int64_t rows = static_cast<int64_t>(v.size()) / features;
  Tensor t = Tensor::empty(arena, {rows, features}, dtype);
  if (dtype == DType::f32) {
    std::memcpy(t.raw(), v.data(), v.size() * sizeof(float));
  } else {
    double* p = t.data<double>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = v[i];
  }
  return t;
}
}  // namespace

BatchTensors::BatchTensors(const HostBatch& h, DType dtype) : arena_("batch", bytes_of(h, dtype)) {
  const Shape bs{h.batch, h.seq_len};
  batch_.input_ids = copy_i64(arena_, h.input_ids, bs);
  if (!h.attention_mask.empty()) batch_.attention_mask = copy_i64(arena_, h.attention_mask, bs);
  if (!h.labels.empty()) batch_.labels = copy_i64(arena_, h.labels, bs);
  if (h.num_images() > 0) {
    batch_.pixel_values = copy_pixels(arena_, h.pixel_values, h.patch_features, dtype);
    batch_.image_grid_thw = copy_i64(arena_, h.image_grid_thw, {h.num_images(), 3});
  }
  if (h.num_videos() > 0) {
    batch_.pixel_values_videos = copy_pixels(arena_, h.pixel_values_videos, h.patch_features, dtype);
    batch_.video_grid_thw = copy_i64(arena_, h.video_grid_thw, {h.num_videos(), 3});
  }
}

}  // namespace q3vl::io
