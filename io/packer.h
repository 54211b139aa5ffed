// The library behind `q3vl pack`: reads samples in the messages format (JSON array or JSON lines), decodes
// and resizes their images and videos, applies the chat template, packs whole samples first-fit into
// sequences of at most `token_budget` tokens and writes HDF5 shards plus manifest.json (shard_format.h).
//
// Bad samples (unreadable JSON line, unknown role, empty assistant turn, tag/list count mismatch, missing or
// corrupt media, longer than the budget) are skipped, counted under their reason and named (file, line) in
// the summary; a run never stops for one sample. Errors that concern the whole run (unreadable input file,
// tokenizer, output folder) throw.
//
// Packing is first-fit over a window of `open_sequences` open sequences (the oldest is closed when a sample
// fits none and the window is full), so memory stays bounded; the result depends only on the input order.
// Samples are decoded in parallel in chunks (OpenMP) and packed in input order, so output is deterministic.
//
// Ranks: sample k (counted over all input files in order) belongs to rank k % world. pack_rank() packs one
// rank's slice into shard-RRRRR-NNNNN.h5 files and returns a RankResult; rank 0 gathers the results and
// calls write_pack_manifest(). Under MPI the results travel as rank_result_to_json() text; without MPI,
// separate processes write part files (write_rank_result) that a final merge reads.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

#include "io/chat_template.h"
#include "io/shard_format.h"
#include "io/tokenizer.h"

namespace q3vl::io {

// A decoded, resized image or video: frames of height x width RGB8 (height and width multiples of 32).
// Images have 1 frame; videos an even count (last frame repeated) and one timestamp per frame pair.
struct DecodedMedia {
  int32_t frames = 0, height = 0, width = 0;
  std::vector<uint8_t> pixels;  // [frames, height, width, 3]
  std::vector<double> timestamps;
};

// How pack decodes media (resize options are bound in by the caller). A function throws on a file it
// cannot decode; pack counts that as corrupt_media (missing files are caught before as missing_media).
struct MediaDecoder {
  std::function<DecodedMedia(const std::string& path)> image;
  std::function<DecodedMedia(const std::string& path)> video;
};

enum class PackMode { chat, caption };

struct PackOptions {
  std::vector<std::string> inputs;  // .json (array) or .jsonl files
  std::string out_dir;
  PackMode mode = PackMode::chat;
  int64_t token_budget = 8192;
  int64_t shard_bytes = int64_t{256} << 20;  // target shard size (tokens, labels and pixels)
  int open_sequences = 64;
  int chunk_samples = 64;  // samples decoded in parallel before packing them in order
  int rank = 0, world = 1;
  bool overwrite = false;  // pack() may replace an existing pack in out_dir
  std::ostream* progress = nullptr;  // progress lines, when set
};

struct SkippedSample {
  std::string file;
  int64_t line = 0;  // 1-based line (JSON lines) or 0-based record index (JSON array)
  SkipReason reason = SkipReason::bad_json;
  std::string message;
};

struct PackSummary {
  int64_t samples_in = 0, samples_packed = 0, sequences = 0, tokens = 0, images = 0, video_frames = 0;
  int64_t shards = 0, shard_bytes = 0, token_budget = 0;
  double seconds = 0;
  std::array<int64_t, kNumSkipReasons> skipped{};
  std::vector<SkippedSample> skipped_samples;

  int64_t skipped_total() const;
  // Padding a fixed-budget batch would need: 1 - tokens / (sequences * budget).
  double padding_ratio() const;
  void merge(const PackSummary& other);
  std::string to_json() const;
  static PackSummary from_json(const std::string& text);
  // Human-readable summary: counts, skips by reason, each skipped sample (file, line, reason, message).
  std::string report() const;
};

struct RankResult {
  PackSummary summary;
  std::vector<ManifestShard> shards;
};

// Packs this rank's slice (options.rank, options.world) into shards in options.out_dir (created if needed).
RankResult pack_rank(const PackOptions& options, const Tokenizer& tokenizer, const std::string& tokenizer_hash,
                     const MediaDecoder& media);

std::string rank_result_to_json(const RankResult& result);
RankResult rank_result_from_json(const std::string& text);
// Part files for multi-process runs without MPI: OUT/part-RRRRR.json.
std::string rank_result_path(const std::string& out_dir, int rank);
void write_rank_result(const std::string& path, const RankResult& result);
RankResult read_rank_result(const std::string& path);

// Rank 0: writes OUT/manifest.json listing the ranks' shards in rank order, returns the merged summary.
PackSummary write_pack_manifest(const PackOptions& options, const std::string& tokenizer_hash,
                                const std::vector<RankResult>& ranks);

// The output folder: a pack is written into a staging folder beside it (OUT.tmp-TAG) and renamed to OUT only
// once its manifest is written, so a failed or killed pack never leaves a partial or empty OUT, and an existing
// pack is replaced only when asked for (--overwrite).
// Throws unless out_dir is absent or an empty folder, or `overwrite` is set and out_dir holds a pack (a
// manifest.json: --overwrite never deletes a folder that is not a pack).
void check_pack_output(const std::string& out_dir, bool overwrite);
// OUT.tmp-TAG beside out_dir OUT.
std::string pack_staging_dir(const std::string& out_dir, const std::string& tag);
// Renames the complete staging folder to out_dir, replacing what check_pack_output allowed there.
void publish_pack_output(const std::string& staging, const std::string& out_dir);

// Single process (world 1): check_pack_output, pack_rank + write_pack_manifest into a staging folder, publish.
PackSummary pack(const PackOptions& options, const Tokenizer& tokenizer, const std::string& tokenizer_hash,
                 const MediaDecoder& media);

}  // namespace q3vl::io
