// HF checkpoint loading (key set and shape checks, per-tensor conversion) and saving (config + safetensors).
#include "io/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/check.h"
#include "core/model/param_specs.h"
#include "io/float16.h"
#include "io/hf_config.h"

namespace q3vl::io {

namespace fs = std::filesystem;

namespace {

constexpr const char* kLmHead = "lm_head.weight";
constexpr const char* kEmbedTokens = "model.language_model.embed_tokens.weight";

std::vector<int64_t> dims_of(const Shape& s) { return {s.dims.begin(), s.dims.begin() + s.ndim}; }

// The destination of `spec` from the caller, checked to be a contiguous f32 host tensor of the spec's shape.
Tensor destination(const ParamSpec& spec, const WeightLookup& lookup, const char* what) {
  const Tensor t = lookup(spec.hf_key);
  Q3VL_CHECK(t.defined() && t.dtype() == DType::f32 && t.device() == Device::cpu && t.is_contiguous(), what,
             ": the weight tensor for '", spec.hf_key, "' is ", t.str(), ", expected contiguous host f32");
  Q3VL_CHECK(t.shape() == spec.shape, what, ": the weight tensor for '", spec.hf_key, "' has shape ", t.shape().str(),
             ", expected ", spec.shape.str());
  return t;
}

// For a tied model, a stored lm_head.weight is harmless only if it is the embedding table itself.
void check_tied_head(const SafetensorsDir& ckpt) {
  const SafetensorsFile& head_file = ckpt.file_of(kLmHead);
  Q3VL_CHECK(ckpt.contains(kEmbedTokens), "checkpoint ", ckpt.dir(), ": missing tensor '", kEmbedTokens, "'");
  const StTensorInfo& head = head_file.info(kLmHead);
  const SafetensorsFile& embed_file = ckpt.file_of(kEmbedTokens);
  const StTensorInfo& embed = embed_file.info(kEmbedTokens);
  const bool same =
      head.dtype == embed.dtype && head.shape == embed.shape &&
      std::memcmp(head_file.bytes(head).data(), embed_file.bytes(embed).data(), head_file.bytes(head).size()) == 0;
  Q3VL_CHECK(same, "checkpoint ", head_file.path(), ": tensor '", kLmHead, "' differs from '", kEmbedTokens,
             "' but the config ties them (tie_word_embeddings is true)");
}

// The layout of a checkpoint's fused experts: the published one (x@W: gate_up_proj [E, H, 2I], down_proj
// [E, I, H]) or the one transformers 5.x holds in memory and its save_pretrained writes ([E, 2I, H], [E, H, I]).
enum class ExpertLayout { published, transposed };

const char* layout_name(ExpertLayout layout) {
  return layout == ExpertLayout::published ? "published [E, H, 2I] / [E, I, H]"
                                           : "transformers 5 [E, 2I, H] / [E, H, I]";
}

// The on-disk shape of `spec` in `layout`.
Shape stored_shape(const ParamSpec& spec, ExpertLayout layout) {
  const Shape& s = spec.shape;
  return spec.kind == ParamKind::experts && layout == ExpertLayout::transposed ? Shape{s[0], s[2], s[1]} : s;
}

// Decided once for the whole checkpoint. A square expert tensor (gate_up_proj when H == 2I, down_proj when H == I)
// fits both layouts, but the other expert tensor of its layer is then not square, so the non-square tensors decide;
// they must all agree. A tensor in neither layout is left to the shape check.
ExpertLayout expert_layout(const SafetensorsDir& ckpt, const std::vector<ParamSpec>& specs) {
  const ParamSpec* published = nullptr;
  const ParamSpec* transposed = nullptr;
  for (const ParamSpec& s : specs) {
    if (s.kind != ParamKind::experts || s.shape[1] == s.shape[2]) continue;
    const std::vector<int64_t>& shape = ckpt.file_of(s.hf_key).info(s.hf_key).shape;
    if (shape == dims_of(stored_shape(s, ExpertLayout::published)) && !published) published = &s;
    if (shape == dims_of(stored_shape(s, ExpertLayout::transposed)) && !transposed) transposed = &s;
  }
  if (published && transposed) {
    auto stored = [&](const ParamSpec& s) {
      const SafetensorsFile& file = ckpt.file_of(s.hf_key);
      return "'" + s.hf_key + "' (in " + file.path() + ") has shape " + file.info(s.hf_key).shape_str();
    };
    Q3VL_FAIL("checkpoint ", ckpt.dir(), ": the fused expert tensors disagree on their layout: ", stored(*published),
              ", the ", layout_name(ExpertLayout::published), " layout, but ", stored(*transposed), ", the ",
              layout_name(ExpertLayout::transposed), " layout");
  }
  return transposed ? ExpertLayout::transposed : ExpertLayout::published;
}

// out [E, A, B] = the transpose of a stored [E, B, A] whose element i is value(i), tile by tile so reads and
// writes stay local.
template <class Value>
void transpose_experts(const Value& value, int64_t experts, int64_t rows, int64_t cols, float* out) {
  constexpr int64_t kTile = 64;
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) if (experts * rows * cols >= (1 << 16))
  for (int64_t task = 0; task < experts * col_tiles; ++task) {
    const int64_t e = task / col_tiles, c0 = (task % col_tiles) * kTile, c1 = std::min(cols, c0 + kTile);
    for (int64_t r0 = 0; r0 < rows; r0 += kTile)
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
          out[(e * rows + r) * cols + c] = value((e * cols + c) * rows + r);
  }
}

// Converts a stored [E, B, A] tensor into dst [E, A, B] (f32).
void read_transposed(std::span<const std::byte> src, StDType dtype, const Tensor& dst) {
  const auto* bytes = src.data();
  auto value = [&](int64_t i) -> float {
    if (dtype == StDType::F32) {
      float f;
      std::memcpy(&f, bytes + 4 * i, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, bytes + 2 * i, 2);
    return dtype == StDType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
  };
  transpose_experts(value, dst.size(0), dst.size(1), dst.size(2), dst.data<float>());
}

}  // namespace

void load_hf_weights(const std::string& dir, const ModelConfig& config, const WeightLookup& lookup,
                     const std::function<void(const std::string& key)>& after_read) {
  const SafetensorsDir ckpt(dir);
  const std::vector<ParamSpec> specs = model_param_specs(config);

  std::set<std::string, std::less<>> expected;
  for (const ParamSpec& s : specs) expected.insert(s.hf_key);
  for (const std::string& key : ckpt.keys()) {
    if (expected.contains(key)) continue;
    if (key == kLmHead && config.tie_word_embeddings) {
      check_tied_head(ckpt);
      continue;
    }
    Q3VL_FAIL("checkpoint ", dir, ": unexpected tensor '", key, "' in ", ckpt.file_of(key).path(),
              " (not a parameter of this ", config.model_type, " config)");
  }
  std::vector<std::string> missing;
  for (const ParamSpec& s : specs)
    if (!ckpt.contains(s.hf_key)) missing.push_back(s.hf_key);
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 5; ++i) {
      list += i ? ", '" : "'";
      list += missing[i];
      list += "'";
    }
    Q3VL_FAIL("checkpoint ", dir, ": ", missing.size(), " missing tensor(s): ", list,
              missing.size() > 5 ? ", ..." : "");
  }
  // Shapes and dtypes of every tensor before converting any, so a bad checkpoint fails without side effects.
  const ExpertLayout layout = expert_layout(ckpt, specs);
  for (const ParamSpec& s : specs) {
    const SafetensorsFile& file = ckpt.file_of(s.hf_key);
    const StTensorInfo& info = file.info(s.hf_key);
    const Shape want = stored_shape(s, layout);
    Q3VL_CHECK(info.shape == dims_of(want), "checkpoint ", file.path(), ": tensor '", s.hf_key, "' has shape ",
               info.shape_str(), ", expected ", want.str(),
               s.kind == ParamKind::experts ? std::string(" (the checkpoint's expert layout is the ") +
                                                  layout_name(layout) + " one)"
                                            : std::string());
    Q3VL_CHECK(info.dtype == StDType::F32 || info.dtype == StDType::BF16 || info.dtype == StDType::F16, "checkpoint ",
               file.path(), ": tensor '", s.hf_key, "' has dtype ", st_dtype_name(info.dtype),
               ", expected F32, BF16 or F16");
    destination(s, lookup, "checkpoint load");
  }
  for (const ParamSpec& s : specs) {
    const Tensor dst = destination(s, lookup, "checkpoint load");
    const SafetensorsFile& file = ckpt.file_of(s.hf_key);
    const StTensorInfo& info = file.info(s.hf_key);
    if (s.kind == ParamKind::experts && layout == ExpertLayout::transposed)
      read_transposed(file.bytes(info), info.dtype, dst);
    else
      file.read(s.hf_key, dst);
    if (after_read) after_read(s.hf_key);
  }
}

StDirLayout save_hf_checkpoint(const std::string& dir, const ModelConfig& config, const WeightLookup& lookup,
                               DType dtype, uint64_t max_shard_bytes,
                               const std::function<void(const std::string& key)>& before_write) {
  const std::vector<ParamSpec> specs = model_param_specs(config);
  // transformers 5.x transposes a published-layout expert tensor on load only when its shape differs from the
  // one it holds, so a square one (H == 2I or H == I) would load untransposed. Such a config is written in
  // transformers' own layout, all its expert tensors alike (the layout load_hf_weights reads from the non-square
  // ones); every other config keeps the published layout.
  const bool transformers_layout = std::ranges::any_of(
      specs, [](const ParamSpec& s) { return s.kind == ParamKind::experts && s.shape[1] == s.shape[2]; });
  // One buffer for every transposed tensor: the writer reads each right after its prepare().
  int64_t largest_experts = 0;
  for (const ParamSpec& s : specs)
    if (transformers_layout && s.kind == ParamKind::experts) largest_experts = std::max(largest_experts, s.numel());
  std::vector<float> transposed(static_cast<size_t>(largest_experts));
  std::vector<StWriteEntry> entries;
  for (const ParamSpec& s : specs) {
    const Tensor weight = destination(s, lookup, "checkpoint save");
    StWriteEntry e{s.hf_key, weight, {}};
    if (before_write) e.prepare = [&before_write, key = s.hf_key] { before_write(key); };
    if (transformers_layout && s.kind == ParamKind::experts) {
      e.tensor = Tensor(transposed.data(), DType::f32, stored_shape(s, ExpertLayout::transposed));
      e.prepare = [&before_write, key = s.hf_key, weight, out = e.tensor] {
        if (before_write) before_write(key);  // a streaming lookup fills `weight` only now
        const float* in = weight.data<float>();
        transpose_experts([in](int64_t i) { return in[i]; }, out.size(0), out.size(1), out.size(2), out.data<float>());
      };
    }
    entries.push_back(std::move(e));
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  Q3VL_CHECK(!ec, "checkpoint: cannot create directory ", dir, ": ", ec.message());
  StDirLayout layout = write_safetensors_dir(dir, entries, dtype, max_shard_bytes);
  write_hf_config((fs::path(dir) / "config.json").string(), config, dtype);
  return layout;
}

}  // namespace q3vl::io
