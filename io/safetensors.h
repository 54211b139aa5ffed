// safetensors: a validating reader over a read-only memory map, a sharded-directory reader
// (model.safetensors.index.json or a single model.safetensors), and writers for single files, byte sinks and
// sharded directories in f32, bf16 or f16.
//
// File layout (the format of the `safetensors` crate): 8-byte little-endian header length N, N bytes of JSON
// {"__metadata__": {str: str}, key: {"dtype", "shape", "data_offsets": [begin, end]}, ...}, then the data
// buffer; offsets are relative to the buffer, tensors tile it exactly (no gaps, no overlaps, ends at the end of
// the file). The reader enforces all of that with errors naming the file and the tensor. Tensors are converted
// one at a time from the mapping, so loading never needs a second copy of a file in memory.
//
// The writer produces what the crate produces: tensors ordered by descending dtype alignment then by key
// (byte order), compact JSON with the fields in the order dtype, shape, data_offsets, "__metadata__" first,
// header padded with spaces to a multiple of 8 bytes. Files are written to "<path>.tmp" and renamed, so a
// failed write never leaves a truncated file under the final name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"

namespace q3vl::io {

// The crate's dtypes, in its order (increasing alignment; the writer sorts by it, descending).
enum class StDType : uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

size_t st_dtype_size(StDType dt);
std::string_view st_dtype_name(StDType dt);
std::optional<StDType> parse_st_dtype(std::string_view name);
// The q3vl dtype with the same bit layout, if any.
std::optional<DType> to_dtype(StDType dt);
StDType to_st_dtype(DType dt);

struct StTensorInfo {
  std::string key;
  StDType dtype = StDType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data buffer
  uint64_t end = 0;

  int64_t numel() const;
  std::string shape_str() const;  // "[2,3]"
};

// Converts (or copies) `src_bytes` holding `count` elements of `src_dtype` into the contiguous host tensor
// `dst`. Supported: F32/BF16/F16 -> f32 (exact), and any dtype into the q3vl dtype of the same layout (copy).
// `what` names the tensor in errors.
void convert_into(std::span<const std::byte> src_bytes, StDType src_dtype, const Tensor& dst, const std::string& what);

class SafetensorsFile {
 public:
  // Maps and validates `path`; throws q3vl::Error naming the file (and the tensor) on any defect.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<StTensorInfo>& tensors() const { return tensors_; }  // in file (offset) order
  size_t header_bytes() const { return header_bytes_; }

  const StTensorInfo* find(std::string_view key) const;
  const StTensorInfo& info(std::string_view key) const;  // throws naming the file and the key
  std::span<const std::byte> bytes(const StTensorInfo& t) const;
  // A tensor view over the mapping itself (read-only memory: never write through it). Needs a q3vl dtype.
  Tensor view(const StTensorInfo& t) const;
  // Converts the tensor `key` into `dst`, whose shape must equal the stored shape.
  void read(std::string_view key, const Tensor& dst) const;

 private:
  void unmap();

  std::string path_;
  const std::byte* map_ = nullptr;
  size_t map_size_ = 0;
  size_t header_bytes_ = 0;  // N, excluding the 8-byte length
  std::map<std::string, std::string> metadata_;
  std::vector<StTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
};

// A Hugging Face weights directory: `model.safetensors.index.json` (weight_map: key -> shard file) or a
// single `model.safetensors`. Every shard is validated when opened; the index and the shards must agree
// exactly (a key listed in the index but absent from its shard, or a shard tensor the index does not list,
// is an error naming both).
class SafetensorsDir {
 public:
  explicit SafetensorsDir(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::vector<std::string> keys() const;  // sorted
  bool contains(std::string_view key) const;
  const SafetensorsFile& file_of(std::string_view key) const;  // throws naming the directory and the key
  const StTensorInfo& info(std::string_view key) const;
  void read(std::string_view key, const Tensor& dst) const;
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  std::string dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t, std::less<>> file_index_;  // key -> files_ position
};

// One tensor to write: contiguous host memory, any q3vl dtype. Floating-point tensors (f32/bf16/f16) are
// stored in the writer's dtype; other dtypes are stored as they are.
struct StWriteEntry {
  std::string key;
  Tensor tensor;
  // Called just before the tensor's bytes are read, when set: a sharded model gathers the tensor then, so an
  // export streams instead of holding every tensor at once.
  std::function<void()> prepare = {};
};

// Writes one .safetensors file. `dtype` is f32, bf16 or f16.
void write_safetensors_file(const std::string& path, const std::vector<StWriteEntry>& entries, DType dtype,
                            const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// The bytes write_safetensors_file would write, handed to `sink` in order (a few calls per tensor) instead of
// going to a file: for writers that manage the file themselves (io/train_checkpoint.cpp: fsync, and a byte
// budget for fault injection). Everything is checked before the first call; `what` names the output in errors.
using StByteSink = std::function<void(const void* data, size_t size)>;
void write_safetensors(const StByteSink& sink, const std::string& what, const std::vector<StWriteEntry>& entries,
                       DType dtype, const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// The file names write_safetensors_dir produced.
struct StDirLayout {
  std::vector<std::string> files;                 // relative to the directory
  std::map<std::string, std::string> weight_map;  // key -> file; empty for a single file
  uint64_t total_size = 0;                        // tensor bytes over all files
};

// Writes `entries` into `dir` the way transformers' save_pretrained does: in entry order, a new shard starts
// when adding a tensor would exceed `max_shard_bytes` (a tensor larger than that gets a shard of its own);
// one shard is `model.safetensors`, several are `model-0000k-of-0000n.safetensors` plus
// `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}, sorted keys, indent 2).
// max_shard_bytes == 0 means no limit. Stale safetensors files and index from an earlier save are removed.
StDirLayout write_safetensors_dir(const std::string& dir, const std::vector<StWriteEntry>& entries, DType dtype,
                                  uint64_t max_shard_bytes);

}  // namespace q3vl::io
