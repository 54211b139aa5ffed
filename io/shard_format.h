// HDF5 shards of packed training sequences and the JSON manifest that lists them (io/shard_format.md
// describes every dataset). A shard holds packed sequences; a sequence holds whole documents (samples), each
// with its tokens, labels and vision items; an item holds its grid and its RESIZED pixels as uint8 RGB
// (normalisation and patchify happen when loading, so shards stay small).
//
// Readers refuse unknown format versions. ShardReader::open validates every dataset's type, shape and
// offsets before anything is read, so a corrupt or truncated shard fails at open with the file and the
// dataset named; read_manifest + check_manifest_shard do the same for a manifest that disagrees with a shard.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/chat_template.h"

namespace q3vl::io {

// Patch geometry of the stored grids (SPEC "Processor"): a grid cell is 16x16 pixels, 2 frames deep.
constexpr int32_t kPatchSize = 16;
constexpr int32_t kTemporalPatchSize = 2;

struct ShardItem {
  VisionKind kind = VisionKind::image;
  int32_t grid_t = 1, grid_h = 0, grid_w = 0;
  int64_t token_offset = 0;  // index of the item's first pad token within its document
  // Stored frames: 1 for an image (repeated to 2 at load), 2*grid_t for a video (already padded to even).
  int32_t frames = 1, height = 0, width = 0;  // height = grid_h*16, width = grid_w*16
  std::vector<uint8_t> pixels;                // [frames, height, width, 3] RGB
};

struct ShardDocument {
  int64_t source_file = 0;   // index into the manifest's `sources`
  int64_t sample_index = 0;  // the sample's line (JSON lines, 1-based) or record index (JSON array, 0-based)
  std::vector<int32_t> tokens;
  std::vector<int32_t> labels;
  std::vector<ShardItem> items;
};

struct ShardSequence {
  std::vector<ShardDocument> documents;
  int64_t num_tokens() const;
};

struct ShardSequenceSizes {
  std::vector<int64_t> document_tokens;  // per document
  std::vector<int64_t> item_patches;     // per item, grid t * h * w
};

struct ShardHeader {
  int32_t format_version = 0;
  std::string tokenizer_hash;
  int64_t token_budget = 0;
};

struct ShardCounts {
  int64_t sequences = 0, documents = 0, tokens = 0, items = 0, pixel_bytes = 0;
};

// Expected stored frame count of an item (1 for an image, 2*grid_t for a video).
int32_t stored_frames(VisionKind kind, int32_t grid_t);

// Writes one shard (replacing `path`); header.format_version must be kShardFormatVersion. Returns its counts.
ShardCounts write_shard(const std::string& path, const ShardHeader& header, const std::vector<ShardSequence>& sequences);

class ShardReader {
 public:
  // Opens and validates a shard; throws naming the file (and dataset) when anything is wrong.
  static ShardReader open(const std::string& path);

  ShardReader(ShardReader&&) noexcept;
  ShardReader& operator=(ShardReader&&) noexcept;
  ~ShardReader();

  const std::string& path() const;
  const ShardHeader& header() const;
  const ShardCounts& counts() const;
  // Tokens in sequence i (without reading them).
  int64_t sequence_tokens(int64_t i) const;
  // Token counts of sequence i's documents and patch counts (grid t * h * w) of its items, from the index
  // held in memory (reads no tokens or pixels).
  ShardSequenceSizes sequence_sizes(int64_t i) const;
  // Reads sequence i (hyperslab reads of the datasets it spans).
  ShardSequence read_sequence(int64_t i) const;

 private:
  struct Impl;
  explicit ShardReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// FNV-1a 64 of the tokenizer file's bytes, as "fnv1a64:<16 hex digits>" (ties shards to the tokenizer).
std::string tokenizer_file_hash(const std::string& path);

struct ManifestShard {
  std::string file;  // relative to the manifest's folder
  ShardCounts counts;
};

// manifest.json: what a pack run wrote (shards in loading order) and how (sources, tokenizer, budget).
struct Manifest {
  int32_t format_version = 0;
  std::string tokenizer_hash;
  int64_t token_budget = 0;
  std::vector<std::string> sources;
  std::vector<ManifestShard> shards;
  std::string summary_json;  // the pack summary as a JSON object text (informational)
};

void write_manifest(const std::string& path, const Manifest& manifest);
// Reads and checks a manifest (version, required fields); errors name the file and the field.
Manifest read_manifest(const std::string& path);
// Throws, naming the shard file and the disagreeing dataset or attribute, unless the shard matches its entry.
void check_manifest_shard(const Manifest& manifest, const ManifestShard& entry, const ShardReader& shard);

}  // namespace q3vl::io
