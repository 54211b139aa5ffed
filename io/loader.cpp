// Loader: manifest + shards -> deterministic, cost-balanced rank split, prefetched training batches with
// resumable state.
#include "io/loader.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <numeric>
#include <thread>

#include "core/rng.h"
#include "io/patchify.h"

namespace q3vl::io {

namespace fs = std::filesystem;

int64_t SequenceCost::tokens() const {
  return std::accumulate(document_tokens.begin(), document_tokens.end(), int64_t{0});
}

std::string LoaderState::to_json() const {
  return nlohmann::json{{"seed", seed}, {"epoch", epoch}, {"position", position}}.dump();
}

LoaderState LoaderState::from_json(const std::string& text) {
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    return LoaderState{j.at("seed").get<uint64_t>(), j.at("epoch").get<int64_t>(), j.at("position").get<int64_t>()};
  } catch (const nlohmann::json::exception& e) {
    Q3VL_FAIL("loader state: invalid JSON '", text, "': ", e.what());
  }
}

void document_position_ids(const std::vector<int32_t>& tokens, const std::vector<ShardItem>& items, int64_t* t,
                           int64_t* h, int64_t* w) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  int64_t next_pos = 0;  // position of the next text token
  int64_t i = 0;         // next token to assign
  const auto text_until = [&](int64_t end) {
    for (; i < end; ++i) t[i] = h[i] = w[i] = next_pos++;
  };
  for (const ShardItem& item : items) {
    Q3VL_CHECK(item.token_offset >= i && item.token_offset < n, "position ids: item at token ", item.token_offset,
               " is out of order or outside the document of ", n, " tokens");
    const int32_t pad = tokens[item.token_offset];
    const int64_t rows = item.grid_h / 2, cols = item.grid_w / 2, span = rows * cols;
    int64_t run_start = item.token_offset;
    for (int32_t f = 0; f < item.grid_t; ++f) {
      if (f > 0) {
        run_start = i;
        while (run_start < n && tokens[run_start] != pad) ++run_start;
      }
      Q3VL_CHECK(run_start + span <= n, "position ids: item at token ", item.token_offset, " needs ", span,
                 " pad tokens for temporal patch ", f, " at token ", run_start);
      for (int64_t k = 0; k < span; ++k)
        Q3VL_CHECK(tokens[run_start + k] == pad, "position ids: token ", run_start + k, " is ", tokens[run_start + k],
                   ", expected pad ", pad, " of the item at token ", item.token_offset);
      text_until(run_start);
      const int64_t s = next_pos;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c, ++i) {
          t[i] = s;
          h[i] = s + r;
          w[i] = s + c;
        }
      next_pos = s + std::max(rows, cols);
    }
  }
  text_until(n);
}

namespace {

// Appends an item's normalised patches (patchify.h: images through the image processor's numerics, videos
// through the video processor's) and returns the patch count.
int64_t append_patches(const ShardItem& item, std::vector<float>& out) {
  std::vector<Image> frames(item.frames);
  const size_t frame_bytes = static_cast<size_t>(item.height) * item.width * 3;
  for (int32_t f = 0; f < item.frames; ++f) {
    frames[f].height = item.height;
    frames[f].width = item.width;
    frames[f].pixels.assign(item.pixels.begin() + f * frame_bytes, item.pixels.begin() + (f + 1) * frame_bytes);
  }
  PatchOptions options;
  options.fused_rescale = item.kind == VisionKind::video;
  const PatchGrid grid = patch_grid(item.frames, item.height, item.width, options);
  Q3VL_CHECK(grid.t == item.grid_t && grid.h == item.grid_h && grid.w == item.grid_w, "loader: item grid (",
             item.grid_t, ", ", item.grid_h, ", ", item.grid_w, ") disagrees with its ", item.frames, " frames of ",
             item.height, "x", item.width);
  const int64_t features = patch_features(options);
  const size_t start = out.size();
  out.resize(start + static_cast<size_t>(grid.patches() * features));
  const Tensor view(out.data() + start, DType::f32, Shape{grid.patches(), features});
  patchify_into(frames, options, view);
  return grid.patches();
}

SequenceCost cost_facts(const ShardSequence& seq) {
  SequenceCost facts;
  for (const ShardDocument& doc : seq.documents) {
    facts.document_tokens.push_back(static_cast<int64_t>(doc.tokens.size()));
    for (const ShardItem& item : doc.items)
      facts.item_patches.push_back(int64_t{item.grid_t} * item.grid_h * item.grid_w);
  }
  return facts;
}

}  // namespace

struct Loader::Impl {
  LoaderOptions options;
  Manifest manifest;
  std::vector<ShardReader> shards;
  std::vector<std::pair<int32_t, int64_t>> sequences;  // (shard, sequence in shard), manifest order
  int64_t per_rank = 0, batches_per_epoch = 0;
  std::vector<double> costs;  // per sequence (manifest order); filled only when balancing over several ranks

  // Background production.
  mutable std::mutex mutex;
  std::condition_variable cv;
  std::deque<Batch> queue;
  std::exception_ptr error;
  bool stop = false;
  LoaderState produce_state, consumed_state;
  std::thread worker;

  // This epoch's order of global sequence indices (Fisher-Yates driven by Philox(seed, epoch)).
  std::vector<int64_t> epoch_order(uint64_t seed, int64_t epoch) const {
    std::vector<int64_t> order(sequences.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    const Philox rng(seed, static_cast<uint64_t>(epoch));
    for (size_t i = order.size(); i > 1; --i) {
      const auto bits = rng.block(i);
      const uint64_t r = (uint64_t{bits[0]} << 32) | bits[1];
      std::swap(order[i - 1], order[r % i]);
    }
    return order;
  }

  double sequence_cost(const SequenceCost& facts, int64_t global) const {
    const int64_t patches = std::accumulate(facts.item_patches.begin(), facts.item_patches.end(), int64_t{0});
    const double c = options.cost ? options.cost(facts) : static_cast<double>(facts.tokens() + patches);
    const auto [shard, index] = sequences[global];
    Q3VL_CHECK(std::isfinite(c) && c >= 0, "loader: the cost of sequence ", index, " of shard ",
               shards[shard].path(), " is ", c, ", expected finite and >= 0");
    return c;
  }

  // Costs of every sequence, from the shards' in-memory index (no token or pixel reads).
  void compute_costs() {
    costs.resize(sequences.size());
    for (size_t g = 0; g < sequences.size(); ++g) {
      const auto [shard, index] = sequences[g];
      ShardSequenceSizes sizes = shards[shard].sequence_sizes(index);
      costs[g] = sequence_cost(SequenceCost{std::move(sizes.document_tokens), std::move(sizes.item_patches)},
                               static_cast<int64_t>(g));
    }
  }

  // The epoch positions (indices into the epoch's order) this rank takes at global step `position`, ascending.
  std::vector<int64_t> rank_positions(int64_t position, const std::vector<int64_t>& order) const {
    const int world = options.world;
    const int64_t spb = options.sequences_per_batch, first = position * world * spb;
    std::vector<int64_t> mine;
    if (costs.empty()) {
      for (int64_t s = 0; s < spb; ++s) mine.push_back(first + s * world + options.rank);
      return mine;
    }
    std::vector<int64_t> heaviest_first(static_cast<size_t>(world * spb));
    std::iota(heaviest_first.begin(), heaviest_first.end(), first);
    std::sort(heaviest_first.begin(), heaviest_first.end(), [&](int64_t a, int64_t b) {
      const double ca = costs[order[a]], cb = costs[order[b]];
      return ca != cb ? ca > cb : a < b;
    });
    std::vector<double> load(world, 0.0);
    std::vector<int64_t> count(world, 0);
    for (const int64_t p : heaviest_first) {
      int lightest = -1;
      for (int r = 0; r < world; ++r)
        if (count[r] < spb && (lightest < 0 || load[r] < load[lightest])) lightest = r;
      load[lightest] += costs[order[p]];
      ++count[lightest];
      if (lightest == options.rank) mine.push_back(p);
    }
    std::sort(mine.begin(), mine.end());
    return mine;
  }

  Batch build(const LoaderState& state, const std::vector<int64_t>& order) const {
    Batch b;
    b.cu_seqlens.push_back(0);
    std::vector<int64_t> pt, ph, pw;
    for (const int64_t p : rank_positions(state.position, order)) {
      const int64_t global = order[p];
      b.sequence_ids.push_back(global);
      const auto [shard, index] = sequences[global];
      const ShardSequence seq = shards[shard].read_sequence(index);
      b.cost += costs.empty() ? sequence_cost(cost_facts(seq), global) : costs[global];
      for (const ShardDocument& doc : seq.documents) {
        const size_t at = b.tokens.size();
        b.tokens.insert(b.tokens.end(), doc.tokens.begin(), doc.tokens.end());
        b.labels.insert(b.labels.end(), doc.labels.begin(), doc.labels.end());
        b.cu_seqlens.push_back(static_cast<int32_t>(b.tokens.size()));
        pt.resize(b.tokens.size());
        ph.resize(b.tokens.size());
        pw.resize(b.tokens.size());
        document_position_ids(doc.tokens, doc.items, pt.data() + at, ph.data() + at, pw.data() + at);
        for (const ShardItem& item : doc.items) {
          append_patches(item, b.pixel_values);
          b.grid_thw.insert(b.grid_thw.end(), {item.grid_t, item.grid_h, item.grid_w});
          b.item_kind.push_back(static_cast<uint8_t>(item.kind));
        }
      }
    }
    b.position_ids.reserve(3 * b.tokens.size());
    b.position_ids.insert(b.position_ids.end(), pt.begin(), pt.end());
    b.position_ids.insert(b.position_ids.end(), ph.begin(), ph.end());
    b.position_ids.insert(b.position_ids.end(), pw.begin(), pw.end());
    b.state_after = state;
    if (++b.state_after.position == batches_per_epoch) {
      b.state_after.position = 0;
      ++b.state_after.epoch;
    }
    return b;
  }

  void run() {
    try {
      LoaderState state;
      {
        const std::lock_guard<std::mutex> lock(mutex);
        state = produce_state;
      }
      std::vector<int64_t> order = epoch_order(state.seed, state.epoch);
      int64_t order_epoch = state.epoch;
      for (;;) {
        {
          std::unique_lock<std::mutex> lock(mutex);
          cv.wait(lock, [&] { return stop || static_cast<int>(queue.size()) < std::max(1, options.prefetch); });
          if (stop) return;
        }
        if (state.epoch != order_epoch) {
          order = epoch_order(state.seed, state.epoch);
          order_epoch = state.epoch;
        }
        Batch b = build(state, order);
        state = b.state_after;
        const std::lock_guard<std::mutex> lock(mutex);
        queue.push_back(std::move(b));
        cv.notify_all();
      }
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex);
      error = std::current_exception();
      cv.notify_all();
    }
  }

  void start(const LoaderState& state) {
    Q3VL_CHECK(state.epoch >= 0 && state.position >= 0 && state.position < batches_per_epoch, "loader: state epoch ",
               state.epoch, " position ", state.position, " is outside [0, ", batches_per_epoch,
               ") batches per epoch");
    produce_state = consumed_state = state;
    stop = false;
    error = nullptr;
    queue.clear();
    worker = std::thread([this] { run(); });
  }

  void halt() {
    {
      const std::lock_guard<std::mutex> lock(mutex);
      stop = true;
      cv.notify_all();
    }
    if (worker.joinable()) worker.join();
  }
};

Loader::Loader(const LoaderOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.options = options;
  Q3VL_CHECK(options.world >= 1 && options.rank >= 0 && options.rank < options.world, "loader: rank ", options.rank,
             " is outside world size ", options.world);
  Q3VL_CHECK(options.sequences_per_batch >= 1, "loader: sequences_per_batch must be at least 1");
  const fs::path dir(options.dir);
  s.manifest = read_manifest((dir / "manifest.json").string());
  for (size_t k = 0; k < s.manifest.shards.size(); ++k) {
    const ManifestShard& entry = s.manifest.shards[k];
    ShardReader reader = ShardReader::open((dir / entry.file).string());
    check_manifest_shard(s.manifest, entry, reader);
    for (int64_t i = 0; i < reader.counts().sequences; ++i) s.sequences.emplace_back(static_cast<int32_t>(k), i);
    s.shards.push_back(std::move(reader));
  }
  s.per_rank = static_cast<int64_t>(s.sequences.size()) / options.world;
  s.batches_per_epoch = s.per_rank / options.sequences_per_batch;
  Q3VL_CHECK(s.batches_per_epoch > 0, "loader: ", options.dir, " holds ", s.sequences.size(), " sequences, too few for ",
             options.world, " ranks of ", options.sequences_per_batch, " sequences per batch");
  if (options.balance && options.world > 1) s.compute_costs();
  s.start(options.state);
}

Loader::~Loader() { impl_->halt(); }

Batch Loader::next() {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lock(s.mutex);
  s.cv.wait(lock, [&] { return !s.queue.empty() || s.error; });
  if (s.queue.empty()) std::rethrow_exception(s.error);
  Batch b = std::move(s.queue.front());
  s.queue.pop_front();
  s.consumed_state = b.state_after;
  s.cv.notify_all();
  return b;
}

LoaderState Loader::state() const {
  const std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->consumed_state;
}

void Loader::restore(const LoaderState& state) {
  impl_->halt();
  impl_->start(state);
}

int64_t Loader::num_sequences() const { return static_cast<int64_t>(impl_->sequences.size()); }
int64_t Loader::batches_per_epoch() const { return impl_->batches_per_epoch; }
const Manifest& Loader::manifest() const { return impl_->manifest; }

}  // namespace q3vl::io
