// Rotary tables (fp32 angles as in HF) and the rotate_half rotation forward/backward (device tensors go to the
// CUDA backend; the tables are made here on the host and uploaded).
#include "core/layers/rotary.h"

#include <cmath>
#include <vector>

#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"

namespace q3vl {

namespace {

// HF: 1.0 / (theta ** (arange(0, dim, 2).float() / dim)), every operation in fp32.
std::vector<float> inverse_frequencies(int64_t dim, double theta) {
  std::vector<float> inv(static_cast<size_t>(dim / 2));
  const float base = static_cast<float>(theta);
  for (int64_t i = 0; i < dim / 2; ++i)
    inv[i] = 1.0f / std::pow(base, static_cast<float>(2 * i) / static_cast<float>(dim));
  return inv;
}

void check_tables(const char* layer, const Tensor& cos, const Tensor& sin, int64_t n, int64_t head_dim) {
  const DType dt = cos.dtype();
  require(layer, "cos", cos, dt, {n, head_dim});
  require(layer, "sin", sin, dt, {n, head_dim});
  Q3VL_CHECK(dt == DType::f32 || dt == DType::f64, layer, ": cos/sin dtype ", dtype_name(dt),
             " (expected f32 or f64)");
}

// Writes cos/sin rows from per-row half-angle tables: angle(i, j) for j < head_dim / 2, then repeated
// (HF's cat(freqs, freqs)). Each angle is an fp32 value; cos/sin are evaluated in the table's dtype.
template <class AngleFn>
void write_tables(const char* layer, int64_t n, int64_t head_dim, const Tensor& cos, const Tensor& sin,
                  AngleFn&& angle) {
  const int64_t half = head_dim / 2;
  dispatch_float(layer, cos.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T *cp = cos.data<T>(), *sp = sin.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < half; ++j) {
        const T a = static_cast<T>(angle(i, j));
        const T c = std::cos(a), s = std::sin(a);
        cp[i * head_dim + j] = cp[i * head_dim + j + half] = c;
        sp[i * head_dim + j] = sp[i * head_dim + j + half] = s;
      }
    }
  });
}

}  // namespace

void rope_cos_sin(const Tensor& positions, int64_t head_dim, double theta, const Tensor& cos, const Tensor& sin) {
  const char* L = "rope_cos_sin";
  Q3VL_CHECK(head_dim > 0 && head_dim % 2 == 0, L, ": head_dim must be positive and even, got ", head_dim);
  Q3VL_CHECK(theta > 0, L, ": theta must be positive, got ", theta);
  require(L, "positions", positions, DType::i64, {-1});
  const int64_t n = positions.size(0);
  check_tables(L, cos, sin, n, head_dim);
  const std::vector<float> inv = inverse_frequencies(head_dim, theta);
  const int64_t* pos = positions.data<int64_t>();
  write_tables(L, n, head_dim, cos, sin,
               [&](int64_t i, int64_t j) { return static_cast<float>(pos[i]) * inv[j]; });
}

void mrope_cos_sin(const Tensor& positions, int64_t head_dim, double theta, const std::array<int64_t, 3>& sections,
                   const Tensor& cos, const Tensor& sin) {
  const char* L = "mrope_cos_sin";
  Q3VL_CHECK(head_dim > 0 && head_dim % 2 == 0, L, ": head_dim must be positive and even, got ", head_dim);
  Q3VL_CHECK(theta > 0, L, ": theta must be positive, got ", theta);
  Q3VL_CHECK(sections[0] >= 0 && sections[1] >= 0 && sections[2] >= 0 &&
                 sections[0] + sections[1] + sections[2] == head_dim / 2,
             L, ": sections (", sections[0], ", ", sections[1], ", ", sections[2], ") must be non-negative and sum to head_dim / 2 = ",
             head_dim / 2);
  require(L, "positions", positions, DType::i64, {3, -1});
  const int64_t n = positions.size(1);
  check_tables(L, cos, sin, n, head_dim);
  const std::vector<float> inv = inverse_frequencies(head_dim, theta);
  // Row (0 = T, 1 = H, 2 = W) each frequency reads, as HF's apply_interleaved_mrope overwrites T's layout.
  std::vector<int64_t> row(static_cast<size_t>(head_dim / 2), 0);
  for (int64_t j = 0; j < head_dim / 2; ++j) {
    if (j % 3 == 1 && j < 3 * sections[1]) row[j] = 1;
    if (j % 3 == 2 && j < 3 * sections[2]) row[j] = 2;
  }
  const int64_t* pos = positions.data<int64_t>();
  write_tables(L, n, head_dim, cos, sin,
               [&](int64_t i, int64_t j) { return static_cast<float>(pos[row[j] * n + i]) * inv[j]; });
}

void vision_rope_cos_sin(const Tensor& rows, const Tensor& cols, int64_t head_dim, double theta, const Tensor& cos,
                         const Tensor& sin) {
  const char* L = "vision_rope_cos_sin";
  Q3VL_CHECK(head_dim > 0 && head_dim % 4 == 0, L, ": head_dim must be a positive multiple of 4, got ", head_dim);
  Q3VL_CHECK(theta > 0, L, ": theta must be positive, got ", theta);
  require(L, "rows", rows, DType::i64, {-1});
  const int64_t n = rows.size(0);
  require(L, "cols", cols, DType::i64, {n});
  check_tables(L, cos, sin, n, head_dim);
  const int64_t quarter = head_dim / 4;
  const std::vector<float> inv = inverse_frequencies(head_dim / 2, theta);
  const int64_t *rp = rows.data<int64_t>(), *cp = cols.data<int64_t>();
  write_tables(L, n, head_dim, cos, sin, [&](int64_t i, int64_t j) {
    return j < quarter ? static_cast<float>(rp[i]) * inv[j] : static_cast<float>(cp[i]) * inv[j - quarter];
  });
}

namespace {

// Shared by forward and backward (transpose): for each pair (a, b) = (x[d], x[d + D/2]),
//   forward:  y[d] = a cos[d] - b sin[d],          y[d + D/2] = b cos[d + D/2] + a sin[d + D/2]
//   backward: y[d] = a cos[d] + b sin[d + D/2],    y[d + D/2] = b cos[d + D/2] - a sin[d]
// Both read the pair before writing it, so y may alias x.
void rotate(const char* layer, const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& y,
            bool transpose) {
  const DType dt = x.dtype();
  require(layer, transpose ? "dy" : "x", x, dt, {-1, -1, -1});
  const int64_t n = x.size(0), heads = x.size(1), d = x.size(2);
  Q3VL_CHECK(d % 2 == 0, layer, ": head_dim must be even, got ", d);
  require(layer, "cos", cos, dt, {n, d});
  require(layer, "sin", sin, dt, {n, d});
  require(layer, transpose ? "dx" : "y", y, dt, {n, heads, d});
  const int64_t half = d / 2;
  dispatch_float(layer, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.data<T>(), *cp = cos.data<T>(), *sp = sin.data<T>();
    T* yp = y.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* c = cp + i * d;
      const T* s = sp + i * d;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xr = xp + (i * heads + h) * d;
        T* yr = yp + (i * heads + h) * d;
        if (!transpose) {
          for (int64_t j = 0; j < half; ++j) {
            const T a = xr[j], b = xr[j + half];
            yr[j] = a * c[j] - b * s[j];
            yr[j + half] = b * c[j + half] + a * s[j + half];
          }
        } else {
          for (int64_t j = 0; j < half; ++j) {
            const T a = xr[j], b = xr[j + half];
            yr[j] = a * c[j] + b * s[j + half];
            yr[j + half] = b * c[j + half] - a * s[j];
          }
        }
      }
    }
  });
}

}  // namespace

void rotary_forward(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& y) {
  if (on_cuda({&x, &cos, &sin, &y})) return cuda_layers().rotary_forward(x, cos, sin, y);
  rotate("rotary_forward", x, cos, sin, y, false);
}

void rotary_backward(const Tensor& dy, const Tensor& cos, const Tensor& sin, const Tensor& dx) {
  if (on_cuda({&dy, &cos, &sin, &dx})) return cuda_layers().rotary_backward(dy, cos, sin, dx);
  rotate("rotary_backward", dy, cos, sin, dx, true);
}

}  // namespace q3vl
