// HDF5 shard writer and validating reader, tokenizer hash, and the JSON manifest.
#include "io/shard_format.h"

#include <hdf5.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/checked_math.h"
#include "io/io_version.h"

namespace q3vl::io {

namespace {

// Owns one HDF5 identifier and closes it with the matching H5*close.
class H5Id {
 public:
  H5Id() = default;
  H5Id(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  H5Id(H5Id&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  H5Id& operator=(H5Id&& o) noexcept {
    std::swap(id_, o.id_);
    std::swap(close_, o.close_);
    return *this;
  }
  ~H5Id() {
    if (id_ >= 0 && close_) close_(id_);
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_ = H5I_INVALID_HID;
  herr_t (*close_)(hid_t) = nullptr;
};

// The HDF5 library may be built without thread safety: every use here holds this lock (the loader reads
// shards on its own thread).
std::recursive_mutex& hdf5_mutex() {
  static std::recursive_mutex m;
  return m;
}

// Holds the HDF5 lock and silences HDF5's own error printing while alive: failures become q3vl errors
// naming the file and dataset.
class QuietHdf5 {
 public:
  QuietHdf5() : lock_(hdf5_mutex()) {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }

 private:
  std::lock_guard<std::recursive_mutex> lock_;
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

template <class T>
hid_t native_type();
template <>
hid_t native_type<int32_t>() { return H5T_NATIVE_INT32; }
template <>
hid_t native_type<int64_t>() { return H5T_NATIVE_INT64; }
template <>
hid_t native_type<uint8_t>() { return H5T_NATIVE_UINT8; }

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, int32_t>) return "int32";
  if constexpr (std::is_same_v<T, int64_t>) return "int64";
  return "uint8";
}

template <class T>
void write_dataset(hid_t file, const std::string& path, const std::string& name, const std::vector<T>& data,
                   hsize_t cols = 1) {
  const hsize_t rows = data.size() / cols;
  const hsize_t dims[2] = {rows, cols};
  H5Id space(H5Screate_simple(cols == 1 ? 1 : 2, dims, nullptr), H5Sclose);
  Q3VL_CHECK(space.valid(), "shard ", path, ": cannot create the dataspace of dataset ", name);
  H5Id dset(H5Dcreate2(file, name.c_str(), native_type<T>(), space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
            H5Dclose);
  Q3VL_CHECK(dset.valid(), "shard ", path, ": cannot create dataset ", name);
  if (!data.empty())
    Q3VL_CHECK(H5Dwrite(dset.get(), native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()) >= 0,
               "shard ", path, ": cannot write dataset ", name);
}

void write_int_attribute(hid_t file, const std::string& path, const char* name, int64_t value) {
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr(H5Acreate2(file, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  Q3VL_CHECK(attr.valid() && H5Awrite(attr.get(), H5T_NATIVE_INT64, &value) >= 0, "shard ", path,
             ": cannot write attribute ", name);
}

void write_string_attribute(hid_t file, const std::string& path, const char* name, const std::string& value) {
  H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), std::max<size_t>(value.size(), 1));
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr(H5Acreate2(file, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  std::string padded = value.empty() ? std::string(1, '\0') : value;
  Q3VL_CHECK(attr.valid() && H5Awrite(attr.get(), type.get(), padded.data()) >= 0, "shard ", path,
             ": cannot write attribute ", name);
}

int64_t read_int_attribute(hid_t file, const std::string& path, const char* name) {
  Q3VL_CHECK(H5Aexists(file, name) > 0, "shard ", path, ": attribute ", name, " is missing");
  H5Id attr(H5Aopen(file, name, H5P_DEFAULT), H5Aclose);
  int64_t value = 0;
  Q3VL_CHECK(attr.valid() && H5Aread(attr.get(), H5T_NATIVE_INT64, &value) >= 0, "shard ", path,
             ": cannot read attribute ", name);
  return value;
}

std::string read_string_attribute(hid_t file, const std::string& path, const char* name) {
  Q3VL_CHECK(H5Aexists(file, name) > 0, "shard ", path, ": attribute ", name, " is missing");
  H5Id attr(H5Aopen(file, name, H5P_DEFAULT), H5Aclose);
  Q3VL_CHECK(attr.valid(), "shard ", path, ": cannot open attribute ", name);
  H5Id type(H5Aget_type(attr.get()), H5Tclose);
  Q3VL_CHECK(H5Tget_class(type.get()) == H5T_STRING && H5Tis_variable_str(type.get()) == 0, "shard ", path,
             ": attribute ", name, " is not a fixed-length string");
  std::string value(H5Tget_size(type.get()), '\0');
  Q3VL_CHECK(H5Aread(attr.get(), type.get(), value.data()) >= 0, "shard ", path, ": cannot read attribute ", name);
  value.resize(value.find('\0') == std::string::npos ? value.size() : value.find('\0'));
  return value;
}

// An open dataset whose type class and rank were checked; reads whole or row ranges.
struct Dataset {
  std::string name;
  H5Id id;
  hsize_t rows = 0, cols = 1;
};

template <class T>
Dataset open_dataset(hid_t file, const std::string& path, const std::string& name, int rank, hsize_t cols = 1) {
  Q3VL_CHECK(H5Lexists(file, name.c_str(), H5P_DEFAULT) > 0, "shard ", path, ": dataset ", name, " is missing");
  Dataset d{name, H5Id(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose)};
  Q3VL_CHECK(d.id.valid(), "shard ", path, ": cannot open dataset ", name);
  H5Id type(H5Dget_type(d.id.get()), H5Tclose);
  const bool want_signed = !std::is_same_v<T, uint8_t>;
  Q3VL_CHECK(H5Tget_class(type.get()) == H5T_INTEGER && H5Tget_size(type.get()) == sizeof(T) &&
                 (H5Tget_sign(type.get()) == H5T_SGN_2) == want_signed,
             "shard ", path, ": dataset ", name, " is not ", type_name<T>());
  H5Id space(H5Dget_space(d.id.get()), H5Sclose);
  hsize_t dims[2] = {0, 0};
  Q3VL_CHECK(H5Sget_simple_extent_ndims(space.get()) == rank, "shard ", path, ": dataset ", name, " has rank ",
             H5Sget_simple_extent_ndims(space.get()), ", expected ", rank);
  H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  d.rows = dims[0];
  if (rank == 2) {
    Q3VL_CHECK(dims[1] == cols, "shard ", path, ": dataset ", name, " has ", dims[1], " columns, expected ", cols);
    d.cols = cols;
  }
  return d;
}

template <class T>
std::vector<T> read_rows(const std::string& path, const Dataset& d, hsize_t row, hsize_t count) {
  Q3VL_CHECK(row + count <= d.rows, "shard ", path, ": dataset ", d.name, " read of rows [", row, ", ",
             row + count, ") is out of its ", d.rows, " rows");
  std::vector<T> out(count * d.cols);
  if (count == 0) return out;
  H5Id file_space(H5Dget_space(d.id.get()), H5Sclose);
  const hsize_t start[2] = {row, 0}, extent[2] = {count, d.cols};
  H5Id mem_space(H5Screate_simple(d.cols == 1 ? 1 : 2, extent, nullptr), H5Sclose);
  Q3VL_CHECK(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, extent, nullptr) >= 0 &&
                 H5Dread(d.id.get(), native_type<T>(), mem_space.get(), file_space.get(), H5P_DEFAULT, out.data()) >= 0,
             "shard ", path, ": cannot read dataset ", d.name, " (corrupt or truncated file)");
  return out;
}

// An offsets dataset [n+1] must start at 0, never decrease and end at `total`.
void check_offsets(const std::string& path, const std::string& name, const std::vector<int64_t>& offsets,
                   int64_t total, const std::string& total_name) {
  Q3VL_CHECK(!offsets.empty() && offsets.front() == 0, "shard ", path, ": dataset ", name,
             " must start with 0");
  for (size_t i = 1; i < offsets.size(); ++i)
    Q3VL_CHECK(offsets[i] >= offsets[i - 1], "shard ", path, ": dataset ", name, " decreases at index ", i);
  Q3VL_CHECK(offsets.back() == total, "shard ", path, ": dataset ", name, " ends at ", offsets.back(), " but ",
             total_name, " has ", total, " rows");
}

}  // namespace

int64_t ShardSequence::num_tokens() const {
  int64_t n = 0;
  for (const ShardDocument& d : documents) n += static_cast<int64_t>(d.tokens.size());
  return n;
}

int32_t stored_frames(VisionKind kind, int32_t grid_t) {
  return kind == VisionKind::image ? 1 : kTemporalPatchSize * grid_t;
}

ShardCounts write_shard(const std::string& path, const ShardHeader& header,
                        const std::vector<ShardSequence>& sequences) {
  Q3VL_CHECK(header.format_version == kShardFormatVersion, "shard ", path, ": cannot write format version ",
             header.format_version, " (this build writes ", kShardFormatVersion, ")");
  std::vector<int32_t> tokens, labels, item_grid, item_frame_hw;
  std::vector<int64_t> sequence_documents{0}, document_tokens{0}, document_source, document_items{0},
      item_token_offset, item_pixels{0};
  std::vector<uint8_t> item_kind, pixels;
  for (const ShardSequence& seq : sequences) {
    for (const ShardDocument& doc : seq.documents) {
      Q3VL_CHECK(doc.tokens.size() == doc.labels.size(), "shard ", path, ": a document has ", doc.tokens.size(),
                 " tokens but ", doc.labels.size(), " labels");
      tokens.insert(tokens.end(), doc.tokens.begin(), doc.tokens.end());
      labels.insert(labels.end(), doc.labels.begin(), doc.labels.end());
      document_tokens.push_back(static_cast<int64_t>(tokens.size()));
      document_source.push_back(doc.source_file);
      document_source.push_back(doc.sample_index);
      for (const ShardItem& item : doc.items) {
        Q3VL_CHECK(item.frames == stored_frames(item.kind, item.grid_t) && item.height == item.grid_h * kPatchSize &&
                       item.width == item.grid_w * kPatchSize &&
                       item.pixels.size() == static_cast<size_t>(item.frames) * item.height * item.width * 3,
                   "shard ", path, ": item with grid (", item.grid_t, ", ", item.grid_h, ", ", item.grid_w,
                   ") has ", item.frames, " frames of ", item.height, "x", item.width, " and ", item.pixels.size(),
                   " pixel bytes");
        item_kind.push_back(static_cast<uint8_t>(item.kind));
        item_grid.insert(item_grid.end(), {item.grid_t, item.grid_h, item.grid_w});
        item_frame_hw.insert(item_frame_hw.end(), {item.frames, item.height, item.width});
        item_token_offset.push_back(item.token_offset);
        pixels.insert(pixels.end(), item.pixels.begin(), item.pixels.end());
        item_pixels.push_back(static_cast<int64_t>(pixels.size()));
      }
      document_items.push_back(static_cast<int64_t>(item_kind.size()));
    }
    sequence_documents.push_back(static_cast<int64_t>(document_tokens.size() - 1));
  }
  QuietHdf5 quiet;
  H5Id file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  Q3VL_CHECK(file.valid(), "shard ", path, ": cannot create the file");
  write_int_attribute(file.get(), path, "format_version", header.format_version);
  write_string_attribute(file.get(), path, "tokenizer_hash", header.tokenizer_hash);
  write_int_attribute(file.get(), path, "token_budget", header.token_budget);
  write_dataset(file.get(), path, "tokens", tokens);
  write_dataset(file.get(), path, "labels", labels);
  write_dataset(file.get(), path, "sequence_documents", sequence_documents);
  write_dataset(file.get(), path, "document_tokens", document_tokens);
  write_dataset(file.get(), path, "document_source", document_source, 2);
  write_dataset(file.get(), path, "document_items", document_items);
  write_dataset(file.get(), path, "item_kind", item_kind);
  write_dataset(file.get(), path, "item_grid_thw", item_grid, 3);
  write_dataset(file.get(), path, "item_frame_hw", item_frame_hw, 3);
  write_dataset(file.get(), path, "item_token_offset", item_token_offset);
  write_dataset(file.get(), path, "item_pixels", item_pixels);
  write_dataset(file.get(), path, "pixels", pixels);
  Q3VL_CHECK(H5Fflush(file.get(), H5F_SCOPE_LOCAL) >= 0, "shard ", path, ": cannot flush the file");
  return ShardCounts{static_cast<int64_t>(sequences.size()), static_cast<int64_t>(document_tokens.size() - 1),
                     static_cast<int64_t>(tokens.size()), static_cast<int64_t>(item_kind.size()),
                     static_cast<int64_t>(pixels.size())};
}

struct ShardReader::Impl {
  std::string path;
  H5Id file;
  ShardHeader header;
  ShardCounts counts;
  Dataset tokens, labels, pixels;
  // Small index datasets, held in memory.
  std::vector<int64_t> sequence_documents, document_tokens, document_source, document_items, item_token_offset,
      item_pixels;
  std::vector<int32_t> item_grid, item_frame_hw;
  std::vector<uint8_t> item_kind;
};

ShardReader::ShardReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ShardReader::ShardReader(ShardReader&&) noexcept = default;
ShardReader& ShardReader::operator=(ShardReader&& other) noexcept {
  const std::lock_guard<std::recursive_mutex> lock(hdf5_mutex());
  impl_ = std::move(other.impl_);
  return *this;
}
ShardReader::~ShardReader() {
  const std::lock_guard<std::recursive_mutex> lock(hdf5_mutex());
  impl_.reset();
}

ShardReader ShardReader::open(const std::string& path) {
  QuietHdf5 quiet;
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->file = H5Id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  Q3VL_CHECK(impl->file.valid(), "shard ", path, ": cannot open as HDF5 (missing, truncated or corrupt file)");
  const hid_t f = impl->file.get();
  const int64_t version = read_int_attribute(f, path, "format_version");
  Q3VL_CHECK(version == kShardFormatVersion, "shard ", path, ": attribute format_version is ", version,
             ", this build reads only version ", kShardFormatVersion);
  impl->header = ShardHeader{static_cast<int32_t>(version), read_string_attribute(f, path, "tokenizer_hash"),
                             read_int_attribute(f, path, "token_budget")};

  impl->tokens = open_dataset<int32_t>(f, path, "tokens", 1);
  impl->labels = open_dataset<int32_t>(f, path, "labels", 1);
  impl->pixels = open_dataset<uint8_t>(f, path, "pixels", 1);
  const auto whole = [&](auto tag, const std::string& name, int rank, hsize_t cols) {
    using T = decltype(tag);
    const Dataset d = open_dataset<T>(f, path, name, rank, cols);
    return read_rows<T>(path, d, 0, d.rows);
  };
  impl->sequence_documents = whole(int64_t{}, "sequence_documents", 1, 1);
  impl->document_tokens = whole(int64_t{}, "document_tokens", 1, 1);
  impl->document_source = whole(int64_t{}, "document_source", 2, 2);
  impl->document_items = whole(int64_t{}, "document_items", 1, 1);
  impl->item_kind = whole(uint8_t{}, "item_kind", 1, 1);
  impl->item_grid = whole(int32_t{}, "item_grid_thw", 2, 3);
  impl->item_frame_hw = whole(int32_t{}, "item_frame_hw", 2, 3);
  impl->item_token_offset = whole(int64_t{}, "item_token_offset", 1, 1);
  impl->item_pixels = whole(int64_t{}, "item_pixels", 1, 1);

  const int64_t num_tokens = static_cast<int64_t>(impl->tokens.rows);
  Q3VL_CHECK(impl->labels.rows == impl->tokens.rows, "shard ", path, ": dataset labels has ", impl->labels.rows,
             " rows but dataset tokens has ", num_tokens);
  const int64_t num_docs = static_cast<int64_t>(impl->document_tokens.size()) - 1;
  const int64_t num_items = static_cast<int64_t>(impl->item_kind.size());
  check_offsets(path, "sequence_documents", impl->sequence_documents, num_docs, "document_tokens (minus one)");
  check_offsets(path, "document_tokens", impl->document_tokens, num_tokens, "tokens");
  Q3VL_CHECK(static_cast<int64_t>(impl->document_source.size()) == 2 * num_docs, "shard ", path,
             ": dataset document_source has ", impl->document_source.size() / 2, " rows, expected ", num_docs);
  Q3VL_CHECK(static_cast<int64_t>(impl->document_items.size()) == num_docs + 1, "shard ", path,
             ": dataset document_items has ", impl->document_items.size(), " rows, expected ", num_docs + 1);
  check_offsets(path, "document_items", impl->document_items, num_items, "item_kind");
  Q3VL_CHECK(static_cast<int64_t>(impl->item_grid.size()) == 3 * num_items &&
                 static_cast<int64_t>(impl->item_frame_hw.size()) == 3 * num_items &&
                 static_cast<int64_t>(impl->item_token_offset.size()) == num_items &&
                 static_cast<int64_t>(impl->item_pixels.size()) == num_items + 1,
             "shard ", path, ": datasets item_grid_thw, item_frame_hw, item_token_offset and item_pixels must have ",
             num_items, " rows (", num_items + 1, " for item_pixels) like item_kind");
  check_offsets(path, "item_pixels", impl->item_pixels, static_cast<int64_t>(impl->pixels.rows), "pixels");
  for (int64_t d = 0; d < num_docs; ++d) {
    const int64_t doc_len = impl->document_tokens[d + 1] - impl->document_tokens[d];
    for (int64_t i = impl->document_items[d]; i < impl->document_items[d + 1]; ++i) {
      const int32_t* g = &impl->item_grid[3 * i];
      const int32_t* fhw = &impl->item_frame_hw[3 * i];
      const uint8_t kind = impl->item_kind[i];
      Q3VL_CHECK(kind <= 1, "shard ", path, ": dataset item_kind row ", i, " is ", int{kind}, " (0 image, 1 video)");
      Q3VL_CHECK(g[0] > 0 && g[1] > 0 && g[2] > 0 && g[1] % 2 == 0 && g[2] % 2 == 0 &&
                     (kind == 1 || g[0] == 1),
                 "shard ", path, ": dataset item_grid_thw row ", i, " (", g[0], ", ", g[1], ", ", g[2],
                 ") is not a valid grid");
      // In int64: grid entries near 2^31 would overflow int32 products. The byte count bounds t*h*w (which
      // the loader multiplies later) by the file's size.
      Q3VL_CHECK(fhw[0] == (kind == 0 ? int64_t{1} : int64_t{kTemporalPatchSize} * g[0]) &&
                     fhw[1] == int64_t{g[1]} * kPatchSize && fhw[2] == int64_t{g[2]} * kPatchSize,
                 "shard ", path, ": dataset item_frame_hw row ", i, " disagrees with item_grid_thw");
      const std::optional<int64_t> bytes = checked_product({fhw[0], fhw[1], fhw[2], 3});
      Q3VL_CHECK(bytes && impl->item_pixels[i + 1] - impl->item_pixels[i] == *bytes, "shard ", path,
                 ": dataset item_pixels gives item ", i, " the wrong number of bytes");
      Q3VL_CHECK(impl->item_token_offset[i] >= 0 && impl->item_token_offset[i] < doc_len, "shard ", path,
                 ": dataset item_token_offset row ", i, " is outside its document");
    }
  }
  impl->counts = ShardCounts{static_cast<int64_t>(impl->sequence_documents.size()) - 1, num_docs, num_tokens,
                             num_items, static_cast<int64_t>(impl->pixels.rows)};
  return ShardReader(std::move(impl));
}

const std::string& ShardReader::path() const { return impl_->path; }
const ShardHeader& ShardReader::header() const { return impl_->header; }
const ShardCounts& ShardReader::counts() const { return impl_->counts; }

int64_t ShardReader::sequence_tokens(int64_t i) const {
  Q3VL_CHECK(i >= 0 && i < impl_->counts.sequences, "shard ", impl_->path, ": sequence ", i, " out of range [0, ",
             impl_->counts.sequences, ")");
  return impl_->document_tokens[impl_->sequence_documents[i + 1]] - impl_->document_tokens[impl_->sequence_documents[i]];
}

ShardSequenceSizes ShardReader::sequence_sizes(int64_t i) const {
  sequence_tokens(i);
  const Impl& s = *impl_;
  ShardSequenceSizes sizes;
  for (int64_t d = s.sequence_documents[i]; d < s.sequence_documents[i + 1]; ++d) {
    sizes.document_tokens.push_back(s.document_tokens[d + 1] - s.document_tokens[d]);
    for (int64_t k = s.document_items[d]; k < s.document_items[d + 1]; ++k)
      sizes.item_patches.push_back(int64_t{s.item_grid[3 * k]} * s.item_grid[3 * k + 1] * s.item_grid[3 * k + 2]);
  }
  return sizes;
}

ShardSequence ShardReader::read_sequence(int64_t i) const {
  sequence_tokens(i);
  QuietHdf5 quiet;
  const Impl& s = *impl_;
  ShardSequence seq;
  for (int64_t d = s.sequence_documents[i]; d < s.sequence_documents[i + 1]; ++d) {
    ShardDocument doc;
    doc.source_file = s.document_source[2 * d];
    doc.sample_index = s.document_source[2 * d + 1];
    const hsize_t begin = s.document_tokens[d], count = s.document_tokens[d + 1] - s.document_tokens[d];
    doc.tokens = read_rows<int32_t>(s.path, s.tokens, begin, count);
    doc.labels = read_rows<int32_t>(s.path, s.labels, begin, count);
    // Labels are not shifted: a trained position's label is its own token, anything else would train silently
    // on a wrong target.
    for (hsize_t t = 0; t < count; ++t)
      Q3VL_CHECK(doc.labels[t] == kIgnoreLabel || doc.labels[t] == doc.tokens[t], "shard ", s.path,
                 ": dataset labels row ", begin + t, " (document ", d, ") is ", doc.labels[t], ", expected ",
                 kIgnoreLabel, " or the token there, ", doc.tokens[t]);
    for (int64_t k = s.document_items[d]; k < s.document_items[d + 1]; ++k) {
      ShardItem item;
      item.kind = static_cast<VisionKind>(s.item_kind[k]);
      item.grid_t = s.item_grid[3 * k];
      item.grid_h = s.item_grid[3 * k + 1];
      item.grid_w = s.item_grid[3 * k + 2];
      item.frames = s.item_frame_hw[3 * k];
      item.height = s.item_frame_hw[3 * k + 1];
      item.width = s.item_frame_hw[3 * k + 2];
      item.token_offset = s.item_token_offset[k];
      item.pixels = read_rows<uint8_t>(s.path, s.pixels, s.item_pixels[k], s.item_pixels[k + 1] - s.item_pixels[k]);
      doc.items.push_back(std::move(item));
    }
    seq.documents.push_back(std::move(doc));
  }
  return seq;
}

std::string tokenizer_file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  Q3VL_CHECK(in, "tokenizer hash: cannot read ", path);
  uint64_t h = 14695981039346656037ull;
  char buf[1 << 16];
  while (in.read(buf, sizeof(buf)) || in.gcount() > 0) {
    for (std::streamsize i = 0; i < in.gcount(); ++i) {
      h ^= static_cast<unsigned char>(buf[i]);
      h *= 1099511628211ull;
    }
  }
  char hex[32];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(h));
  return std::string("fnv1a64:") + hex;
}

namespace {

nlohmann::json counts_json(const ShardCounts& c) {
  return {{"sequences", c.sequences}, {"documents", c.documents}, {"tokens", c.tokens},
          {"items", c.items},         {"pixel_bytes", c.pixel_bytes}};
}

}  // namespace

void write_manifest(const std::string& path, const Manifest& manifest) {
  nlohmann::json j;
  j["format_version"] = manifest.format_version;
  j["tokenizer_hash"] = manifest.tokenizer_hash;
  j["token_budget"] = manifest.token_budget;
  j["sources"] = manifest.sources;
  j["shards"] = nlohmann::json::array();
  for (const ManifestShard& s : manifest.shards) {
    nlohmann::json e = counts_json(s.counts);
    e["file"] = s.file;
    j["shards"].push_back(e);
  }
  j["summary"] = manifest.summary_json.empty() ? nlohmann::json::object() : nlohmann::json::parse(manifest.summary_json);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    Q3VL_CHECK(out, "manifest ", path, ": cannot write");
    out << j.dump(1) << "\n";
    Q3VL_CHECK(out.good(), "manifest ", path, ": write failed");
  }
  Q3VL_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "manifest ", path, ": cannot rename ", tmp);
}

Manifest read_manifest(const std::string& path) {
  std::ifstream in(path);
  Q3VL_CHECK(in, "manifest ", path, ": cannot open");
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {
    Q3VL_FAIL("manifest ", path, ": invalid JSON: ", e.what());
  }
  const auto field = [&](const nlohmann::json& obj, const char* name) -> const nlohmann::json& {
    Q3VL_CHECK(obj.is_object() && obj.contains(name), "manifest ", path, ": field ", name, " is missing");
    return obj.at(name);
  };
  // nlohmann converts 3.7 to 3 without complaint: counts must be JSON integers, and not negative.
  const auto count = [&](const nlohmann::json& obj, const char* name, size_t shard) {
    const nlohmann::json& v = field(obj, name);
    Q3VL_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0, "manifest ", path, ": shards[", shard, "].", name,
               " is ", v.dump(), ", expected a non-negative integer");
    return v.get<int64_t>();
  };
  Manifest m;
  try {
    m.format_version = field(j, "format_version").get<int32_t>();
    Q3VL_CHECK(m.format_version == kShardFormatVersion, "manifest ", path, ": format_version is ", m.format_version,
               ", this build reads only version ", kShardFormatVersion);
    m.tokenizer_hash = field(j, "tokenizer_hash").get<std::string>();
    const nlohmann::json& budget = field(j, "token_budget");
    Q3VL_CHECK(budget.is_number_integer() && budget.get<int64_t>() > 0, "manifest ", path, ": token_budget is ",
               budget.dump(), ", expected a positive integer");
    m.token_budget = budget.get<int64_t>();
    m.sources = field(j, "sources").get<std::vector<std::string>>();
    std::set<std::string> seen;
    for (const nlohmann::json& s : field(j, "shards")) {
      const size_t k = m.shards.size();
      ManifestShard e;
      e.file = field(s, "file").get<std::string>();
      // Shards live in the pack's folder: the loader opens folder/file, so the name is checked before any
      // open ('/etc/passwd' or '../x' would read outside it).
      const std::filesystem::path file(e.file);
      bool escapes = e.file.empty() || file.is_absolute() || file.has_root_name();
      for (const std::filesystem::path& part : file) escapes = escapes || part == "..";
      Q3VL_CHECK(!escapes, "manifest ", path, ": shards[", k, "].file '", e.file,
                 "' is not a path inside the manifest's folder (absolute or with '..')");
      Q3VL_CHECK(seen.insert(file.lexically_normal().string()).second, "manifest ", path, ": shards[", k, "].file '",
                 e.file, "' is listed twice");
      e.counts = ShardCounts{count(s, "sequences", k), count(s, "documents", k), count(s, "tokens", k),
                             count(s, "items", k), count(s, "pixel_bytes", k)};
      m.shards.push_back(e);
    }
    if (j.contains("summary")) m.summary_json = j["summary"].dump();
  } catch (const nlohmann::json::exception& e) {
    Q3VL_FAIL("manifest ", path, ": wrong field type: ", e.what());
  }
  return m;
}

void check_manifest_shard(const Manifest& manifest, const ManifestShard& entry, const ShardReader& shard) {
  const std::string& p = shard.path();
  Q3VL_CHECK(shard.header().tokenizer_hash == manifest.tokenizer_hash, "shard ", p, ": attribute tokenizer_hash ",
             shard.header().tokenizer_hash, " disagrees with the manifest's ", manifest.tokenizer_hash);
  Q3VL_CHECK(shard.header().token_budget == manifest.token_budget, "shard ", p, ": attribute token_budget ",
             shard.header().token_budget, " disagrees with the manifest's ", manifest.token_budget);
  const ShardCounts& have = shard.counts();
  const ShardCounts& want = entry.counts;
  const auto same = [&](int64_t h, int64_t w, const char* dataset, const char* what) {
    Q3VL_CHECK(h == w, "shard ", p, ": dataset ", dataset, " holds ", h, " ", what, " but the manifest says ", w);
  };
  same(have.sequences, want.sequences, "sequence_documents", "sequences");
  same(have.documents, want.documents, "document_tokens", "documents");
  same(have.tokens, want.tokens, "tokens", "tokens");
  same(have.items, want.items, "item_kind", "items");
  same(have.pixel_bytes, want.pixel_bytes, "pixels", "bytes");
  for (int64_t i = 0; i < have.sequences; ++i)
    Q3VL_CHECK(shard.sequence_tokens(i) <= manifest.token_budget, "shard ", p, ": sequence ", i, " has ",
               shard.sequence_tokens(i), " tokens, over the manifest's token_budget ", manifest.token_budget);
}

}  // namespace q3vl::io
