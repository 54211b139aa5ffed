// Sharded training checkpoints: the three save phases (begin, one file per shard, manifest + publish), the
// exactly-once coverage check over all pieces, and CheckpointReader over the sharded and whole-tensor formats.
#include "io/sharded_checkpoint.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>

#include "core/check.h"
#include "core/model/param_specs.h"
#include "io/checkpoint_files.h"
#include "io/hf_config.h"
#include "io/safetensors.h"

namespace q3vl::io {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace checkpoint_files;

namespace {

constexpr const char* kManifest = "manifest.json";
constexpr int kManifestFormat = 1;
constexpr int kMaxShards = 100000;  // five digits in the file name
constexpr const char* kModelDir = "model";
constexpr const char* kOptimizerFile = "optimizer.safetensors";

using Field = CheckpointReader::Field;
constexpr std::array<Field, 3> kFields{Field::param, Field::exp_avg, Field::exp_avg_sq};

const char* field_suffix(Field field) {
  switch (field) {
    case Field::param:
      return "";
    case Field::exp_avg:
      return ".exp_avg";
    case Field::exp_avg_sq:
      return ".exp_avg_sq";
  }
  return "";
}

const char* field_name(Field field) {
  switch (field) {
    case Field::param:
      return "parameter values";
    case Field::exp_avg:
      return "exp_avg";
    case Field::exp_avg_sq:
      return "exp_avg_sq";
  }
  return "";
}

std::string shard_file_name(int index) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "shard-%05d.safetensors", index);
  return buf;
}

// Exactly what shard_file_name writes, so a manifest can never name a path outside the checkpoint.
bool is_shard_file_name(const std::string& name) {
  constexpr std::string_view prefix = "shard-", suffix = ".safetensors";
  if (name.size() != prefix.size() + 5 + suffix.size() || !name.starts_with(prefix) || !name.ends_with(suffix))
    return false;
  return std::all_of(name.begin() + prefix.size(), name.begin() + prefix.size() + 5,
                     [](char c) { return c >= '0' && c <= '9'; });
}

std::string piece_tensor_name(const std::string& key, int64_t offset, Field field) {
  return key + "@" + std::to_string(offset) + field_suffix(field);
}

// "[offset, end)"; the end wraps instead of overflowing for a nonsensical request that the caller is about to
// reject.
std::string range_text(int64_t offset, int64_t numel) {
  std::string text = "[";
  text += std::to_string(offset);
  text += ", ";
  text += std::to_string(static_cast<int64_t>(static_cast<uint64_t>(offset) + static_cast<uint64_t>(numel)));
  text += ")";
  return text;
}

std::vector<int64_t> dims_of(const Shape& shape) { return {shape.dims.begin(), shape.dims.begin() + shape.ndim}; }

// ---------------------------------------------------------------------------------------------------------
// Manifest entries

struct PieceRange {
  std::string key;
  int64_t offset = 0, numel = 0;
};

struct ShardEntry {
  std::string file;
  std::vector<PieceRange> pieces;
};

json entry_json(const ShardEntry& entry) {
  json pieces = json::array();
  for (const PieceRange& p : entry.pieces) pieces.push_back({{"key", p.key}, {"offset", p.offset}, {"numel", p.numel}});
  return {{"file", entry.file}, {"pieces", std::move(pieces)}};
}

int64_t non_negative(const json& piece, const char* field, const std::string& where) {
  Q3VL_CHECK(piece.contains(field) && piece[field].is_number_unsigned() &&
                 piece[field].get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX),
             where, ": \"", field, "\" is missing or not a non-negative 64-bit integer in ", piece.dump());
  return piece[field].get<int64_t>();
}

// `where` names the entry in errors (the shard entry of a save, or the manifest's shards[i] of a read).
ShardEntry parse_shard_entry(const json& j, const std::string& where) {
  Q3VL_CHECK(
      j.is_object() && j.contains("file") && j["file"].is_string() && j.contains("pieces") && j["pieces"].is_array(),
      where, ": expected {\"file\": string, \"pieces\": array}");
  ShardEntry entry;
  entry.file = j["file"].get<std::string>();
  Q3VL_CHECK(is_shard_file_name(entry.file), where, ": file '", entry.file,
             "' is not a shard file name (shard-RRRRR.safetensors)");
  for (const json& p : j["pieces"]) {
    Q3VL_CHECK(p.is_object() && p.contains("key") && p["key"].is_string() && !p["key"].get<std::string>().empty(),
               where, ": a piece has no key: ", p.dump());
    PieceRange piece{p["key"].get<std::string>(), non_negative(p, "offset", where), non_negative(p, "numel", where)};
    Q3VL_CHECK(piece.numel >= 1, where, ": the piece of '", piece.key, "' at ", piece.offset, " has no elements");
    entry.pieces.push_back(std::move(piece));
  }
  return entry;
}

// Every element of every parameter is held by exactly one piece of one shard, and no piece names something the
// model does not have. `what` starts each error.
void check_coverage(const std::vector<ParamSpec>& specs, const std::vector<ShardEntry>& shards,
                    const std::string& what) {
  struct Held {
    int64_t offset, numel;
    const std::string* file;
  };
  std::map<std::string, std::vector<Held>, std::less<>> by_key;
  for (const ParamSpec& s : specs) by_key[s.hf_key];
  for (const ShardEntry& shard : shards)
    for (const PieceRange& p : shard.pieces) {
      const auto it = by_key.find(p.key);
      Q3VL_CHECK(it != by_key.end(), what, ": ", shard.file, " holds a piece of '", p.key,
                 "', which is not a parameter of this model");
      it->second.push_back({p.offset, p.numel, &shard.file});
    }
  for (const ParamSpec& s : specs) {
    std::vector<Held>& held = by_key[s.hf_key];
    std::sort(held.begin(), held.end(), [](const Held& a, const Held& b) {
      return a.offset != b.offset ? a.offset < b.offset : a.numel < b.numel;
    });
    const int64_t total = s.numel();
    const std::string param = what + ": parameter '" + s.hf_key + "' (" + std::to_string(total) + " elements): ";
    int64_t covered = 0;  // held[0..i) tile [0, covered) exactly
    for (size_t i = 0; i < held.size(); ++i) {
      const Held& h = held[i];
      Q3VL_CHECK(h.offset <= total && h.numel <= total - h.offset, param, "the piece ", range_text(h.offset, h.numel),
                 " in ", *h.file, " lies beyond its end");
      Q3VL_CHECK(h.offset <= covered, param, "element ", covered, " is held by no shard");
      if (h.offset < covered) {
        // The earlier piece holding h.offset: the last one starting at or before it, as they tile [0, covered).
        size_t earlier = i - 1;
        while (held[earlier].offset > h.offset) --earlier;
        Q3VL_FAIL(param, "element ", h.offset, " is held twice, by ", *held[earlier].file, " ",
                  range_text(held[earlier].offset, held[earlier].numel), " and by ", *h.file, " ",
                  range_text(h.offset, h.numel));
      }
      covered = h.offset + h.numel;
    }
    Q3VL_CHECK(covered == total, param, "element ", covered, " is held by no shard");
  }
}

// The shard file holds exactly its entry's tensors, each f32 with the piece's element count.
void check_shard_file(const SafetensorsFile& file, const ShardEntry& entry, const std::string& what) {
  std::set<std::string, std::less<>> expected;
  for (const PieceRange& p : entry.pieces)
    for (Field field : kFields) {
      const std::string name = piece_tensor_name(p.key, p.offset, field);
      expected.insert(name);
      const StTensorInfo* info = file.find(name);
      Q3VL_CHECK(info != nullptr, what, ": ", file.path(), " has no tensor '", name, "'");
      Q3VL_CHECK(info->dtype == StDType::F32 && info->shape == std::vector<int64_t>{p.numel}, what, ": ", file.path(),
                 ": tensor '", name, "' is ", st_dtype_name(info->dtype), info->shape_str(), ", expected F32[", p.numel,
                 "]");
    }
  for (const StTensorInfo& info : file.tensors())
    Q3VL_CHECK(expected.contains(info.key), what, ": ", file.path(), " holds tensor '", info.key,
               "', which its manifest entry does not list");
}

std::vector<ShardEntry> parse_shard_entries(const std::vector<std::string>& texts) {
  std::vector<ShardEntry> entries;
  std::set<std::string> files;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string where = "sharded checkpoint: shard entry " + std::to_string(i);
    json j;
    try {
      j = json::parse(texts[i]);
    } catch (const json::exception& e) {
      Q3VL_FAIL(where, " is not valid JSON: ", e.what());
    }
    entries.push_back(parse_shard_entry(j, where));
    Q3VL_CHECK(files.insert(entries.back().file).second, where, ": ", entries.back().file,
               " is the file of an earlier entry too");
  }
  return entries;
}

json manifest_json(const std::vector<ParamSpec>& specs, json layout, const std::vector<ShardEntry>& entries) {
  json tensors = json::array();
  for (const ParamSpec& s : specs) tensors.push_back({{"key", s.hf_key}, {"shape", dims_of(s.shape)}});
  json shards = json::array();
  for (const ShardEntry& e : entries) shards.push_back(entry_json(e));
  return {{"format", kManifestFormat},
          {"layout", std::move(layout)},
          {"tensors", std::move(tensors)},
          {"shards", std::move(shards)}};
}

// A tag becomes part of a folder name: it may not reach outside ROOT or need quoting.
bool is_plain_tag(const std::string& tag) {
  const auto plain = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
           c == '.';
  };
  return !tag.empty() && tag != "." && tag != ".." && std::all_of(tag.begin(), tag.end(), plain);
}

// The temporary folder must be one begin_sharded_checkpoint made for this step under ROOT: finish renames it
// and removes it on failure, which must never hit another folder.
fs::path checked_tmp_dir(const std::string& root, const std::string& tmp_dir, int64_t step) {
  fs::path tmp = fs::path(tmp_dir).lexically_normal();
  if (!tmp.has_filename()) tmp = tmp.parent_path();
  std::error_code ec;
  Q3VL_CHECK(fs::is_directory(tmp, ec), "sharded checkpoint: temporary folder ", tmp_dir,
             " does not exist or is not a folder");
  Q3VL_CHECK(tmp.filename().string().starts_with(tmp_prefix(step)) && fs::equivalent(tmp.parent_path(), root, ec),
             "sharded checkpoint: ", tmp_dir, " is not a temporary folder of step ", step, " under ", root,
             " (made by begin_sharded_checkpoint)");
  return tmp;
}

}  // namespace

std::string begin_sharded_checkpoint(const std::string& root, int64_t step, const std::string& tag) {
  Q3VL_CHECK(step >= 0, "sharded checkpoint: step is ", step, ", expected >= 0");
  Q3VL_CHECK(is_plain_tag(tag), "sharded checkpoint: tag '", tag,
             "' is not a plain name (letters, digits, '-', '_', '.')");
  create_root(root);
  const fs::path tmp = fs::path(root) / (tmp_prefix(step) + tag);
  std::error_code ec;
  fs::remove_all(tmp, ec);  // a save of this step and tag that did not finish
  Q3VL_CHECK(!ec, "checkpoint: cannot remove ", tmp.string(), ": ", ec.message());
  make_dir(tmp.string());
  return tmp.string();
}

std::string write_checkpoint_shard(const std::string& tmp_dir, int shard_index, const std::vector<ShardPiece>& pieces) {
  Q3VL_CHECK(shard_index >= 0 && shard_index < kMaxShards, "sharded checkpoint: shard index ", shard_index,
             " is outside [0, ", kMaxShards, ")");
  const std::string path = (fs::path(tmp_dir) / shard_file_name(shard_index)).string();
  ShardEntry entry{shard_file_name(shard_index), {}};
  std::vector<StWriteEntry> tensors;
  std::set<std::pair<std::string, int64_t>> seen;
  for (const ShardPiece& p : pieces) {
    Q3VL_CHECK(!p.key.empty(), "sharded checkpoint ", path, ": a piece has an empty key");
    Q3VL_CHECK(p.offset >= 0 && p.numel >= 1, "sharded checkpoint ", path, ": the piece of '", p.key, "' at offset ",
               p.offset, " with ", p.numel, " elements is not a range (offset >= 0, numel >= 1)");
    Q3VL_CHECK(p.param != nullptr && p.exp_avg != nullptr && p.exp_avg_sq != nullptr, "sharded checkpoint ", path,
               ": the piece of '", p.key, "' at ", p.offset, " lacks its parameter values or a moment");
    Q3VL_CHECK(seen.emplace(p.key, p.offset).second, "sharded checkpoint ", path, ": two pieces of '", p.key,
               "' start at ", p.offset);
    // The writer only reads the arrays; Tensor has no read-only flavour.
    for (const auto& [field, data] : {std::pair{Field::param, p.param}, std::pair{Field::exp_avg, p.exp_avg},
                                      std::pair{Field::exp_avg_sq, p.exp_avg_sq}}) {
      StWriteEntry& tensor = tensors.emplace_back();
      tensor.key = piece_tensor_name(p.key, p.offset, field);
      tensor.tensor = Tensor(const_cast<float*>(data), DType::f32, {p.numel});
    }
    entry.pieces.push_back({p.key, p.offset, p.numel});
  }
  try {
    write_safetensors_synced(path, tensors);
  } catch (...) {
    std::error_code ignored;
    fs::remove(path, ignored);
    throw;
  }
  return entry_json(entry).dump();
}

std::string finish_sharded_checkpoint(const std::string& root, const std::string& tmp_dir, int64_t step,
                                      const ModelConfig& config, const std::string& layout_json,
                                      const std::vector<std::string>& shard_entries,
                                      const std::string& trainer_state_json, const std::string& config_yaml, int keep) {
  Q3VL_CHECK(keep >= 1, "sharded checkpoint: keep is ", keep, ", expected at least 1");
  Q3VL_CHECK(step >= 0, "sharded checkpoint: step is ", step, ", expected >= 0");
  const fs::path tmp = checked_tmp_dir(root, tmp_dir, step);
  try {
    // Everything is checked before the first file of the step is written.
    check_json(trainer_state_json, "sharded checkpoint: the trainer state");
    json layout;
    try {
      layout = json::parse(layout_json);
    } catch (const json::exception& e) {
      Q3VL_FAIL("sharded checkpoint: the layout is not valid JSON: ", e.what());
    }
    const std::vector<ParamSpec> specs = model_param_specs(config);
    const std::vector<ShardEntry> entries = parse_shard_entries(shard_entries);
    check_coverage(specs, entries, "sharded checkpoint " + tmp.string());
    for (const ShardEntry& e : entries) {
      const std::string path = (tmp / e.file).string();
      Q3VL_CHECK(fs::exists(path), "sharded checkpoint: shard file ", path, " does not exist");
      check_shard_file(SafetensorsFile(path), e, "sharded checkpoint");
    }

    write_text_file((tmp / kManifest).string(), manifest_json(specs, std::move(layout), entries).dump() + "\n");
    write_text_file((tmp / kConfigJson).string(), hf_config_json(config, DType::f32));
    write_text_file((tmp / kTrainerState).string(), trainer_state_json);
    write_text_file((tmp / kConfigYaml).string(), config_yaml);
    fsync_dir(tmp.string());  // also makes the shard files' entries durable
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
  return publish_checkpoint(root, tmp.string(), step, keep);
}

// ---------------------------------------------------------------------------------------------------------
// CheckpointReader

struct CheckpointReader::Impl {
  // Where one field of one segment lies: a tensor of a mapped file.
  struct Source {
    const SafetensorsFile* file = nullptr;
    const StTensorInfo* info = nullptr;  // null: the checkpoint does not hold this field
  };
  // Elements [offset, offset + numel) of a parameter, stored contiguously in each field's tensor.
  struct Segment {
    int64_t offset = 0, numel = 0;
    std::array<Source, 3> fields;
  };
  struct Param {
    int64_t numel = 0;
    std::vector<Segment> segments;  // by offset, tiling [0, numel)
  };

  std::string dir;
  bool sharded = false;
  std::string trainer_state_json, config_yaml, layout_json = "{}";
  std::vector<std::unique_ptr<SafetensorsFile>> files;  // stable addresses for the Sources
  std::optional<SafetensorsDir> model;
  std::map<std::string, Param, std::less<>> params;

  void open_sharded(const std::vector<ParamSpec>& specs);
  void open_whole(const std::vector<ParamSpec>& specs);
};

void CheckpointReader::Impl::open_sharded(const std::vector<ParamSpec>& specs) {
  const std::string manifest_path = (fs::path(dir) / kManifest).string();
  const std::string what = "checkpoint " + manifest_path;
  json manifest;
  try {
    manifest = json::parse(read_text_file(manifest_path));
  } catch (const json::exception& e) {
    Q3VL_FAIL(what, " is not valid JSON: ", e.what());
  }
  Q3VL_CHECK(manifest.is_object() && manifest.contains("format") && manifest["format"] == kManifestFormat, what,
             ": expected an object with \"format\": ", kManifestFormat);
  Q3VL_CHECK(manifest.contains("layout") && manifest.contains("tensors") && manifest["tensors"].is_array() &&
                 manifest.contains("shards") && manifest["shards"].is_array(),
             what, ": expected \"layout\", \"tensors\" (array) and \"shards\" (array)");
  layout_json = manifest["layout"].dump();

  const json& tensors = manifest["tensors"];
  Q3VL_CHECK(tensors.size() == specs.size(), what, ": lists ", tensors.size(), " tensors, the model has ",
             specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const json want = {{"key", specs[i].hf_key}, {"shape", dims_of(specs[i].shape)}};
    Q3VL_CHECK(tensors[i] == want, what, ": tensors[", i, "] is ", tensors[i].dump(), ", the model has ", want.dump());
  }
  std::vector<ShardEntry> entries;
  std::set<std::string> names;
  for (size_t i = 0; i < manifest["shards"].size(); ++i) {
    entries.push_back(parse_shard_entry(manifest["shards"][i], what + ": shards[" + std::to_string(i) + "]"));
    Q3VL_CHECK(names.insert(entries.back().file).second, what, ": lists ", entries.back().file, " twice");
  }
  check_coverage(specs, entries, what);

  for (const ParamSpec& s : specs) params[s.hf_key].numel = s.numel();
  for (const ShardEntry& e : entries) {
    const std::string path = (fs::path(dir) / e.file).string();
    Q3VL_CHECK(fs::exists(path), "checkpoint ", dir, ": shard file ", e.file, " listed in ", kManifest, " is missing");
    const SafetensorsFile& file = *files.emplace_back(std::make_unique<SafetensorsFile>(path));
    check_shard_file(file, e, "checkpoint " + dir);
    for (const PieceRange& p : e.pieces) {
      Segment segment{p.offset, p.numel, {}};
      for (Field field : kFields)
        segment.fields[static_cast<size_t>(field)] = {&file, file.find(piece_tensor_name(p.key, p.offset, field))};
      params[p.key].segments.push_back(segment);
    }
  }
  for (auto& [key, param] : params)
    std::sort(param.segments.begin(), param.segments.end(),
              [](const Segment& a, const Segment& b) { return a.offset < b.offset; });
}

void CheckpointReader::Impl::open_whole(const std::vector<ParamSpec>& specs) {
  const fs::path model_dir = fs::path(dir) / kModelDir;
  model.emplace(model_dir.string());
  const SafetensorsFile& moments =
      *files.emplace_back(std::make_unique<SafetensorsFile>((fs::path(dir) / kOptimizerFile).string()));
  for (const ParamSpec& s : specs) {
    Q3VL_CHECK(model->contains(s.hf_key), "checkpoint ", model_dir.string(), ": missing weight '", s.hf_key, "'");
    const SafetensorsFile& weights = model->file_of(s.hf_key);
    const StTensorInfo& info = model->info(s.hf_key);
    const StDType dt = info.dtype;
    Q3VL_CHECK(dt == StDType::F32 || dt == StDType::BF16 || dt == StDType::F16, "checkpoint ", weights.path(),
               ": weight '", s.hf_key, "' has dtype ", st_dtype_name(dt), ", expected F32, BF16 or F16");
    Q3VL_CHECK(info.shape == dims_of(s.shape), "checkpoint ", weights.path(), ": weight '", s.hf_key, "' has shape ",
               info.shape_str(), ", expected ", s.shape.str());
    Segment segment{0, s.numel(), {}};
    segment.fields[static_cast<size_t>(Field::param)] = {&weights, &info};
    for (Field field : {Field::exp_avg, Field::exp_avg_sq}) {
      const StTensorInfo* moment = moments.find(s.hf_key + field_suffix(field));
      if (moment == nullptr) continue;
      Q3VL_CHECK(moment->dtype == StDType::F32 && moment->shape == dims_of(s.shape), "checkpoint ", moments.path(),
                 ": optimizer tensor '", moment->key, "' is ", st_dtype_name(moment->dtype), moment->shape_str(),
                 ", expected F32", s.shape.str());
      segment.fields[static_cast<size_t>(field)] = {&moments, moment};
    }
    params[s.hf_key] = {s.numel(), {segment}};
  }
}

CheckpointReader::CheckpointReader(const std::string& dir, const ModelConfig& expected)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.dir = dir;
  const fs::path root(dir);
  std::error_code ec;
  Q3VL_CHECK(fs::is_directory(root, ec), "checkpoint ", dir, " does not exist or is not a folder");
  Q3VL_CHECK(fs::is_regular_file(root / kComplete, ec), "checkpoint ", dir,
             " is incomplete: it has no COMPLETE marker (its save was interrupted)");
  m.sharded = fs::exists(root / kManifest, ec);
  check_model_config((m.sharded ? root / kConfigJson : root / kModelDir / kConfigJson).string(), expected);
  const std::string state_path = (root / kTrainerState).string();
  m.trainer_state_json = read_text_file(state_path);
  check_json(m.trainer_state_json, "checkpoint " + state_path);
  m.config_yaml = read_text_file((root / kConfigYaml).string());
  const std::vector<ParamSpec> specs = model_param_specs(expected);
  if (m.sharded)
    m.open_sharded(specs);
  else
    m.open_whole(specs);
}

CheckpointReader::~CheckpointReader() = default;

void CheckpointReader::read(const std::string& key, Field field, int64_t offset, int64_t numel, float* dst) const {
  const Impl& m = *impl_;
  const auto it = m.params.find(key);
  Q3VL_CHECK(it != m.params.end(), "checkpoint ", m.dir, ": no parameter '", key, "' (reading elements ",
             range_text(offset, numel), ")");
  const Impl::Param& param = it->second;
  Q3VL_CHECK(offset >= 0 && numel >= 0 && offset <= param.numel && numel <= param.numel - offset, "checkpoint ", m.dir,
             ": elements ", range_text(offset, numel), " of '", key, "' are out of range: it has ", param.numel,
             " elements");
  if (numel == 0) return;
  // The segment holding `offset`: the last one starting at or before it.
  auto seg = std::upper_bound(param.segments.begin(), param.segments.end(), offset,
                              [](int64_t value, const Impl::Segment& s) { return value < s.offset; }) -
             1;
  for (int64_t at = offset; at < offset + numel; ++seg) {
    const Impl::Source& src = seg->fields[static_cast<size_t>(field)];
    Q3VL_CHECK(src.info != nullptr, "checkpoint ", m.dir, " holds no ", field_name(field), " for '", key,
               "' (reading elements ", range_text(offset, numel), ")");
    const int64_t count = std::min(offset + numel, seg->offset + seg->numel) - at;
    const size_t element = st_dtype_size(src.info->dtype);
    const std::span<const std::byte> bytes = src.file->bytes(*src.info).subspan(
        static_cast<size_t>(at - seg->offset) * element, static_cast<size_t>(count) * element);
    convert_into(bytes, src.info->dtype, Tensor(dst + (at - offset), DType::f32, {count}),
                 src.file->path() + ": '" + src.info->key + "'");
    at += count;
  }
}

bool CheckpointReader::sharded() const { return impl_->sharded; }
const std::string& CheckpointReader::trainer_state_json() const { return impl_->trainer_state_json; }
const std::string& CheckpointReader::config_yaml() const { return impl_->config_yaml; }
const std::string& CheckpointReader::layout_json() const { return impl_->layout_json; }

}  // namespace q3vl::io
