// The trainer's data loader: reads the shards listed in a pack manifest, shuffles the packed sequences
// deterministically by (seed, epoch), gives each data-parallel rank its share of every global batch, and
// builds batches on a background thread: tokens, labels, cu_seqlens (one attention block per document), 3-D
// position ids (SPEC get_rope_index, restarting per document), normalised patches and grids.
//
// State: (seed, epoch, position) is everything the order depends on (the shuffle is a pure function of
// seed and epoch through counter-based Philox), so a checkpoint saves state() and a resume passes it to
// restore() (or LoaderOptions::state) and continues with exactly the batches it would have produced.
//
// Order: each epoch permutes all N sequences. Global step p of the epoch (position p) takes the permuted
// entries [p * world * spb, (p + 1) * world * spb), spb = sequences_per_batch; the epoch has
// (N / world) / spb steps (the remainder is dropped so ranks stay in step). Within a step the sequences go
// to ranks either
//   - balanced (LoaderOptions::balance, the default): longest-processing-time greedy on each sequence's cost
//     (LoaderOptions::cost), heaviest first (ties: lower permuted position), each to the rank with the least
//     cost so far that holds fewer than spb (ties: lower rank), so one rank's images do not make every rank
//     wait at the gradient reduction. Every rank computes the same assignment from the shards' index alone;
//   - strided: rank r takes the step's entries r, r + world, ...
// A rank keeps its sequences in permuted order. Both modes give a step the same set of sequences, so they
// train the same model up to floating-point summation order. Opening validates every shard against the
// manifest (errors name the file and dataset).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/shard_format.h"

namespace q3vl::io {

struct LoaderState {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t position = 0;  // next global step within the epoch (this rank's next batch)
  std::string to_json() const;
  static LoaderState from_json(const std::string& text);
  bool operator==(const LoaderState&) const = default;
};

// What a packed sequence's training cost depends on.
struct SequenceCost {
  std::vector<int64_t> document_tokens;  // per document
  std::vector<int64_t> item_patches;     // per vision item: grid t * h * w
  int64_t tokens() const;
};

struct LoaderOptions {
  std::string dir;  // the pack output folder (manifest.json and shards)
  LoaderState state;  // where to start (seed, epoch, position)
  int rank = 0, world = 1;
  int sequences_per_batch = 1;
  int prefetch = 2;  // batches built ahead on the background thread
  bool balance = true;  // balanced (true) or strided assignment of a step's sequences to ranks
  // A sequence's cost, finite and >= 0; unset: tokens + patches. Called from the loader's threads, so it must
  // be a pure function, the same on every rank.
  std::function<double(const SequenceCost&)> cost;
};

struct Batch {
  std::vector<int32_t> tokens, labels;       // [N], the batch's sequences concatenated
  std::vector<int32_t> cu_seqlens;           // [documents + 1], document boundaries in tokens
  std::vector<int64_t> position_ids;         // [3, N] row-major: T, H, W rows
  std::vector<float> pixel_values;           // [patches, 1536], items in sequence order
  std::vector<int32_t> grid_thw;             // [items, 3], items in sequence order
  std::vector<uint8_t> item_kind;            // [items], 0 image, 1 video
  std::vector<int64_t> sequence_ids;         // global index (manifest order) of each packed sequence
  double cost = 0;                           // sum of its sequences' LoaderOptions::cost
  LoaderState state_after;                   // the loader state once this batch is consumed
  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
};

// SPEC get_rope_index for one document: text runs count up on all three rows; each vision span (an image,
// or one temporal patch of a video) starting at s takes T = s, H = s + row, W = s + col over its merged
// grid, and the next text starts at s + max(h', w'). `items` are the document's items in sequence order;
// an item's first pad run starts at item.token_offset (its pad id is the token there; a video's later runs
// are the next runs of that id). Writes tokens.size() values to each of t, h, w.
void document_position_ids(const std::vector<int32_t>& tokens, const std::vector<ShardItem>& items, int64_t* t,
                           int64_t* h, int64_t* w);

class Loader {
 public:
  explicit Loader(const LoaderOptions& options);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // The next batch (waits for the background thread; rethrows its errors).
  Batch next();
  // State after the last batch returned by next() (the options' state before the first).
  LoaderState state() const;
  // Continues from `state` (drops batches built ahead).
  void restore(const LoaderState& state);

  int64_t num_sequences() const;        // in the manifest
  int64_t batches_per_epoch() const;    // global steps per epoch (one batch per rank each)
  const Manifest& manifest() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace q3vl::io
