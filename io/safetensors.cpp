// safetensors reading (mmap + validation), conversion to f32, and writing single files and sharded dirs.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <utility>

#include "core/check.h"
#include "io/float16.h"
#include "io/write_progress.h"

namespace q3vl::io {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct DTypeRow {
  StDType dtype;
  std::string_view name;
  size_t size;
};

constexpr std::array<DTypeRow, 15> kDTypes{{
    {StDType::BOOL, "BOOL", 1},
    {StDType::U8, "U8", 1},
    {StDType::I8, "I8", 1},
    {StDType::F8_E5M2, "F8_E5M2", 1},
    {StDType::F8_E4M3, "F8_E4M3", 1},
    {StDType::I16, "I16", 2},
    {StDType::U16, "U16", 2},
    {StDType::F16, "F16", 2},
    {StDType::BF16, "BF16", 2},
    {StDType::I32, "I32", 4},
    {StDType::U32, "U32", 4},
    {StDType::F32, "F32", 4},
    {StDType::F64, "F64", 8},
    {StDType::I64, "I64", 8},
    {StDType::U64, "U64", 8},
}};

// The crate refuses headers above 100 MB; so do we (a corrupt length must not make us parse gigabytes).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// numel * element size with overflow detection; nullopt on overflow.
std::optional<uint64_t> checked_nbytes(const std::vector<int64_t>& shape, size_t elem) {
  uint64_t n = elem;
  for (int64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d)) return std::nullopt;
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? "," : "") << shape[i];
  os << "]";
  return os.str();
}

uint64_t read_u64_le(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint64_t>(p[i]);
  return v;
}

bool is_float_storage(DType dt) { return dt == DType::f32 || dt == DType::bf16 || dt == DType::f16; }

// Element-wise conversion loop; `convert` maps one stored element to one output element. Threads only pay
// off on large tensors: small ones would spend more on waking the team than converting.
template <class In, class Out, class F>
void convert_loop(const std::byte* src, int64_t count, std::byte* dst, F convert) {
  constexpr int64_t kParallelMin = 1 << 16;
#pragma omp parallel for schedule(static) if (count >= kParallelMin)
  for (int64_t i = 0; i < count; ++i) {
    In in;
    std::memcpy(&in, src + i * static_cast<int64_t>(sizeof(In)), sizeof(In));
    const Out out = convert(in);
    std::memcpy(dst + i * static_cast<int64_t>(sizeof(Out)), &out, sizeof(Out));
  }
}

// Writes `count` elements of host data `src` (dtype `from`) as `to` into `out` (float storage types only
// when they differ). Unaligned source bytes are fine: elements are loaded with memcpy.
void encode(const void* src, DType from, int64_t count, DType to, std::byte* out) {
  const auto* in = static_cast<const std::byte*>(src);
  if (from == to) {
    std::memcpy(out, in, static_cast<size_t>(count) * dtype_size(from));
    return;
  }
  Q3VL_CHECK(is_float_storage(from) && is_float_storage(to), "cannot store ", dtype_name(from), " as ", dtype_name(to));
  // Lambdas, not function pointers, so the conversions inline into the loops.
  if (from == DType::f32 && to == DType::bf16)
    return convert_loop<float, uint16_t>(in, count, out, [](float f) { return f32_to_bf16(f); });
  if (from == DType::f32) return convert_loop<float, uint16_t>(in, count, out, [](float f) { return f32_to_f16(f); });
  if (to == DType::f32 && from == DType::bf16)
    return convert_loop<uint16_t, float>(in, count, out, [](uint16_t h) { return bf16_to_f32(h); });
  if (to == DType::f32) return convert_loop<uint16_t, float>(in, count, out, [](uint16_t h) { return f16_to_f32(h); });
  const auto widen = from == DType::bf16 ? bf16_to_f32 : f16_to_f32;
  const auto narrow = to == DType::bf16 ? f32_to_bf16 : f32_to_f16;
  convert_loop<uint16_t, uint16_t>(in, count, out, [&](uint16_t h) { return narrow(widen(h)); });
}

DType stored_dtype(const Tensor& t, DType float_dtype) { return is_float_storage(t.dtype()) ? float_dtype : t.dtype(); }

std::vector<int64_t> shape_vector(const Tensor& t) {
  std::vector<int64_t> s(static_cast<size_t>(t.ndim()));
  for (int i = 0; i < t.ndim(); ++i) s[static_cast<size_t>(i)] = t.size(i);
  return s;
}

// Writes `path` through "<path>.tmp" + rename; `emit` streams the content. A failed write removes the
// temporary file and leaves any earlier `path` untouched.
template <class Emit>
void write_atomically(const std::string& path, Emit&& emit) {
  const std::string tmp = path + ".tmp";
  try {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    Q3VL_CHECK(out, "cannot open ", tmp, " for writing: ", std::strerror(errno));
    emit(out);
    out.flush();
    Q3VL_CHECK(out, "write to ", tmp, " failed: ", std::strerror(errno));
  } catch (...) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  Q3VL_CHECK(!ec, "cannot rename ", tmp, " to ", path, ": ", ec.message());
}

}  // namespace

size_t st_dtype_size(StDType dt) { return kDTypes[static_cast<size_t>(dt)].size; }
std::string_view st_dtype_name(StDType dt) { return kDTypes[static_cast<size_t>(dt)].name; }

std::optional<StDType> parse_st_dtype(std::string_view name) {
  for (const auto& row : kDTypes)
    if (row.name == name) return row.dtype;
  return std::nullopt;
}

std::optional<DType> to_dtype(StDType dt) {
  switch (dt) {
    case StDType::F32:
      return DType::f32;
    case StDType::F64:
      return DType::f64;
    case StDType::BF16:
      return DType::bf16;
    case StDType::F16:
      return DType::f16;
    case StDType::I32:
      return DType::i32;
    case StDType::I64:
      return DType::i64;
    case StDType::U8:
      return DType::u8;
    default:
      return std::nullopt;
  }
}

StDType to_st_dtype(DType dt) {
  switch (dt) {
    case DType::f32:
      return StDType::F32;
    case DType::f64:
      return StDType::F64;
    case DType::bf16:
      return StDType::BF16;
    case DType::f16:
      return StDType::F16;
    case DType::i32:
      return StDType::I32;
    case DType::i64:
      return StDType::I64;
    case DType::u8:
      return StDType::U8;
  }
  Q3VL_FAIL("unknown dtype ", static_cast<int>(dt));
}

int64_t StTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string StTensorInfo::shape_str() const { return shape_string(shape); }

void convert_into(std::span<const std::byte> src_bytes, StDType src_dtype, const Tensor& dst, const std::string& what) {
  Q3VL_CHECK(dst.device() == Device::cpu && dst.is_contiguous(), what, ": destination ", dst.str(),
             " is not contiguous host memory");
  const int64_t count = dst.numel();
  Q3VL_CHECK(src_bytes.size() == static_cast<size_t>(count) * st_dtype_size(src_dtype), what, ": ", src_bytes.size(),
             " bytes of ", st_dtype_name(src_dtype), " do not fill destination ", dst.str());
  const std::optional<DType> same = to_dtype(src_dtype);
  if (same && *same == dst.dtype()) {
    std::memcpy(dst.raw(), src_bytes.data(), src_bytes.size());
    return;
  }
  Q3VL_CHECK(dst.dtype() == DType::f32 && same && is_float_storage(*same), what, ": cannot convert ",
             st_dtype_name(src_dtype), " to ", dtype_name(dst.dtype()));
  encode(src_bytes.data(), *same, count, DType::f32, static_cast<std::byte*>(dst.raw()));
}

// ---------------------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  Q3VL_CHECK(fd >= 0, "safetensors: cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    Q3VL_FAIL("safetensors: cannot stat ", path, ": ", std::strerror(err));
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ > 0) {
    void* p = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    Q3VL_CHECK(p != MAP_FAILED, "safetensors: cannot map ", path, ": ", std::strerror(err));
    map_ = static_cast<const std::byte*>(p);
  } else {
    ::close(fd);
  }
  try {
    Q3VL_CHECK(map_size_ >= 8, "safetensors: ", path, " is truncated: ", map_size_,
               " bytes, shorter than the 8-byte header length");
    const uint64_t n = read_u64_le(map_);
    Q3VL_CHECK(n <= kMaxHeaderBytes, "safetensors: ", path, ": header length ", n, " exceeds the limit of ",
               kMaxHeaderBytes, " bytes");
    Q3VL_CHECK(8 + n <= map_size_, "safetensors: ", path, " is truncated: header length ", n, " needs ", 8 + n,
               " bytes but the file has ", map_size_);
    header_bytes_ = static_cast<size_t>(n);
    const std::string_view text(reinterpret_cast<const char*>(map_ + 8), header_bytes_);

    json header;
    try {
      header = json::parse(text);
    } catch (const json::exception& e) {
      Q3VL_FAIL("safetensors: ", path, ": bad header JSON: ", e.what());
    }
    Q3VL_CHECK(header.is_object(), "safetensors: ", path, ": header JSON is not an object");

    for (const auto& [key, entry] : header.items()) {
      if (key == "__metadata__") {
        Q3VL_CHECK(entry.is_object(), "safetensors: ", path, ": __metadata__ is not an object");
        for (const auto& [mk, mv] : entry.items()) {
          Q3VL_CHECK(mv.is_string(), "safetensors: ", path, ": __metadata__ value of '", mk, "' is not a string");
          metadata_[mk] = mv.get<std::string>();
        }
        continue;
      }
      auto bad = [&](const auto&... why) { Q3VL_FAIL("safetensors: ", path, ": tensor '", key, "': ", why...); };
      if (!entry.is_object()) bad("entry is not an object");
      for (const auto& [field, value] : entry.items()) {
        (void)value;
        if (field != "dtype" && field != "shape" && field != "data_offsets") bad("unknown field '", field, "'");
      }
      if (!entry.contains("dtype") || !entry["dtype"].is_string()) bad("missing or non-string dtype");
      const std::string dtype_text = entry["dtype"].get<std::string>();
      const std::optional<StDType> dtype = parse_st_dtype(dtype_text);
      if (!dtype) bad("unknown dtype '", dtype_text, "'");
      if (!entry.contains("shape") || !entry["shape"].is_array()) bad("missing or non-array shape");
      StTensorInfo info;
      info.key = key;
      info.dtype = *dtype;
      for (const auto& d : entry["shape"]) {
        if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
          bad("shape ", entry["shape"].dump(), " has an entry that is not a non-negative 64-bit integer");
        info.shape.push_back(d.get<int64_t>());
      }
      const json& offsets = entry.contains("data_offsets") ? entry["data_offsets"] : json();
      if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
          !offsets[1].is_number_unsigned())
        bad("data_offsets must be two non-negative integers");
      info.begin = offsets[0].get<uint64_t>();
      info.end = offsets[1].get<uint64_t>();
      if (info.end < info.begin) bad("data_offsets [", info.begin, ",", info.end, "] end before begin");
      const std::optional<uint64_t> nbytes = checked_nbytes(info.shape, st_dtype_size(info.dtype));
      if (!nbytes) bad("shape ", info.shape_str(), " overflows");
      if (*nbytes != info.end - info.begin)
        bad("data_offsets [", info.begin, ",", info.end, "] hold ", info.end - info.begin, " bytes but ", dtype_text,
            info.shape_str(), " needs ", *nbytes);
      tensors_.push_back(std::move(info));
    }

    std::sort(tensors_.begin(), tensors_.end(), [](const StTensorInfo& a, const StTensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    const uint64_t data_size = map_size_ - 8 - header_bytes_;
    for (const StTensorInfo& t : tensors_)
      Q3VL_CHECK(t.end <= data_size, "safetensors: ", path, " is truncated or tensor '", t.key,
                 "' has offsets out of range: data_offsets [", t.begin, ",", t.end, "] but the data buffer has ",
                 data_size, " bytes");
    uint64_t covered = 0;
    for (const StTensorInfo& t : tensors_) {
      Q3VL_CHECK(t.begin >= covered, "safetensors: ", path, ": tensor '", t.key, "' data_offsets [", t.begin, ",",
                 t.end, "] overlap the previous tensor, which ends at ", covered);
      Q3VL_CHECK(t.begin == covered, "safetensors: ", path, ": gap of ", t.begin - covered,
                 " bytes in the data buffer before tensor '", t.key, "'");
      covered = t.end;
    }
    Q3VL_CHECK(covered == data_size, "safetensors: ", path, ": ", data_size - covered,
               " trailing bytes after the last tensor");
    for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].key, i);
  } catch (...) {
    unmap();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      map_size_(std::exchange(other.map_size_, 0)),
      header_bytes_(other.header_bytes_),
      metadata_(std::move(other.metadata_)),
      tensors_(std::move(other.tensors_)),
      index_(std::move(other.index_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    header_bytes_ = other.header_bytes_;
    metadata_ = std::move(other.metadata_);
    tensors_ = std::move(other.tensors_);
    index_ = std::move(other.index_);
  }
  return *this;
}

void SafetensorsFile::unmap() {
  if (map_ != nullptr) ::munmap(const_cast<std::byte*>(map_), map_size_);
  map_ = nullptr;
  map_size_ = 0;
}

const StTensorInfo* SafetensorsFile::find(std::string_view key) const {
  const auto it = index_.find(key);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const StTensorInfo& SafetensorsFile::info(std::string_view key) const {
  const StTensorInfo* t = find(key);
  Q3VL_CHECK(t != nullptr, "safetensors: ", path_, " has no tensor '", key, "'");
  return *t;
}

std::span<const std::byte> SafetensorsFile::bytes(const StTensorInfo& t) const {
  return {map_ + 8 + header_bytes_ + t.begin, static_cast<size_t>(t.end - t.begin)};
}

Tensor SafetensorsFile::view(const StTensorInfo& t) const {
  const std::optional<DType> dt = to_dtype(t.dtype);
  Q3VL_CHECK(dt.has_value(), "safetensors: ", path_, ": tensor '", t.key, "' has dtype ", st_dtype_name(t.dtype),
             ", which q3vl tensors cannot describe");
  Q3VL_CHECK(static_cast<int>(t.shape.size()) <= kMaxDims, "safetensors: ", path_, ": tensor '", t.key, "' has ",
             t.shape.size(), " dimensions, more than ", kMaxDims);
  Shape s;
  for (int64_t d : t.shape) s.dims[s.ndim++] = d;
  return Tensor(const_cast<std::byte*>(bytes(t).data()), *dt, s);
}

void SafetensorsFile::read(std::string_view key, const Tensor& dst) const {
  const StTensorInfo& t = info(key);
  std::vector<int64_t> dst_shape(static_cast<size_t>(dst.ndim()));
  for (int i = 0; i < dst.ndim(); ++i) dst_shape[static_cast<size_t>(i)] = dst.size(i);
  Q3VL_CHECK(dst_shape == t.shape, "safetensors: ", path_, ": tensor '", key, "' has shape ", t.shape_str(),
             ", expected ", shape_string(dst_shape));
  // Ask the kernel to read the whole range ahead: faulting it in page by page is slow on network file systems.
  const std::span<const std::byte> data = bytes(t);
  if (!data.empty()) {
    const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto begin = reinterpret_cast<uintptr_t>(data.data()) / page * page;
    ::madvise(reinterpret_cast<void*>(begin), reinterpret_cast<uintptr_t>(data.data()) + data.size() - begin,
              MADV_WILLNEED);
  }
  convert_into(data, t.dtype, dst, "safetensors: " + path_ + ": tensor '" + std::string(key) + "'");
}

// ---------------------------------------------------------------------------------------------------------
// SafetensorsDir

SafetensorsDir::SafetensorsDir(const std::string& dir) : dir_(dir) {
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  Q3VL_CHECK(!(fs::exists(index_path) && fs::exists(single_path)), "safetensors: ", dir,
             " has both model.safetensors and model.safetensors.index.json: which one holds the weights is ambiguous");
  if (!fs::exists(index_path)) {
    Q3VL_CHECK(fs::exists(single_path), "safetensors: ", dir, " has neither model.safetensors.index.json nor ",
               "model.safetensors");
    files_.emplace_back(single_path.string());
    for (const StTensorInfo& t : files_[0].tensors()) file_index_.emplace(t.key, 0);
    return;
  }
  json index;
  {
    std::ifstream in(index_path);
    Q3VL_CHECK(in, "safetensors: cannot open ", index_path.string());
    try {
      index = json::parse(in);
    } catch (const json::exception& e) {
      Q3VL_FAIL("safetensors: ", index_path.string(), ": bad JSON: ", e.what());
    }
  }
  Q3VL_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
             "safetensors: ", index_path.string(), " has no weight_map object");
  // metadata.total_size is informational: transformers computes it from storages (shared tensors, older
  // versions count differently), so it is not compared with the shards.
  std::map<std::string, size_t> file_position;
  for (const auto& [key, file] : index["weight_map"].items()) {
    Q3VL_CHECK(file.is_string(), "safetensors: ", index_path.string(), ": weight_map entry '", key,
               "' is not a file name");
    const std::string name = file.get<std::string>();
    Q3VL_CHECK(name.find('/') == std::string::npos && name != ".." && !name.empty(),
               "safetensors: ", index_path.string(), ": weight_map entry '", key, "' names '", name,
               "', not a file in ", dir);
    auto [it, inserted] = file_position.emplace(name, files_.size());
    if (inserted) {
      const fs::path shard = fs::path(dir) / name;
      Q3VL_CHECK(fs::exists(shard), "safetensors: ", index_path.string(), " lists shard ", name, " (for '", key,
                 "'), which does not exist");
      files_.emplace_back(shard.string());
    }
    const SafetensorsFile& f = files_[it->second];
    Q3VL_CHECK(f.find(key) != nullptr, "safetensors: ", index_path.string(), " maps '", key, "' to ", f.path(),
               ", which has no such tensor");
    file_index_.emplace(key, it->second);
  }
  for (size_t i = 0; i < files_.size(); ++i)
    for (const StTensorInfo& t : files_[i].tensors()) {
      const auto it = file_index_.find(t.key);
      Q3VL_CHECK(it != file_index_.end() && it->second == i, "safetensors: ", files_[i].path(), " holds tensor '",
                 t.key, "', which ", index_path.string(),
                 (it == file_index_.end() ? " does not list" : " maps elsewhere"));
    }
}

std::vector<std::string> SafetensorsDir::keys() const {
  std::vector<std::string> out;
  out.reserve(file_index_.size());
  for (const auto& [k, i] : file_index_) out.push_back(k);
  return out;
}

bool SafetensorsDir::contains(std::string_view key) const { return file_index_.find(key) != file_index_.end(); }

const SafetensorsFile& SafetensorsDir::file_of(std::string_view key) const {
  const auto it = file_index_.find(key);
  Q3VL_CHECK(it != file_index_.end(), "safetensors: ", dir_, " has no tensor '", key, "'");
  return files_[it->second];
}

const StTensorInfo& SafetensorsDir::info(std::string_view key) const { return file_of(key).info(key); }

void SafetensorsDir::read(std::string_view key, const Tensor& dst) const { file_of(key).read(key, dst); }

// ---------------------------------------------------------------------------------------------------------
// Writers

namespace {

// The header and tensor order of one file, planned (and checked) before any byte is written.
struct StFilePlan {
  std::string header;  // JSON padded to a multiple of 8 bytes
  std::vector<const StWriteEntry*> order;
};

StFilePlan plan_file(const std::string& what, const std::vector<StWriteEntry>& entries, DType dtype,
                     const std::map<std::string, std::string>& metadata) {
  Q3VL_CHECK(is_float_storage(dtype), "safetensors: cannot write ", what, " in ", dtype_name(dtype),
             " (expected f32, bf16 or f16)");
  StFilePlan plan;
  for (const StWriteEntry& e : entries) {
    Q3VL_CHECK(e.tensor.device() == Device::cpu && e.tensor.is_contiguous(), "safetensors: writing ", what,
               ": tensor '", e.key, "' ", e.tensor.str(), " is not contiguous host memory");
    Q3VL_CHECK(e.key != "__metadata__", "safetensors: writing ", what, ": '__metadata__' is not a tensor name");
    plan.order.push_back(&e);
  }
  std::sort(plan.order.begin(), plan.order.end(), [&](const StWriteEntry* a, const StWriteEntry* b) {
    const StDType da = to_st_dtype(stored_dtype(a->tensor, dtype));
    const StDType db = to_st_dtype(stored_dtype(b->tensor, dtype));
    return da != db ? da > db : a->key < b->key;
  });
  for (size_t i = 1; i < plan.order.size(); ++i)
    Q3VL_CHECK(plan.order[i - 1]->key != plan.order[i]->key, "safetensors: writing ", what, ": duplicate tensor '",
               plan.order[i]->key, "'");

  std::string& header = plan.header;
  header = "{";
  if (!metadata.empty()) header += "\"__metadata__\":" + json(metadata).dump() + ",";
  uint64_t offset = 0;
  for (const StWriteEntry* e : plan.order) {
    const DType out = stored_dtype(e->tensor, dtype);
    const uint64_t n = static_cast<uint64_t>(e->tensor.numel()) * dtype_size(out);
    header += json(e->key).dump() + ":{\"dtype\":\"" + std::string(st_dtype_name(to_st_dtype(out))) +
              "\",\"shape\":" + json(shape_vector(e->tensor)).dump() + ",\"data_offsets\":[" + std::to_string(offset) +
              "," + std::to_string(offset + n) + "]},";
    offset += n;
  }
  if (header.back() == ',') header.pop_back();
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  return plan;
}

void emit_file(const StFilePlan& plan, DType dtype, const StByteSink& sink) {
  std::array<char, 8> len{};
  for (int i = 0; i < 8; ++i) len[static_cast<size_t>(i)] = static_cast<char>((plan.header.size() >> (8 * i)) & 0xff);
  sink(len.data(), len.size());
  sink(plan.header.data(), plan.header.size());
  // Converted in bounded chunks so a large tensor never needs a second full-size buffer.
  constexpr int64_t kChunkElems = 1 << 22;
  std::vector<std::byte> buffer;
  for (const StWriteEntry* e : plan.order) {
    const DType from = e->tensor.dtype();
    const DType to = stored_dtype(e->tensor, dtype);
    if (e->prepare) e->prepare();
    const int64_t count = e->tensor.numel();
    const auto* src = static_cast<const std::byte*>(e->tensor.raw());
    for (int64_t start = 0; start < count; start += kChunkElems) {
      const int64_t len = std::min(kChunkElems, count - start);
      buffer.resize(static_cast<size_t>(len) * dtype_size(to));
      encode(src + start * static_cast<int64_t>(dtype_size(from)), from, len, to, buffer.data());
      sink(buffer.data(), buffer.size());
    }
  }
}

}  // namespace

void write_safetensors_file(const std::string& path, const std::vector<StWriteEntry>& entries, DType dtype,
                            const std::map<std::string, std::string>& metadata) {
  const StFilePlan plan = plan_file(path, entries, dtype, metadata);
  write_atomically(path, [&](std::ofstream& out) {
    emit_file(plan, dtype, [&](const void* data, size_t size) {
      out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
      note_bytes_written(size);
    });
  });
}

void write_safetensors(const StByteSink& sink, const std::string& what, const std::vector<StWriteEntry>& entries,
                       DType dtype, const std::map<std::string, std::string>& metadata) {
  emit_file(plan_file(what, entries, dtype, metadata), dtype, sink);
}

StDirLayout write_safetensors_dir(const std::string& dir, const std::vector<StWriteEntry>& entries, DType dtype,
                                  uint64_t max_shard_bytes) {
  Q3VL_CHECK(is_float_storage(dtype), "safetensors: cannot write ", dir, " in ", dtype_name(dtype),
             " (expected f32, bf16 or f16)");
  std::error_code ec;
  fs::create_directories(dir, ec);
  Q3VL_CHECK(!ec, "safetensors: cannot create directory ", dir, ": ", ec.message());

  std::vector<std::vector<StWriteEntry>> shards;
  uint64_t shard_bytes = 0;
  StDirLayout layout;
  for (const StWriteEntry& e : entries) {
    const uint64_t n = static_cast<uint64_t>(e.tensor.numel()) * dtype_size(stored_dtype(e.tensor, dtype));
    if (shards.empty() || (max_shard_bytes > 0 && shard_bytes > 0 && shard_bytes + n > max_shard_bytes)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(e);
    shard_bytes += n;
    layout.total_size += n;
  }
  if (shards.empty()) shards.emplace_back();

  const size_t count = shards.size();
  for (size_t i = 0; i < count; ++i) {
    std::string name = "model.safetensors";
    if (count > 1) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, count);
      name = buf;
    }
    layout.files.push_back(name);
    if (count > 1)
      for (const StWriteEntry& e : shards[i]) layout.weight_map[e.key] = name;
  }

  for (size_t i = 0; i < count; ++i)
    write_safetensors_file((fs::path(dir) / layout.files[i]).string(), shards[i], dtype);

  if (count > 1) {
    json index;
    index["metadata"]["total_size"] = layout.total_size;
    index["weight_map"] = layout.weight_map;
    const std::string text = index.dump(2) + "\n";
    write_atomically((fs::path(dir) / "model.safetensors.index.json").string(),
                     [&](std::ofstream& out) { out << text; });
  }
  // Only after the new files are complete: remove what an earlier save left that this layout did not
  // rewrite, so the directory has one reading.
  static const std::regex kWeightsFile(R"(model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?)");
  std::vector<fs::path> stale;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    const bool ours = std::find(layout.files.begin(), layout.files.end(), name) != layout.files.end() ||
                      (count > 1 && name == "model.safetensors.index.json");
    if (!ours && std::regex_match(name, kWeightsFile)) stale.push_back(entry.path());
  }
  for (const fs::path& p : stale) fs::remove(p);

  return layout;
}

}  // namespace q3vl::io
