// q3vl pack: samples -> media decode -> chat template -> first-fit packing -> HDF5 shards and manifest.
#include "io/packer.h"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <sstream>
#include <system_error>

#include <unistd.h>

#include "core/human_units.h"
#include "io/io_version.h"

namespace q3vl::io {

namespace fs = std::filesystem;
using nlohmann::json;

int64_t PackSummary::skipped_total() const {
  int64_t n = 0;
  for (int64_t s : skipped) n += s;
  return n;
}

double PackSummary::padding_ratio() const {
  if (sequences == 0 || token_budget == 0) return 0.0;
  return 1.0 - static_cast<double>(tokens) / (static_cast<double>(sequences) * static_cast<double>(token_budget));
}

void PackSummary::merge(const PackSummary& o) {
  samples_in += o.samples_in;
  samples_packed += o.samples_packed;
  sequences += o.sequences;
  tokens += o.tokens;
  images += o.images;
  video_frames += o.video_frames;
  shards += o.shards;
  shard_bytes += o.shard_bytes;
  token_budget = o.token_budget;
  seconds = std::max(seconds, o.seconds);
  for (int r = 0; r < kNumSkipReasons; ++r) skipped[r] += o.skipped[r];
  skipped_samples.insert(skipped_samples.end(), o.skipped_samples.begin(), o.skipped_samples.end());
}

std::string PackSummary::to_json() const {
  json j = {{"samples_in", samples_in}, {"samples_packed", samples_packed}, {"sequences", sequences},
            {"tokens", tokens},         {"images", images},                 {"video_frames", video_frames},
            {"shards", shards},         {"shard_bytes", shard_bytes},       {"token_budget", token_budget},
            {"seconds", seconds},       {"padding_ratio", padding_ratio()}};
  json by_reason = json::object();
  for (int r = 0; r < kNumSkipReasons; ++r) by_reason[skip_reason_name(static_cast<SkipReason>(r))] = skipped[r];
  j["skipped"] = by_reason;
  j["skipped_samples"] = json::array();
  for (const SkippedSample& s : skipped_samples)
    j["skipped_samples"].push_back(
        {{"file", s.file}, {"line", s.line}, {"reason", skip_reason_name(s.reason)}, {"message", s.message}});
  return j.dump();
}

PackSummary PackSummary::from_json(const std::string& text) {
  const json j = json::parse(text);
  PackSummary s;
  s.samples_in = j.at("samples_in");
  s.samples_packed = j.at("samples_packed");
  s.sequences = j.at("sequences");
  s.tokens = j.at("tokens");
  s.images = j.at("images");
  s.video_frames = j.at("video_frames");
  s.shards = j.at("shards");
  s.shard_bytes = j.at("shard_bytes");
  s.token_budget = j.at("token_budget");
  s.seconds = j.at("seconds");
  for (int r = 0; r < kNumSkipReasons; ++r) s.skipped[r] = j.at("skipped").at(skip_reason_name(static_cast<SkipReason>(r)));
  for (const json& e : j.at("skipped_samples")) {
    SkippedSample k{e.at("file"), e.at("line"), SkipReason::bad_json, e.at("message")};
    for (int r = 0; r < kNumSkipReasons; ++r)
      if (e.at("reason") == skip_reason_name(static_cast<SkipReason>(r))) k.reason = static_cast<SkipReason>(r);
    s.skipped_samples.push_back(k);
  }
  return s;
}

std::string PackSummary::report() const {
  std::ostringstream os;
  os << "samples in " << samples_in << ", packed " << samples_packed << ", skipped " << skipped_total() << "\n"
     << "sequences " << sequences << " (budget " << token_budget << "), tokens " << tokens << ", padding ratio "
     << padding_ratio() << "\n"
     << "images " << images << ", video frames " << video_frames << "\n"
     << "shards " << shards << ", " << shard_bytes << " bytes\n";
  if (seconds > 0)
    os << "time " << seconds << " s: " << samples_in / seconds << " samples/s, " << images / seconds
       << " images/s\n";
  for (int r = 0; r < kNumSkipReasons; ++r)
    if (skipped[r] > 0) os << "skipped " << skip_reason_name(static_cast<SkipReason>(r)) << ": " << skipped[r] << "\n";
  for (const SkippedSample& s : skipped_samples)
    os << "  " << s.file << ":" << s.line << ": " << skip_reason_name(s.reason) << ": " << s.message << "\n";
  return os.str();
}

namespace {

// One input record before decoding: its text (JSON lines) or parsed value (JSON array).
struct RawSample {
  int64_t file_index = 0;
  int64_t line = 0;
  std::string text;
  std::optional<json> value;
};

// A sample ready to pack, or the reason it was skipped.
struct PreparedSample {
  std::optional<SkippedSample> skipped;
  ShardDocument document;
  int64_t images = 0, video_frames = 0;
};

std::string resolve_media_path(const std::string& input_file, const std::string& media) {
  const fs::path p(media);
  return p.is_absolute() ? media : (fs::path(input_file).parent_path() / p).string();
}

int count_tag(const std::string& s, std::string_view tag) {
  int n = 0;
  for (size_t at = s.find(tag); at != std::string::npos; at = s.find(tag, at + tag.size())) ++n;
  return n;
}

std::vector<std::string> string_list(const json& sample, const char* key) {
  std::vector<std::string> out;
  if (!sample.contains(key)) return out;
  const json& list = sample.at(key);
  if (!list.is_array()) throw SampleError(SkipReason::bad_json, std::string("'") + key + "' is not a list");
  for (const json& e : list) {
    if (!e.is_string()) throw SampleError(SkipReason::bad_json, std::string("'") + key + "' holds a non-string");
    out.push_back(e.get<std::string>());
  }
  return out;
}

struct DecodedItem {
  ShardItem item;
  std::vector<double> timestamps;
};

DecodedItem decode_item(const MediaDecoder& media, const std::string& input_file, const std::string& rel,
                        VisionKind kind) {
  const std::string path = resolve_media_path(input_file, rel);
  const std::string what = kind == VisionKind::image ? "image" : "video";
  if (!fs::exists(path)) throw SampleError(SkipReason::missing_media, what + " " + path + " does not exist");
  const auto& decode = kind == VisionKind::image ? media.image : media.video;
  Q3VL_CHECK(static_cast<bool>(decode), "pack: no ", what, " decoder is configured");
  DecodedMedia d;
  try {
    d = decode(path);
  } catch (const std::exception& e) {
    throw SampleError(SkipReason::corrupt_media, what + " " + path + ": " + e.what());
  }
  const bool frames_ok = kind == VisionKind::image ? d.frames == 1 : (d.frames >= 2 && d.frames % 2 == 0);
  if (!frames_ok || d.height <= 0 || d.width <= 0 || d.height % (2 * kPatchSize) != 0 ||
      d.width % (2 * kPatchSize) != 0 || d.pixels.size() != static_cast<size_t>(d.frames) * d.height * d.width * 3 ||
      (kind == VisionKind::video && static_cast<int32_t>(d.timestamps.size()) != d.frames / 2))
    throw SampleError(SkipReason::corrupt_media, what + " " + path + ": the decoder returned " +
                                                     std::to_string(d.frames) + " frames of " +
                                                     std::to_string(d.height) + "x" + std::to_string(d.width) +
                                                     ", not a valid resized item");
  DecodedItem out;
  ShardItem& item = out.item;
  item.kind = kind;
  item.grid_t = kind == VisionKind::image ? 1 : d.frames / kTemporalPatchSize;
  item.grid_h = d.height / kPatchSize;
  item.grid_w = d.width / kPatchSize;
  item.frames = d.frames;
  item.height = d.height;
  item.width = d.width;
  item.pixels = std::move(d.pixels);
  out.timestamps = std::move(d.timestamps);
  return out;
}

PreparedSample prepare(const RawSample& raw, const PackOptions& options, const ChatTemplate& chat,
                       const MediaDecoder& media) {
  PreparedSample out;
  const std::string& file = options.inputs[raw.file_index];
  try {
    json sample;
    if (raw.value) {
      sample = *raw.value;
    } else {
      try {
        sample = json::parse(raw.text);
      } catch (const json::exception& e) {
        throw SampleError(SkipReason::bad_json, std::string("unreadable JSON: ") + e.what());
      }
    }
    if (!sample.is_object()) throw SampleError(SkipReason::bad_json, "a sample must be a JSON object");
    const std::vector<std::string> images = string_list(sample, "images");
    const std::vector<std::string> videos = string_list(sample, "videos");
    std::vector<ChatMessage> messages;
    std::optional<std::string> caption;
    if (sample.contains("messages")) {
      const json& list = sample.at("messages");
      if (!list.is_array()) throw SampleError(SkipReason::bad_json, "'messages' is not a list");
      for (const json& m : list) {
        if (!m.is_object() || !m.contains("role") || !m.contains("content") || !m.at("role").is_string() ||
            !m.at("content").is_string())
          throw SampleError(SkipReason::bad_json, "a message needs string 'role' and 'content'");
        messages.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
      }
    } else if (options.mode == PackMode::caption && sample.contains("caption") && sample.at("caption").is_string()) {
      caption = sample.at("caption").get<std::string>();
    } else {
      throw SampleError(SkipReason::bad_json, "a sample needs 'messages' (or 'caption' in caption mode)");
    }
    // Cheap checks first, so a bad sample never costs a media decode.
    if (!messages.empty()) check_chat_roles(messages);
    int image_tags = 0, video_tags = 0;
    for (const ChatMessage& m : messages) {
      if (m.role == "assistant") caption = m.content;
      image_tags += count_tag(m.content, "<image>");
      video_tags += count_tag(m.content, "<video>");
    }
    if (messages.empty() && !caption) throw SampleError(SkipReason::empty_assistant, "no messages");
    if (options.mode == PackMode::chat &&
        (image_tags != static_cast<int>(images.size()) || video_tags != static_cast<int>(videos.size())))
      throw SampleError(SkipReason::tag_mismatch, std::to_string(image_tags) + " <image> tags for " +
                                                      std::to_string(images.size()) + " images, " +
                                                      std::to_string(video_tags) + " <video> tags for " +
                                                      std::to_string(videos.size()) + " videos");
    if (options.mode == PackMode::caption && (images.size() != 1 || !videos.empty()))
      throw SampleError(SkipReason::tag_mismatch, "caption mode needs exactly one image and no video, got " +
                                                      std::to_string(images.size()) + " images and " +
                                                      std::to_string(videos.size()) + " videos");

    std::vector<DecodedItem> image_items, video_items;
    std::vector<VisionGrid> image_grids, video_grids;
    for (const std::string& rel : images) {
      image_items.push_back(decode_item(media, file, rel, VisionKind::image));
      const ShardItem& it = image_items.back().item;
      image_grids.push_back(VisionGrid{VisionKind::image, 1, it.grid_h, it.grid_w, {}});
      out.images += 1;
    }
    for (const std::string& rel : videos) {
      video_items.push_back(decode_item(media, file, rel, VisionKind::video));
      const DecodedItem& d = video_items.back();
      video_grids.push_back(VisionGrid{VisionKind::video, d.item.grid_t, d.item.grid_h, d.item.grid_w, d.timestamps});
      out.video_frames += d.item.frames;
    }
    const TemplateOutput t = options.mode == PackMode::caption ? chat.caption(image_grids.at(0), *caption)
                                                               : chat.apply(messages, image_grids, video_grids);
    if (static_cast<int64_t>(t.tokens.size()) > options.token_budget)
      throw SampleError(SkipReason::too_long, std::to_string(t.tokens.size()) + " tokens, over the budget of " +
                                                  std::to_string(options.token_budget));
    // Items in sequence order: the pad token at each item's offset tells which list it came from.
    size_t next_image = 0, next_video = 0;
    for (const int64_t offset : t.item_token_offsets) {
      const bool is_image = t.tokens[offset] == chat.ids().image_pad;
      ShardItem item = std::move(is_image ? image_items.at(next_image++).item : video_items.at(next_video++).item);
      item.token_offset = offset;
      out.document.items.push_back(std::move(item));
    }
    out.document.source_file = raw.file_index;
    out.document.sample_index = raw.line;
    out.document.tokens = t.tokens;
    out.document.labels = t.labels;
  } catch (const SampleError& e) {
    out.skipped = SkippedSample{file, raw.line, e.reason(), e.what()};
  }
  return out;
}

int64_t document_bytes(const ShardDocument& d) {
  int64_t bytes = static_cast<int64_t>(d.tokens.size()) * 8;
  for (const ShardItem& item : d.items) bytes += static_cast<int64_t>(item.pixels.size());
  return bytes;
}

// First-fit packing over a window of open sequences, writing shards of about options.shard_bytes.
class Packer {
 public:
  Packer(const PackOptions& options, const std::string& tokenizer_hash, RankResult& result)
      : options_(options), header_{kShardFormatVersion, tokenizer_hash, options.token_budget}, result_(result) {}

  void add(ShardDocument doc) {
    const int64_t n = static_cast<int64_t>(doc.tokens.size());
    for (OpenSequence& open : open_) {
      if (open.tokens + n <= options_.token_budget) {
        open.tokens += n;
        open.bytes += document_bytes(doc);
        open.sequence.documents.push_back(std::move(doc));
        return;
      }
    }
    if (static_cast<int>(open_.size()) >= std::max(1, options_.open_sequences)) {
      close(std::move(open_.front()));
      open_.erase(open_.begin());
    }
    OpenSequence fresh;
    fresh.tokens = n;
    fresh.bytes = document_bytes(doc);
    fresh.sequence.documents.push_back(std::move(doc));
    open_.push_back(std::move(fresh));
  }

  void finish() {
    for (OpenSequence& open : open_) close(std::move(open));
    open_.clear();
    if (!pending_.empty()) write();
  }

 private:
  struct OpenSequence {
    ShardSequence sequence;
    int64_t tokens = 0, bytes = 0;
  };

  void close(OpenSequence open) {
    result_.summary.sequences += 1;
    result_.summary.tokens += open.tokens;
    pending_bytes_ += open.bytes;
    pending_.push_back(std::move(open.sequence));
    if (pending_bytes_ >= options_.shard_bytes) write();
  }

  void write() {
    char name[64];
    std::snprintf(name, sizeof(name), "shard-%05d-%05d.h5", options_.rank, static_cast<int>(result_.shards.size()));
    const std::string path = (fs::path(options_.out_dir) / name).string();
    const ShardCounts counts = write_shard(path, header_, pending_);
    result_.shards.push_back(ManifestShard{name, counts});
    result_.summary.shards += 1;
    result_.summary.shard_bytes += static_cast<int64_t>(fs::file_size(path));
    pending_.clear();
    pending_bytes_ = 0;
  }

  const PackOptions& options_;
  ShardHeader header_;
  RankResult& result_;
  std::vector<OpenSequence> open_;
  std::vector<ShardSequence> pending_;
  int64_t pending_bytes_ = 0;
};

// Calls `chunk` with this rank's raw samples, options.chunk_samples at a time, in input order.
// `chunk` gets each chunk of this rank's samples and the share of the input read so far (by bytes, over all files).
void for_each_chunk(const PackOptions& options, const std::function<void(std::vector<RawSample>&, double)>& chunk) {
  std::vector<RawSample> batch;
  int64_t global_index = 0;
  uint64_t total_bytes = 0, read_bytes = 0;
  for (const std::string& file : options.inputs) {
    std::error_code ec;
    const uintmax_t size = fs::file_size(file, ec);
    Q3VL_CHECK(!ec, "pack: cannot open input ", file, ": ", ec.message());
    total_bytes += size;
  }
  const auto read_share = [&] { return total_bytes > 0 ? static_cast<double>(read_bytes) / static_cast<double>(total_bytes) : 1.0; };
  const auto take = [&](RawSample raw) {
    if (global_index++ % options.world != options.rank) return;
    batch.push_back(std::move(raw));
    if (static_cast<int>(batch.size()) >= std::max(1, options.chunk_samples)) {
      chunk(batch, read_share());
      batch.clear();
    }
  };
  for (size_t f = 0; f < options.inputs.size(); ++f) {
    const std::string& file = options.inputs[f];
    std::ifstream in(file);
    Q3VL_CHECK(in, "pack: cannot open input ", file);
    if (fs::path(file).extension() == ".jsonl") {
      std::string line;
      int64_t line_no = 0;
      while (std::getline(in, line)) {
        ++line_no;
        read_bytes += line.size() + 1;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        take(RawSample{static_cast<int64_t>(f), line_no, std::move(line), std::nullopt});
      }
    } else {
      json all;
      try {
        all = json::parse(in);
      } catch (const json::exception& e) {
        Q3VL_FAIL("pack: input ", file, " is not valid JSON (a JSON array of samples, or use .jsonl): ", e.what());
      }
      Q3VL_CHECK(all.is_array(), "pack: input ", file, " must hold a JSON array of samples");
      const uint64_t file_bytes = fs::file_size(file), before = read_bytes;
      for (size_t i = 0; i < all.size(); ++i) {
        read_bytes = before + file_bytes * (i + 1) / all.size();
        take(RawSample{static_cast<int64_t>(f), static_cast<int64_t>(i), {}, std::move(all[i])});
      }
      read_bytes = before + file_bytes;
    }
  }
  if (!batch.empty()) chunk(batch, read_share());
}

}  // namespace

RankResult pack_rank(const PackOptions& options, const Tokenizer& tokenizer, const std::string& tokenizer_hash,
                     const MediaDecoder& media) {
  Q3VL_CHECK(options.world >= 1 && options.rank >= 0 && options.rank < options.world, "pack: rank ", options.rank,
             " is outside world size ", options.world);
  Q3VL_CHECK(options.token_budget > 0, "pack: token budget must be positive");
  Q3VL_CHECK(!options.inputs.empty(), "pack: no input files");
  fs::create_directories(options.out_dir);
  const auto start = std::chrono::steady_clock::now();
  const ChatTemplate chat(tokenizer);
  RankResult result;
  result.summary.token_budget = options.token_budget;
  Packer packer(options, tokenizer_hash, result);
  for_each_chunk(options, [&](std::vector<RawSample>& chunk, double read_share) {
    std::vector<PreparedSample> prepared(chunk.size());
    std::vector<std::string> errors(chunk.size());
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(chunk.size()); ++i) {
      try {
        prepared[i] = prepare(chunk[i], options, chat, media);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    }
    for (size_t i = 0; i < chunk.size(); ++i) {
      Q3VL_CHECK(errors[i].empty(), "pack: ", options.inputs[chunk[i].file_index], ":", chunk[i].line, ": ", errors[i]);
      PackSummary& s = result.summary;
      s.samples_in += 1;
      if (prepared[i].skipped) {
        s.skipped[static_cast<int>(prepared[i].skipped->reason)] += 1;
        s.skipped_samples.push_back(*prepared[i].skipped);
        continue;
      }
      s.samples_packed += 1;
      s.images += prepared[i].images;
      s.video_frames += prepared[i].video_frames;
      packer.add(std::move(prepared[i].document));
    }
    if (options.progress) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      char share[16];
      std::snprintf(share, sizeof share, "%.1f%%", 100.0 * read_share);
      *options.progress << "pack: rank " << options.rank << ": " << result.summary.samples_in << " samples, "
                        << result.summary.samples_packed << " packed, " << result.summary.skipped_total()
                        << " skipped, " << result.summary.samples_in / std::max(secs, 1e-9) << " samples/s, "
                        << share << " of the input read, ETA "
                        << (read_share > 0 ? human_duration(secs * (1.0 - read_share) / read_share) : "?") << "\n";
    }
  });
  packer.finish();
  result.summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

std::string rank_result_to_json(const RankResult& result) {
  json j;
  j["summary"] = json::parse(result.summary.to_json());
  j["shards"] = json::array();
  for (const ManifestShard& s : result.shards)
    j["shards"].push_back({{"file", s.file}, {"sequences", s.counts.sequences}, {"documents", s.counts.documents},
                           {"tokens", s.counts.tokens}, {"items", s.counts.items}, {"pixel_bytes", s.counts.pixel_bytes}});
  return j.dump();
}

RankResult rank_result_from_json(const std::string& text) {
  RankResult r;
  try {
    const json j = json::parse(text);
    r.summary = PackSummary::from_json(j.at("summary").dump());
    for (const json& s : j.at("shards"))
      r.shards.push_back(ManifestShard{s.at("file"), ShardCounts{s.at("sequences"), s.at("documents"), s.at("tokens"),
                                                                 s.at("items"), s.at("pixel_bytes")}});
  } catch (const json::exception& e) {
    Q3VL_FAIL("pack: invalid rank result: ", e.what());
  }
  return r;
}

std::string rank_result_path(const std::string& out_dir, int rank) {
  char name[32];
  std::snprintf(name, sizeof(name), "part-%05d.json", rank);
  return (fs::path(out_dir) / name).string();
}

void write_rank_result(const std::string& path, const RankResult& result) {
  std::ofstream out(path);
  Q3VL_CHECK(out, "pack: cannot write ", path);
  out << rank_result_to_json(result) << "\n";
  Q3VL_CHECK(out.good(), "pack: write failed: ", path);
}

RankResult read_rank_result(const std::string& path) {
  std::ifstream in(path);
  Q3VL_CHECK(in, "pack: cannot read ", path, " (has that rank finished?)");
  std::stringstream text;
  text << in.rdbuf();
  return rank_result_from_json(text.str());
}

PackSummary write_pack_manifest(const PackOptions& options, const std::string& tokenizer_hash,
                                const std::vector<RankResult>& ranks) {
  Manifest m;
  m.format_version = kShardFormatVersion;
  m.tokenizer_hash = tokenizer_hash;
  m.token_budget = options.token_budget;
  for (const std::string& input : options.inputs) m.sources.push_back(fs::absolute(input).string());
  PackSummary total;
  total.token_budget = options.token_budget;
  for (const RankResult& r : ranks) {
    total.merge(r.summary);
    m.shards.insert(m.shards.end(), r.shards.begin(), r.shards.end());
  }
  m.summary_json = total.to_json();
  write_manifest((fs::path(options.out_dir) / "manifest.json").string(), m);
  return total;
}

namespace {

// OUT without a trailing separator, so that siblings are named OUT.tmp-TAG, not OUT/.tmp-TAG.
fs::path output_path(const std::string& out_dir) {
  fs::path p = fs::path(out_dir).lexically_normal();
  if (!p.has_filename() && p.has_parent_path()) p = p.parent_path();
  return p;
}

}  // namespace

void check_pack_output(const std::string& out_dir, bool overwrite) {
  const fs::path out = output_path(out_dir);
  std::error_code ec;
  const fs::file_status st = fs::status(out, ec);
  if (!fs::exists(st)) return;
  Q3VL_CHECK(fs::is_directory(st), "pack: --out ", out_dir, " exists and is not a folder");
  if (fs::is_empty(out, ec) && !ec) return;
  Q3VL_CHECK(overwrite, "pack: --out ", out_dir, " is not empty (an earlier pack?); pass --overwrite to replace it");
  Q3VL_CHECK(fs::exists(out / "manifest.json"), "pack: --out ", out_dir,
             " holds no manifest.json; --overwrite replaces only an earlier pack, not another folder");
}

std::string pack_staging_dir(const std::string& out_dir, const std::string& tag) {
  return output_path(out_dir).string() + ".tmp-" + tag;
}

void publish_pack_output(const std::string& staging, const std::string& out_dir) {
  const fs::path out = output_path(out_dir);
  std::error_code ec;
  // rename() replaces an empty folder but not a full one: an earlier pack moves aside first and goes last.
  const fs::path old = out.string() + ".old-" + std::to_string(::getpid());
  const bool replace = fs::exists(out) && !fs::is_empty(out);
  if (replace) {
    fs::rename(out, old, ec);
    Q3VL_CHECK(!ec, "pack: cannot move the earlier pack ", out_dir, " aside to ", old.string(), ": ", ec.message());
  }
  fs::rename(staging, out, ec);
  Q3VL_CHECK(!ec, "pack: cannot rename the finished pack ", staging, " to ", out_dir, ": ", ec.message());
  if (replace) fs::remove_all(old, ec);
}

PackSummary pack(const PackOptions& options, const Tokenizer& tokenizer, const std::string& tokenizer_hash,
                 const MediaDecoder& media) {
  Q3VL_CHECK(options.world == 1, "pack: pack() runs one process; use pack_rank per rank for world ", options.world);
  check_pack_output(options.out_dir, options.overwrite);
  PackOptions staged = options;
  staged.out_dir = pack_staging_dir(options.out_dir, std::to_string(::getpid()));
  fs::remove_all(staged.out_dir);  // left by a killed run that had this process id
  try {
    const RankResult result = pack_rank(staged, tokenizer, tokenizer_hash, media);
    const PackSummary total = write_pack_manifest(staged, tokenizer_hash, {result});
    publish_pack_output(staged.out_dir, options.out_dir);
    return total;
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(staged.out_dir, ignored);
    throw;
  }
}

}  // namespace q3vl::io
