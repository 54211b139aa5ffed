// Patch embedding, bilinear position-embedding resampling and the (optionally tensor-parallel) patch merger of
// the vision tower. On device tensors the position embedding goes to the CUDA backend and the merger runs the
// same composite of device layers (LayerNorm statistics f32 under bf16, as the device layers keep them).
#include "core/layers/vision.h"

#include <algorithm>
#include <cmath>
#include <span>

#include "core/arena_layout.h"
#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"
#include "core/layers/activations.h"
#include "core/layers/linear.h"
#include "core/layers/norms.h"

namespace q3vl {

namespace {

// ---- Patch embedding helpers ----

void check_geometry(const char* L, const PatchEmbedGeometry& g) {
  Q3VL_CHECK(g.in_channels > 0 && g.temporal_patch > 0 && g.patch > 0, L,
             ": patch geometry must be positive, got in_channels ", g.in_channels, ", temporal_patch ",
             g.temporal_patch, ", patch ", g.patch);
}

// The conv weight [D, C, T, P, P] (or already flat [D, F]) viewed as the Linear weight [D, F].
Tensor flat_conv_weight(const char* L, const char* name, const PatchEmbedGeometry& g, const Tensor& w, DType dt,
                        int64_t out) {
  Q3VL_CHECK(w.defined(), L, ": ", name, " is missing");
  if (w.ndim() == 5) {
    require(L, name, w, dt, {out, g.in_channels, g.temporal_patch, g.patch, g.patch});
    return w.view({w.size(0), g.features()});
  }
  Q3VL_CHECK(w.ndim() == 2, L, ": ", name, " has shape ", w.shape().str(), ", expected [*,", g.in_channels, ",",
             g.temporal_patch, ",", g.patch, ",", g.patch, "] or [*,", g.features(), "]");
  require(L, name, w, dt, {out, g.features()});
  return w;
}

// ---- Position-embedding helpers ----

// One axis of HF 5.x get_vision_interpolation_indices_and_weights (bilinear, align_corners=True) in its fp32
// arithmetic: src = index * (G - 1) / max(size - 1, 1), taps floor and min(floor + 1, G - 1), weights
// 1 - |src - floor| and 1 - |src - floor - 1| clamped at 0.
struct AxisTaps {
  int64_t lo, hi;
  float w_lo, w_hi;
};

AxisTaps axis_taps(int64_t grid_side, int64_t size, int64_t index) {
  const float src = static_cast<float>(index) * static_cast<float>(grid_side - 1) /
                    static_cast<float>(std::max<int64_t>(size - 1, 1));
  const float fl = std::floor(src);
  const float d0 = src - fl;
  const float d1 = std::fabs(d0 - 1.0f);
  const auto lo = static_cast<int64_t>(fl);
  return {std::min(lo, grid_side - 1), std::min(lo + 1, grid_side - 1), std::max(1.0f - d0, 0.0f),
          std::max(1.0f - d1, 0.0f)};
}

int64_t count_patches(const char* L, const Tensor& grid_thw) {
  require(L, "grid_thw", grid_thw, DType::i64, {-1, 3});
  const int64_t* g = grid_thw.data<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < grid_thw.size(0); ++i) {
    const int64_t t = g[3 * i], h = g[3 * i + 1], w = g[3 * i + 2];
    Q3VL_CHECK(t > 0 && h > 0 && w > 0, L, ": grid_thw row ", i, " is (", t, ",", h, ",", w,
               "), expected positive sizes");
    total += t * h * w;
  }
  return total;
}

void check_indices(const char* L, const Tensor& idx, int64_t rows) {
  const int64_t* ip = idx.data<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    Q3VL_CHECK(ip[i] >= 0 && ip[i] < rows, L, ": idx[", i / 4, ",", i % 4, "] = ", ip[i], " is outside the table's ",
               rows, " rows");
}

// ---- Patch-merger helpers ----

// The merger's LayerNorm statistics: f32 under bf16 activations (the device layers keep them in f32).
DType stat_dtype(DType dt) { return dt == DType::bf16 ? DType::f32 : dt; }

struct MergerDims {
  int64_t patches, tokens, norm_rows;
};

MergerDims merger_dims(const char* L, const PatchMergerConfig& c, int64_t patches) {
  Q3VL_CHECK(c.hidden > 0 && c.out_hidden > 0 && c.merge_unit > 0, L,
             ": config sizes must be positive, got hidden ", c.hidden, ", out_hidden ", c.out_hidden,
             ", merge_unit ", c.merge_unit);
  Q3VL_CHECK(c.eps > 0, L, ": eps must be positive, got ", c.eps);
  Q3VL_CHECK(patches % c.merge_unit == 0, L, ": ", patches, " patches is not a multiple of the merge unit ",
             c.merge_unit);
  const int64_t tokens = patches / c.merge_unit;
  return {patches, tokens, c.use_postshuffle_norm ? tokens : patches};
}

// This rank's fc1 columns (fc2 input features): the merged width over the tp ranks.
int64_t local_merged(const char* L, const PatchMergerConfig& c, const TensorParallel* tp) {
  const int64_t parts = tp ? tp->size() : 1;
  Q3VL_CHECK(c.merged() % parts == 0, L, ": tensor parallelism over ", parts,
             " ranks does not divide the merged width ", c.merged());
  return c.merged() / parts;
}

void require_merger_weights(const char* L, const PatchMergerConfig& c, const PatchMergerWeights& w, Device device,
                            DType dt, int64_t local, bool grads) {
  const int64_t k = c.merged();
  require_on(device, L, grads ? "grads.norm_w" : "norm_w", w.norm_w, dt, {c.norm_dim()});
  require_on(device, L, grads ? "grads.norm_b" : "norm_b", w.norm_b, dt, {c.norm_dim()});
  require_on(device, L, grads ? "grads.fc1_w" : "fc1_w", w.fc1_w, dt, {local, k});
  require_on(device, L, grads ? "grads.fc1_b" : "fc1_b", w.fc1_b, dt, {local});
  require_on(device, L, grads ? "grads.fc2_w" : "fc2_w", w.fc2_w, dt, {c.out_hidden, local});
  require_on(device, L, grads ? "grads.fc2_b" : "fc2_b", w.fc2_b, dt, {c.out_hidden});
}

// Checks config, x and the weights (`local` fc1 columns); returns the sizes derived from x.
MergerDims check_merger(const char* L, const PatchMergerConfig& c, const PatchMergerWeights& w, const Tensor& x,
                        int64_t local) {
  Q3VL_CHECK(x.defined(), L, ": x is missing");
  const DType dt = x.dtype();
  const bool cuda = x.device() == Device::cuda;
  Q3VL_CHECK(dt == DType::f32 || dt == (cuda ? DType::bf16 : DType::f64), L, ": x has dtype ", dtype_name(dt),
             cuda ? ", expected f32 or bf16 on the CUDA device" : ", expected f32 or f64");
  require_on(x.device(), L, "x", x, dt, {-1, c.hidden});
  const MergerDims d = merger_dims(L, c, x.size(0));
  require_merger_weights(L, c, w, x.device(), dt, local, false);
  return d;
}

}  // namespace

// ---- Patch embedding ----

void patch_embed_forward(const PatchEmbedGeometry& geometry, const Tensor& pixels, const Tensor& w, const Tensor& b,
                         const Tensor& y) {
  const char* L = "patch_embed_forward";
  check_geometry(L, geometry);
  if (on_cuda({&pixels, &w, &b, &y})) {
    // On the device the Conv3d is the linear layer over flattened patches; linear_forward checks the tensors.
    Q3VL_CHECK(w.defined() && (w.ndim() == 5 || w.ndim() == 2), L, ": w ", w.str(), " is not a conv weight");
    return linear_forward(pixels, w.view({w.size(0), w.numel() / std::max<int64_t>(w.size(0), 1)}), b, y);
  }
  const DType dt = w.dtype();
  const Tensor w_flat = flat_conv_weight(L, "w", geometry, w, dt, -1);
  const int64_t out = w_flat.size(0);
  require(L, "pixels", pixels, dt, {-1, geometry.features()});
  require(L, "b", b, dt, {out});
  require(L, "y", y, dt, {pixels.size(0), out});
  linear_forward(pixels, w_flat, b, y);
}

void patch_embed_backward(const PatchEmbedGeometry& geometry, const Tensor& pixels, const Tensor& w, const Tensor& dy,
                          const Tensor& dpixels, const Tensor& dw, const Tensor& db) {
  const char* L = "patch_embed_backward";
  check_geometry(L, geometry);
  if (on_cuda({&pixels, &w, &dy, &dpixels, &dw, &db})) {
    Q3VL_CHECK(w.defined() && dw.defined() && w.shape() == dw.shape(), L, ": dw ", dw.str(), " does not match w ",
               w.str());
    const int64_t out = w.size(0), features = w.numel() / std::max<int64_t>(out, 1);
    return linear_backward(pixels, w.view({out, features}), dy, dpixels, dw.view({out, features}), db);
  }
  const DType dt = w.dtype();
  const Tensor w_flat = flat_conv_weight(L, "w", geometry, w, dt, -1);
  const int64_t out = w_flat.size(0);
  const Tensor dw_flat = flat_conv_weight(L, "dw", geometry, dw, dt, out);
  require(L, "pixels", pixels, dt, {-1, geometry.features()});
  const int64_t n = pixels.size(0);
  require(L, "dy", dy, dt, {n, out});
  require(L, "db", db, dt, {out});
  if (dpixels.defined()) require(L, "dpixels", dpixels, dt, {n, geometry.features()});
  linear_backward(pixels, w_flat, dy, dpixels, dw_flat, db);
}

// ---- Bilinearly resampled position embedding ----

int64_t vision_num_patches(const Tensor& grid_thw) { return count_patches("vision_num_patches", grid_thw); }

void vision_pos_embed_plan(const Tensor& grid_thw, int64_t grid_side, int64_t merge, const Tensor& idx,
                           const Tensor& weight) {
  const char* L = "vision_pos_embed_plan";
  Q3VL_CHECK(grid_side > 0, L, ": grid_side must be positive, got ", grid_side);
  Q3VL_CHECK(merge > 0, L, ": merge must be positive, got ", merge);
  const int64_t patches = count_patches(L, grid_thw);
  const int64_t* g = grid_thw.data<int64_t>();
  const int64_t items = grid_thw.size(0);
  for (int64_t i = 0; i < items; ++i)
    Q3VL_CHECK(g[3 * i + 1] % merge == 0 && g[3 * i + 2] % merge == 0, L, ": grid_thw row ", i, " is (", g[3 * i],
               ",", g[3 * i + 1], ",", g[3 * i + 2], "), h and w must be multiples of merge ", merge);
  require(L, "idx", idx, DType::i64, {patches, 4});
  Q3VL_CHECK(weight.defined(), L, ": weight is missing");
  require(L, "weight", weight, weight.dtype(), {patches, 4});
  dispatch_float(L, weight.dtype(), [&](auto tag) {
    using T = decltype(tag);
    int64_t* ip = idx.data<int64_t>();
    T* wp = weight.data<T>();
    int64_t p = 0;
    for (int64_t i = 0; i < items; ++i) {
      const int64_t t = g[3 * i], h = g[3 * i + 1], w = g[3 * i + 2];
      for (int64_t ti = 0; ti < t; ++ti)
        for (int64_t br = 0; br < h / merge; ++br)
          for (int64_t bc = 0; bc < w / merge; ++bc)
            for (int64_t r = 0; r < merge; ++r)
              for (int64_t c = 0; c < merge; ++c, ++p) {
                const AxisTaps y = axis_taps(grid_side, h, br * merge + r);
                const AxisTaps x = axis_taps(grid_side, w, bc * merge + c);
                ip[4 * p + 0] = y.lo * grid_side + x.lo;
                ip[4 * p + 1] = y.lo * grid_side + x.hi;
                ip[4 * p + 2] = y.hi * grid_side + x.lo;
                ip[4 * p + 3] = y.hi * grid_side + x.hi;
                // Each weight is one fp32 product of the axis weights, as HF's float32 tensors compute them.
                wp[4 * p + 0] = static_cast<T>(y.w_lo * x.w_lo);
                wp[4 * p + 1] = static_cast<T>(y.w_lo * x.w_hi);
                wp[4 * p + 2] = static_cast<T>(y.w_hi * x.w_lo);
                wp[4 * p + 3] = static_cast<T>(y.w_hi * x.w_hi);
              }
    }
  });
}

void vision_pos_embed_forward(const Tensor& table, const Tensor& idx, const Tensor& weight, const Tensor& y) {
  if (on_cuda({&table, &idx, &weight, &y})) return cuda_layers().vision_pos_embed_forward(table, idx, weight, y);
  const char* L = "vision_pos_embed_forward";
  const DType dt = table.dtype();
  require(L, "table", table, dt, {-1, -1});
  const int64_t rows = table.size(0), dim = table.size(1);
  require(L, "idx", idx, DType::i64, {-1, 4});
  const int64_t patches = idx.size(0);
  require(L, "weight", weight, dt, {patches, 4});
  require(L, "y", y, dt, {patches, dim});
  check_indices(L, idx, rows);
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *tp = table.data<T>(), *wp = weight.data<T>();
    const int64_t* ip = idx.data<int64_t>();
    T* yp = y.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < patches; ++p) {
      const T *r0 = tp + ip[4 * p] * dim, *r1 = tp + ip[4 * p + 1] * dim;
      const T *r2 = tp + ip[4 * p + 2] * dim, *r3 = tp + ip[4 * p + 3] * dim;
      const T w0 = wp[4 * p], w1 = wp[4 * p + 1], w2 = wp[4 * p + 2], w3 = wp[4 * p + 3];
      T* yr = yp + p * dim;
      for (int64_t j = 0; j < dim; ++j) yr[j] = w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j];
    }
  });
}

void vision_pos_embed_backward(const Tensor& idx, const Tensor& weight, const Tensor& dy, const Tensor& dtable) {
  if (on_cuda({&idx, &weight, &dy, &dtable})) return cuda_layers().vision_pos_embed_backward(idx, weight, dy, dtable);
  const char* L = "vision_pos_embed_backward";
  const DType dt = dy.dtype();
  require(L, "dy", dy, dt, {-1, -1});
  const int64_t patches = dy.size(0), dim = dy.size(1);
  require(L, "idx", idx, DType::i64, {patches, 4});
  require(L, "weight", weight, dt, {patches, 4});
  require(L, "dtable", dtable, dt, {-1, dim});
  check_indices(L, idx, dtable.size(0));
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *wp = weight.data<T>(), *dyp = dy.data<T>();
    const int64_t* ip = idx.data<int64_t>();
    T* dtp = dtable.data<T>();
    // Threads own column blocks, so every table element has one writer that adds its terms in patch order
    // whatever the thread count.
    constexpr int64_t kBlock = 64;
    const int64_t blocks = (dim + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t j0 = blk * kBlock, j1 = std::min(j0 + kBlock, dim);
      for (int64_t p = 0; p < patches; ++p) {
        const T* g = dyp + p * dim;
        for (int c = 0; c < 4; ++c) {
          const T wc = wp[4 * p + c];
          T* dst = dtp + ip[4 * p + c] * dim;
          for (int64_t j = j0; j < j1; ++j) dst[j] += wc * g[j];
        }
      }
    }
  });
}

// ---- Patch merger ----

namespace {

// The saved tensors, in carving order, for `local` fc1 features (all of them without tensor parallelism).
template <class Carve>
PatchMergerSaved merger_saved_tensors(const PatchMergerConfig& config, const MergerDims& d, int64_t local, DType dt,
                                      Carve&& carve) {
  PatchMergerSaved s;
  s.normed = carve({d.tokens, config.merged()}, dt);
  s.mean = carve({d.norm_rows}, stat_dtype(dt));
  s.rstd = carve({d.norm_rows}, stat_dtype(dt));
  s.fc1_out = carve({d.tokens, local}, dt);
  return s;
}

// The backward's scratch: d normed (which first holds fc2's recomputed input), then d act.
struct MergerScratch {
  Tensor d_normed, d_act;
};
template <class Carve>
MergerScratch merger_scratch_tensors(const PatchMergerConfig& config, const MergerDims& d, int64_t local, DType dt,
                                     Carve&& carve) {
  MergerScratch s;
  s.d_normed = carve({d.tokens, config.merged()}, dt);
  s.d_act = carve({d.tokens, local}, dt);
  return s;
}

}  // namespace

size_t patch_merger_saved_bytes(const PatchMergerConfig& config, int64_t num_patches, DType dtype) {
  const MergerDims d = merger_dims("patch_merger_saved_bytes", config, num_patches);
  ArenaSizer sizer;
  merger_saved_tensors(config, d, config.merged(), dtype, sizer);
  return sizer.bytes();
}

size_t patch_merger_scratch_bytes(const PatchMergerConfig& config, int64_t num_patches, DType dtype) {
  const MergerDims d = merger_dims("patch_merger_scratch_bytes", config, num_patches);
  // The backward's two buffers; the forward borrows one [M, local] activation, no more than either.
  ArenaSizer sizer;
  merger_scratch_tensors(config, d, config.merged(), dtype, sizer);
  return sizer.bytes();
}

PatchMergerSaved patch_merger_forward(const PatchMergerConfig& config, const PatchMergerWeights& w, const Tensor& x,
                                      const Tensor& y, Arena& arena, TensorParallel* tp) {
  const char* L = "patch_merger_forward";
  const int64_t local = local_merged(L, config, tp);
  const MergerDims d = check_merger(L, config, w, x, local);
  const DType dt = x.dtype();
  const int64_t k = config.merged();
  require_on(x.device(), L, "y", y, dt, {d.tokens, config.out_hidden});

  PatchMergerSaved saved = merger_saved_tensors(config, d, local, dt, ArenaCarver(arena));
  if (config.use_postshuffle_norm)
    layernorm_forward(x.view({d.tokens, k}), w.norm_w, w.norm_b, config.eps, saved.normed, saved.mean, saved.rstd);
  else
    layernorm_forward(x, w.norm_w, w.norm_b, config.eps, saved.normed.view({d.patches, config.hidden}), saved.mean,
                      saved.rstd);
  linear_forward(saved.normed, w.fc1_w, w.fc1_b, saved.fc1_out);
  const size_t mark = arena.mark();
  const Tensor act = Tensor::empty(arena, {d.tokens, local}, dt);
  gelu_forward(Gelu::erf, saved.fc1_out, act);
  // Row-parallel fc2: partial sums over this rank's features, the bias counted once (tp rank 0).
  const bool adds_bias = tp == nullptr || tp->rank() == 0;
  linear_forward(act, w.fc2_w, adds_bias ? w.fc2_b : Tensor{}, y);
  tp_all_reduce(tp, y);
  arena.release(mark);
  return saved;
}

void patch_merger_backward(const PatchMergerConfig& config, const PatchMergerWeights& w, const Tensor& x,
                           const PatchMergerSaved& saved, const Tensor& dy, const Tensor& dx,
                           const PatchMergerWeights& grads, Arena& scratch, TensorParallel* tp) {
  const char* L = "patch_merger_backward";
  const int64_t local = local_merged(L, config, tp);
  const MergerDims d = check_merger(L, config, w, x, local);
  const DType dt = x.dtype();
  const int64_t k = config.merged();
  const Device dev = x.device();
  // Gradients in x's dtype, or f32 under bf16 on the device (fp32 accumulation across micro-batches).
  const DType gdt = dt == DType::bf16 && grads.fc1_w.dtype() == DType::f32 ? DType::f32 : dt;
  require_merger_weights(L, config, grads, dev, gdt, local, true);
  require_on(dev, L, "saved.normed", saved.normed, dt, {d.tokens, k});
  require_on(dev, L, "saved.mean", saved.mean, stat_dtype(dt), {d.norm_rows});
  require_on(dev, L, "saved.rstd", saved.rstd, stat_dtype(dt), {d.norm_rows});
  require_on(dev, L, "saved.fc1_out", saved.fc1_out, dt, {d.tokens, local});
  require_on(dev, L, "dy", dy, dt, {d.tokens, config.out_hidden});
  if (dx.defined()) require_on(dev, L, "dx", dx, dt, {d.patches, config.hidden});

  const size_t mark = scratch.mark();
  const MergerScratch t = merger_scratch_tensors(config, d, local, dt, ArenaCarver(scratch));
  const Tensor &d_normed = t.d_normed, &d_act = t.d_act;
  // fc2's input, recomputed rather than saved, in d_normed's memory: fc1's backward reads it no more.
  const Tensor act(d_normed.raw(), dt, {d.tokens, local}, d_normed.device());
  gelu_forward(Gelu::erf, saved.fc1_out, act);
  linear_backward(act, w.fc2_w, dy, d_act, grads.fc2_w, grads.fc2_b);
  gelu_backward(Gelu::erf, saved.fc1_out, d_act, d_act);
  linear_backward(saved.normed, w.fc1_w, d_act, d_normed, grads.fc1_w, grads.fc1_b);
  // Column-parallel fc1: each rank's input gradient covers only its columns.
  tp_all_reduce(tp, d_normed);
  if (config.use_postshuffle_norm)
    layernorm_backward(x.view({d.tokens, k}), w.norm_w, saved.mean, saved.rstd, d_normed,
                       dx.defined() ? dx.view({d.tokens, k}) : Tensor{}, grads.norm_w, grads.norm_b);
  else
    layernorm_backward(x, w.norm_w, saved.mean, saved.rstd, d_normed.view({d.patches, config.hidden}), dx,
                       grads.norm_w, grads.norm_b);
  scratch.release(mark);
}

}  // namespace q3vl
