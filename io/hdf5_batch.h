// HDF5 files of `q3vl forward`: the input batch (token ids, mask, labels, image and video patches with their
// grids, as HF's processor produces them) and the outputs (float32 arrays and scalars).
//
// Input schema (root datasets; anything else in the file is an error naming it):
//   input_ids            int64   [B, S]   required
//   attention_mask       int64   [B, S]   optional; 0/1, right-padded (ones then zeros), >= 1 token per row
//   labels               int64   [B, S]   optional; -100 (ignored) or a token id
//   pixel_values         float32 [N, F]   with image_grid_thw int64 [n, 3]: sum of t*h*w over images = N
//   pixel_values_videos  float32 [M, F]   with video_grid_thw int64 [m, 3]: sum of t*h*w over videos = M
// F = in_channels * temporal_patch * patch^2 (1536). Grid entries are >= 1 and h, w are multiples of the spatial
// merge size. Every violation is an error naming the file and the dataset.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace q3vl::io {

struct HostBatch {
  int64_t batch = 0, seq_len = 0;
  std::vector<int64_t> input_ids;          // [batch, seq_len]
  std::vector<int64_t> attention_mask;     // [batch, seq_len], empty when absent
  std::vector<int64_t> labels;             // [batch, seq_len], empty when absent
  int64_t patch_features = 0;              // F
  std::vector<float> pixel_values;         // [image_patches, F]
  std::vector<int64_t> image_grid_thw;     // [images, 3]
  std::vector<float> pixel_values_videos;  // [video_patches, F]
  std::vector<int64_t> video_grid_thw;     // [videos, 3]

  int64_t num_images() const { return static_cast<int64_t>(image_grid_thw.size()) / 3; }
  int64_t num_videos() const { return static_cast<int64_t>(video_grid_thw.size()) / 3; }
  int64_t image_patches() const;
  int64_t video_patches() const;
};

struct BatchLimits {
  int64_t patch_features = 1536;
  int64_t spatial_merge_size = 2;
  int64_t vocab_size = 0;       // > 0: input_ids and labels must be below it
  int64_t image_token_id = -1;  // >= 0: count of this token must equal image_patches / merge^2
  int64_t video_token_id = -1;  // >= 0: same for videos
};

HostBatch read_hdf5_batch(const std::string& path, const BatchLimits& limits = {});

// Writes a batch in the input schema (for tests and for tools that prepare `q3vl forward` inputs).
void write_hdf5_batch(const std::string& path, const HostBatch& batch);

// Output file: created as "<path>.tmp" and renamed onto `path` by close(), so a failed run never leaves a
// partial file under the final name (the destructor of an unclosed writer removes the temporary file).
// Names may contain '/' (intermediate groups are created).
class Hdf5Writer {
 public:
  explicit Hdf5Writer(const std::string& path);
  ~Hdf5Writer();
  Hdf5Writer(const Hdf5Writer&) = delete;
  Hdf5Writer& operator=(const Hdf5Writer&) = delete;

  void write(const std::string& name, const float* data, const std::vector<int64_t>& shape);
  void write(const std::string& name, const int64_t* data, const std::vector<int64_t>& shape);
  void write(const std::string& name, const double* data, const std::vector<int64_t>& shape);
  void write(const std::string& name, const int32_t* data, const std::vector<int64_t>& shape);
  // A contiguous host f32 tensor (an f64 tensor is rounded to f32).
  void write(const std::string& name, const Tensor& t);
  void write_scalar(const std::string& name, double value);   // float64 scalar dataset
  void write_scalar(const std::string& name, int64_t value);  // int64 scalar dataset
  void close();

 private:
  std::string path_, tmp_path_;
  int64_t file_ = -1;  // hid_t
};

// A float32 dataset read back (scalars have an empty shape).
struct F32Array {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
F32Array read_hdf5_f32(const std::string& path, const std::string& name);
double read_hdf5_scalar(const std::string& path, const std::string& name);  // any float/int scalar

}  // namespace q3vl::io
