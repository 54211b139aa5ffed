// HDF5 batch reading with schema validation, batch and output writing, through the HDF5 C API.
#include "io/hdf5_batch.h"

#include <hdf5.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>
#include <set>
#include <type_traits>
#include <utility>

#include "core/check.h"
#include "core/checked_math.h"

namespace q3vl::io {

namespace fs = std::filesystem;

static_assert(std::is_same_v<hid_t, int64_t>, "Hdf5Writer stores the file id as int64_t");

namespace {

// Owns one HDF5 identifier and closes it with the matching H5?close.
class H5Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Handle() = default;
  H5Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~H5Handle() { reset(); }
  H5Handle(H5Handle&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)), closer_(o.closer_) {}
  H5Handle& operator=(H5Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
      closer_ = o.closer_;
    }
    return *this;
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset() {
    if (id_ >= 0 && closer_ != nullptr) closer_(id_);
    id_ = H5I_INVALID_HID;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// Silences HDF5's automatic error-stack printing while in scope: failures become our own messages.
class QuietErrors {
 public:
  QuietErrors() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietErrors() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

struct DatasetInfo {
  H5Handle dataset;
  std::vector<int64_t> shape;
};

const char* class_name(H5T_class_t c) {
  switch (c) {
    case H5T_INTEGER:
      return "integer";
    case H5T_FLOAT:
      return "float";
    case H5T_STRING:
      return "string";
    default:
      return "non-numeric";
  }
}

// Opens `name` and checks its element type (class, size, signedness) and rank (-1: any).
DatasetInfo open_dataset(hid_t file, const std::string& path, const std::string& name, H5T_class_t cls, size_t size,
                         int rank) {
  DatasetInfo info;
  info.dataset = H5Handle(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose);
  Q3VL_CHECK(info.dataset.valid(), "hdf5 ", path, ": cannot open dataset '", name, "'");
  const H5Handle type(H5Dget_type(info.dataset.get()), H5Tclose);
  const H5T_class_t got_class = H5Tget_class(type.get());
  const size_t got_size = H5Tget_size(type.get());
  const bool sign_ok = cls != H5T_INTEGER || H5Tget_sign(type.get()) == H5T_SGN_2;
  Q3VL_CHECK(got_class == cls && got_size == size && sign_ok, "hdf5 ", path, ": dataset '", name, "' has ",
             (got_class == H5T_INTEGER && H5Tget_sign(type.get()) == H5T_SGN_NONE ? "unsigned " : ""),
             class_name(got_class), got_size * 8, " elements, expected ", cls == H5T_INTEGER ? "int" : "float",
             size * 8);
  const H5Handle space(H5Dget_space(info.dataset.get()), H5Sclose);
  const int got_rank = H5Sget_simple_extent_ndims(space.get());
  std::vector<hsize_t> dims(static_cast<size_t>(std::max(got_rank, 0)));
  if (got_rank > 0) H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  for (hsize_t d : dims) info.shape.push_back(static_cast<int64_t>(d));
  Q3VL_CHECK(rank < 0 || got_rank == rank, "hdf5 ", path, ": dataset '", name, "' has rank ", got_rank, ", expected ",
             rank);
  return info;
}

template <class T>
std::vector<T> read_all(const DatasetInfo& d, hid_t mem_type, const std::string& path, const std::string& name) {
  int64_t n = 1;
  for (int64_t s : d.shape) {
    const std::optional<int64_t> next = checked_product({n, s});
    Q3VL_CHECK(s >= 0 && next, "hdf5 ", path, ": dataset '", name, "' has more elements than int64 counts");
    n = *next;
  }
  std::vector<T> out(static_cast<size_t>(n));
  if (n > 0)
    Q3VL_CHECK(H5Dread(d.dataset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) >= 0, "hdf5 ", path,
               ": reading dataset '", name, "' failed (truncated or corrupt file?)");
  return out;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i > 0) out += ",";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

// Patches of an [n,3] grid: the sum of t*h*w over its rows; `what` names the grid in the overflow error.
int64_t grid_patches(const std::vector<int64_t>& grid, const std::string& what) {
  int64_t n = 0;
  for (size_t i = 0; i + 2 < grid.size(); i += 3) {
    const std::optional<int64_t> rows = checked_product({grid[i], grid[i + 1], grid[i + 2]});
    const std::optional<int64_t> sum = rows ? checked_sum(n, *rows) : std::nullopt;
    Q3VL_CHECK(sum, what, " row ", i / 3, " = [", grid[i], ",", grid[i + 1], ",", grid[i + 2],
               "]: the patch count t*h*w (summed over rows) overflows int64");
    n = *sum;
  }
  return n;
}

// Reads one (pixels, grid) pair, both present or both absent.
void read_vision(hid_t file, const std::string& path, const std::set<std::string>& present, const char* pixels_name,
                 const char* grid_name, const BatchLimits& limits, std::vector<float>& pixels,
                 std::vector<int64_t>& grid) {
  const bool has_pixels = present.contains(pixels_name), has_grid = present.contains(grid_name);
  Q3VL_CHECK(has_pixels == has_grid, "hdf5 ", path, ": dataset '", has_pixels ? pixels_name : grid_name, "' needs '",
             has_pixels ? grid_name : pixels_name, "' too");
  if (!has_pixels) return;
  const DatasetInfo g = open_dataset(file, path, grid_name, H5T_INTEGER, 8, 2);
  Q3VL_CHECK(g.shape[1] == 3, "hdf5 ", path, ": dataset '", grid_name, "' has shape ", shape_str(g.shape),
             ", expected [n,3]");
  grid = read_all<int64_t>(g, H5T_NATIVE_INT64, path, grid_name);
  for (size_t i = 0; i < grid.size(); i += 3) {
    const int64_t t = grid[i], h = grid[i + 1], w = grid[i + 2];
    Q3VL_CHECK(t >= 1 && h >= 1 && w >= 1, "hdf5 ", path, ": dataset '", grid_name, "' row ", i / 3, " = [", t, ",", h,
               ",", w, "] has an entry below 1");
    Q3VL_CHECK(h % limits.spatial_merge_size == 0 && w % limits.spatial_merge_size == 0, "hdf5 ", path, ": dataset '",
               grid_name, "' row ", i / 3, " = [", t, ",", h, ",", w,
               "]: h and w must be multiples of the spatial merge size ", limits.spatial_merge_size);
  }
  const DatasetInfo p = open_dataset(file, path, pixels_name, H5T_FLOAT, 4, 2);
  Q3VL_CHECK(p.shape[1] == limits.patch_features, "hdf5 ", path, ": dataset '", pixels_name, "' has shape ",
             shape_str(p.shape), ", expected [N,", limits.patch_features, "]");
  const int64_t patches = grid_patches(grid, "hdf5 " + path + ": dataset '" + grid_name + "'");
  Q3VL_CHECK(p.shape[0] == patches, "hdf5 ", path, ": dataset '", pixels_name, "' has ", p.shape[0], " rows but '",
             grid_name, "' sums to ", patches, " patches (t*h*w per item)");
  pixels = read_all<float>(p, H5T_NATIVE_FLOAT, path, pixels_name);
  // One NaN pixel makes the whole batch's loss NaN: name it here rather than after the forward.
  const auto bad = std::find_if(pixels.begin(), pixels.end(), [](float v) { return !std::isfinite(v); });
  Q3VL_CHECK(bad == pixels.end(), "hdf5 ", path, ": dataset '", pixels_name, "' has value ", *bad, " at [",
             (bad - pixels.begin()) / limits.patch_features, ",", (bad - pixels.begin()) % limits.patch_features,
             "], expected a finite number");
}

H5Handle open_file(const std::string& path) {
  Q3VL_CHECK(fs::exists(path), "hdf5: ", path, " does not exist");
  const QuietErrors quiet;
  Q3VL_CHECK(H5Fis_hdf5(path.c_str()) > 0, "hdf5: ", path, " is not an HDF5 file");
  H5Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  Q3VL_CHECK(file.valid(), "hdf5: cannot open ", path, " (truncated or corrupt?)");
  return file;
}

void write_dataset(hid_t file, const std::string& path, const std::string& name, hid_t file_type, hid_t mem_type,
                   const void* data, const std::vector<int64_t>& shape) {
  const QuietErrors quiet;
  std::vector<hsize_t> dims;
  for (int64_t d : shape) {
    Q3VL_CHECK(d >= 0, "hdf5 ", path, ": dataset '", name, "' has negative dimension in ", shape_str(shape));
    dims.push_back(static_cast<hsize_t>(d));
  }
  const H5Handle space(
      shape.empty() ? H5Screate(H5S_SCALAR) : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
      H5Sclose);
  const H5Handle links(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(links.get(), 1);
  const H5Handle dataset(H5Dcreate2(file, name.c_str(), file_type, space.get(), links.get(), H5P_DEFAULT, H5P_DEFAULT),
                         H5Dclose);
  Q3VL_CHECK(dataset.valid(), "hdf5 ", path, ": cannot create dataset '", name, "' (name taken or invalid?)");
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  if (n > 0)
    Q3VL_CHECK(H5Dwrite(dataset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0, "hdf5 ", path,
               ": writing dataset '", name, "' failed");
}

}  // namespace

int64_t HostBatch::image_patches() const { return grid_patches(image_grid_thw, "image_grid_thw"); }
int64_t HostBatch::video_patches() const { return grid_patches(video_grid_thw, "video_grid_thw"); }

HostBatch read_hdf5_batch(const std::string& path, const BatchLimits& limits) {
  const H5Handle file = open_file(path);
  const QuietErrors quiet;

  static const std::set<std::string> kKnown{"input_ids",      "attention_mask",   "labels",
                                            "pixel_values",   "image_grid_thw",   "pixel_values_videos",
                                            "video_grid_thw", "mm_token_type_ids"};
  std::set<std::string> present;
  H5G_info_t group{};
  Q3VL_CHECK(H5Gget_info(file.get(), &group) >= 0, "hdf5 ", path, ": cannot list the root group");
  for (hsize_t i = 0; i < group.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(file.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    Q3VL_CHECK(len >= 0, "hdf5 ", path, ": cannot read the name of root entry ", i);
    std::string name(static_cast<size_t>(len), '\0');
    H5Lget_name_by_idx(file.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size() + 1, H5P_DEFAULT);
    Q3VL_CHECK(kKnown.contains(name), "hdf5 ", path, ": unknown dataset '", name,
               "' (expected input_ids, attention_mask, labels, pixel_values, image_grid_thw, pixel_values_videos, "
               "video_grid_thw, mm_token_type_ids)");
    present.insert(name);
  }
  Q3VL_CHECK(present.contains("input_ids"), "hdf5 ", path, ": required dataset 'input_ids' is missing");

  HostBatch b;
  b.patch_features = limits.patch_features;
  const DatasetInfo ids = open_dataset(file.get(), path, "input_ids", H5T_INTEGER, 8, 2);
  b.batch = ids.shape[0];
  b.seq_len = ids.shape[1];
  Q3VL_CHECK(b.batch > 0 && b.seq_len > 0, "hdf5 ", path, ": dataset 'input_ids' has empty shape ",
             shape_str(ids.shape));
  b.input_ids = read_all<int64_t>(ids, H5T_NATIVE_INT64, path, "input_ids");
  for (size_t i = 0; i < b.input_ids.size(); ++i) {
    const int64_t id = b.input_ids[i];
    Q3VL_CHECK(id >= 0 && (limits.vocab_size <= 0 || id < limits.vocab_size), "hdf5 ", path,
               ": dataset 'input_ids' has token ", id, " at [", static_cast<int64_t>(i) / b.seq_len, ",",
               static_cast<int64_t>(i) % b.seq_len, "], not a token id",
               limits.vocab_size > 0 ? " of the vocabulary of " + std::to_string(limits.vocab_size) : std::string());
  }

  auto read_like_ids = [&](const char* name) {
    const DatasetInfo d = open_dataset(file.get(), path, name, H5T_INTEGER, 8, 2);
    Q3VL_CHECK(d.shape == ids.shape, "hdf5 ", path, ": dataset '", name, "' has shape ", shape_str(d.shape),
               ", expected ", shape_str(ids.shape), " like input_ids");
    return read_all<int64_t>(d, H5T_NATIVE_INT64, path, name);
  };
  if (present.contains("attention_mask")) {
    b.attention_mask = read_like_ids("attention_mask");
    for (int64_t r = 0; r < b.batch; ++r) {
      const int64_t* row = b.attention_mask.data() + r * b.seq_len;
      for (int64_t s = 0; s < b.seq_len; ++s) {
        Q3VL_CHECK(row[s] == 0 || row[s] == 1, "hdf5 ", path, ": dataset 'attention_mask' has value ", row[s], " at [",
                   r, ",", s, "], expected 0 or 1");
        Q3VL_CHECK(s == 0 || row[s] <= row[s - 1], "hdf5 ", path, ": dataset 'attention_mask' row ", r,
                   " is not right-padded (a 1 follows a 0 at position ", s, ")");
      }
      Q3VL_CHECK(row[0] == 1, "hdf5 ", path, ": dataset 'attention_mask' row ", r, " has no tokens");
    }
  }
  if (present.contains("labels")) {
    b.labels = read_like_ids("labels");
    for (size_t i = 0; i < b.labels.size(); ++i) {
      const int64_t l = b.labels[i];
      Q3VL_CHECK(l == -100 || (l >= 0 && (limits.vocab_size <= 0 || l < limits.vocab_size)), "hdf5 ", path,
                 ": dataset 'labels' has value ", l, " at [", static_cast<int64_t>(i) / b.seq_len, ",",
                 static_cast<int64_t>(i) % b.seq_len, "], expected -100 or a token id");
    }
  }
  read_vision(file.get(), path, present, "pixel_values", "image_grid_thw", limits, b.pixel_values, b.image_grid_thw);
  read_vision(file.get(), path, present, "pixel_values_videos", "video_grid_thw", limits, b.pixel_values_videos,
              b.video_grid_thw);

  const int64_t merge = limits.spatial_merge_size * limits.spatial_merge_size;
  auto check_tokens = [&](int64_t token, int64_t patches, const char* grid_name) {
    if (token < 0) return;
    const int64_t n = std::count(b.input_ids.begin(), b.input_ids.end(), token);
    Q3VL_CHECK(n == patches / merge, "hdf5 ", path, ": input_ids holds ", n, " tokens ", token, " but '", grid_name,
               "' needs ", patches / merge, " (patches / ", merge, ")");
  };
  check_tokens(limits.image_token_id, b.image_patches(), "image_grid_thw");
  check_tokens(limits.video_token_id, b.video_patches(), "video_grid_thw");
  // transformers 5.x passes mm_token_type_ids (0 text, 1 image, 2 video) beside input_ids; q3vl derives the
  // types from the placeholder ids, so the dataset is accepted only when it says exactly that.
  if (present.contains("mm_token_type_ids") && limits.image_token_id >= 0 && limits.video_token_id >= 0) {
    const std::vector<int64_t> types = read_like_ids("mm_token_type_ids");
    for (size_t i = 0; i < types.size(); ++i) {
      const int64_t id = b.input_ids[i];
      const int64_t expected = id == limits.image_token_id ? 1 : id == limits.video_token_id ? 2 : 0;
      Q3VL_CHECK(types[i] == expected, "hdf5 ", path, ": dataset 'mm_token_type_ids' has ", types[i], " at [",
                 static_cast<int64_t>(i) / b.seq_len, ",", static_cast<int64_t>(i) % b.seq_len, "] where input_ids ",
                 id, " means ", expected);
    }
  }
  return b;
}

void write_hdf5_batch(const std::string& path, const HostBatch& b) {
  Hdf5Writer w(path);
  const std::vector<int64_t> bs{b.batch, b.seq_len};
  Q3VL_CHECK(static_cast<int64_t>(b.input_ids.size()) == b.batch * b.seq_len, "hdf5 ", path, ": input_ids has ",
             b.input_ids.size(), " values for shape ", shape_str(bs));
  w.write("input_ids", b.input_ids.data(), bs);
  if (!b.attention_mask.empty()) w.write("attention_mask", b.attention_mask.data(), bs);
  if (!b.labels.empty()) w.write("labels", b.labels.data(), bs);
  auto vision = [&](const char* pixels_name, const std::vector<float>& pixels, const char* grid_name,
                    const std::vector<int64_t>& grid) {
    if (grid.empty() && pixels.empty()) return;
    Q3VL_CHECK(
        b.patch_features > 0 && pixels.size() % static_cast<size_t>(b.patch_features) == 0 && grid.size() % 3 == 0,
        "hdf5 ", path, ": ", pixels_name, " / ", grid_name, " sizes do not match [N,F] / [n,3]");
    w.write(pixels_name, pixels.data(), {static_cast<int64_t>(pixels.size()) / b.patch_features, b.patch_features});
    w.write(grid_name, grid.data(), {static_cast<int64_t>(grid.size()) / 3, 3});
  };
  vision("pixel_values", b.pixel_values, "image_grid_thw", b.image_grid_thw);
  vision("pixel_values_videos", b.pixel_values_videos, "video_grid_thw", b.video_grid_thw);
  w.close();
}

// ---------------------------------------------------------------------------------------------------------
// Hdf5Writer

Hdf5Writer::Hdf5Writer(const std::string& path) : path_(path), tmp_path_(path + ".tmp") {
  const QuietErrors quiet;
  file_ = H5Fcreate(tmp_path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  Q3VL_CHECK(file_ >= 0, "hdf5: cannot create ", tmp_path_);
}

Hdf5Writer::~Hdf5Writer() {
  if (file_ >= 0) {
    H5Fclose(file_);
    std::error_code ec;
    fs::remove(tmp_path_, ec);
  }
}

void Hdf5Writer::write(const std::string& name, const float* data, const std::vector<int64_t>& shape) {
  Q3VL_CHECK(file_ >= 0, "hdf5 ", path_, ": writer already closed");
  write_dataset(file_, path_, name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, data, shape);
}

void Hdf5Writer::write(const std::string& name, const int64_t* data, const std::vector<int64_t>& shape) {
  Q3VL_CHECK(file_ >= 0, "hdf5 ", path_, ": writer already closed");
  write_dataset(file_, path_, name, H5T_STD_I64LE, H5T_NATIVE_INT64, data, shape);
}

void Hdf5Writer::write(const std::string& name, const double* data, const std::vector<int64_t>& shape) {
  Q3VL_CHECK(file_ >= 0, "hdf5 ", path_, ": writer already closed");
  write_dataset(file_, path_, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, data, shape);
}

void Hdf5Writer::write(const std::string& name, const int32_t* data, const std::vector<int64_t>& shape) {
  Q3VL_CHECK(file_ >= 0, "hdf5 ", path_, ": writer already closed");
  write_dataset(file_, path_, name, H5T_STD_I32LE, H5T_NATIVE_INT32, data, shape);
}

void Hdf5Writer::write(const std::string& name, const Tensor& t) {
  Q3VL_CHECK(t.device() == Device::cpu && t.is_contiguous() && (t.dtype() == DType::f32 || t.dtype() == DType::f64),
             "hdf5 ", path_, ": dataset '", name, "' from ", t.str(), ": expected a contiguous host f32/f64 tensor");
  std::vector<int64_t> shape;
  for (int i = 0; i < t.ndim(); ++i) shape.push_back(t.size(i));
  if (t.dtype() == DType::f32) {
    write(name, t.data<float>(), shape);
    return;
  }
  const double* src = t.data<double>();
  std::vector<float> rounded(src, src + t.numel());
  write(name, rounded.data(), shape);
}

void Hdf5Writer::write_scalar(const std::string& name, double value) { write(name, &value, {}); }

void Hdf5Writer::write_scalar(const std::string& name, int64_t value) { write(name, &value, {}); }

void Hdf5Writer::close() {
  Q3VL_CHECK(file_ >= 0, "hdf5 ", path_, ": writer already closed");
  const herr_t rc = H5Fclose(file_);
  file_ = -1;
  Q3VL_CHECK(rc >= 0, "hdf5: closing ", tmp_path_, " failed");
  std::error_code ec;
  fs::rename(tmp_path_, path_, ec);
  Q3VL_CHECK(!ec, "hdf5: cannot rename ", tmp_path_, " to ", path_, ": ", ec.message());
}

// ---------------------------------------------------------------------------------------------------------
// Reading outputs back

F32Array read_hdf5_f32(const std::string& path, const std::string& name) {
  const H5Handle file = open_file(path);
  const QuietErrors quiet;
  const DatasetInfo info = open_dataset(file.get(), path, name, H5T_FLOAT, 4, -1);
  F32Array out;
  out.shape = info.shape;
  out.data = read_all<float>(info, H5T_NATIVE_FLOAT, path, name);
  return out;
}

double read_hdf5_scalar(const std::string& path, const std::string& name) {
  const H5Handle file = open_file(path);
  const QuietErrors quiet;
  const H5Handle dataset(H5Dopen2(file.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
  Q3VL_CHECK(dataset.valid(), "hdf5 ", path, ": no dataset '", name, "'");
  const H5Handle type(H5Dget_type(dataset.get()), H5Tclose);
  const H5T_class_t cls = H5Tget_class(type.get());
  Q3VL_CHECK(cls == H5T_FLOAT || cls == H5T_INTEGER, "hdf5 ", path, ": dataset '", name, "' is not numeric");
  const H5Handle space(H5Dget_space(dataset.get()), H5Sclose);
  Q3VL_CHECK(H5Sget_simple_extent_type(space.get()) == H5S_SCALAR, "hdf5 ", path, ": dataset '", name,
             "' is not a scalar");
  double value = 0;
  Q3VL_CHECK(H5Dread(dataset.get(), H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, &value) >= 0, "hdf5 ", path,
             ": reading dataset '", name, "' failed");
  return value;
}

}  // namespace q3vl::io
