// The CUDA tests' support: skip rule, arenas, random and poisoned tensors, relative errors.
#include "tests/cuda/gpu_test_support.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/bf16.h"
#include "core/device.h"
#include "core/rng.h"

namespace q3vl::test {

std::string gpu_missing_reason() {
  if (cuda_device_count() > 0) return "";
  return "no usable CUDA device: " + cuda_unavailable_reason();
}

bool gpu_required() {
  const char* v = std::getenv("Q3VL_REQUIRE_GPU");
  return v && std::string(v) == "1";
}

Arena& host_arena() {
  static Arena a("gpu-test-host", size_t{2} << 30);
  return a;
}

namespace {
Arena* device_arena_made = nullptr;
}

Arena& device_arena() {
  static Arena a("gpu-test-device", size_t{4} << 30, Device::cuda);
  device_arena_made = &a;
  return a;
}

void reset_test_arenas() {
  host_arena().reset();
  if (device_arena_made) device_arena_made->reset();
}

uint64_t fresh_seed() {
  return static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) & 0xffffffffffffull;
}

Tensor host_random(Shape shape, uint64_t seed, double scale) {
  Tensor t = Tensor::empty(host_arena(), shape, DType::f32);
  fill_uniform(t, Philox(seed), -scale, scale);
  return t;
}

Tensor rounded_to_bf16(const Tensor& h) {
  Tensor t = Tensor::empty(host_arena(), h.shape(), DType::f32);
  const float* s = h.data<float>();
  float* d = t.data<float>();
  for (int64_t i = 0; i < h.numel(); ++i) d[i] = round_to_bf16(s[i]);
  return t;
}

Tensor to_device(const Tensor& h, DType dtype) {
  Tensor d = Tensor::empty(device_arena(), h.shape(), dtype);
  if (dtype == DType::f32) {
    copy(d, h);
  } else {
    Q3VL_CHECK(dtype == DType::bf16, "to_device: dtype ", dtype_name(dtype));
    Tensor staged = Tensor::empty(host_arena(), h.shape(), DType::bf16);
    const float* s = h.data<float>();
    auto* b = static_cast<uint16_t*>(staged.raw());
    for (int64_t i = 0; i < h.numel(); ++i) b[i] = f32_to_bf16(s[i]);
    copy(d, staged);
  }
  return d;
}

Tensor to_device_raw(const Tensor& h) {
  Tensor d = Tensor::empty(device_arena(), h.shape(), h.dtype());
  copy(d, h);
  return d;
}

Tensor to_host_f32(const Tensor& d) {
  Tensor out = Tensor::empty(host_arena(), d.shape(), DType::f32);
  if (d.dtype() == DType::f32) {
    copy(out, d);
  } else {
    Q3VL_CHECK(d.dtype() == DType::bf16, "to_host_f32: dtype ", dtype_name(d.dtype()));
    Tensor staged = Tensor::empty(host_arena(), d.shape(), DType::bf16);
    copy(staged, d);
    const auto* b = static_cast<const uint16_t*>(staged.raw());
    float* o = out.data<float>();
    for (int64_t i = 0; i < d.numel(); ++i) o[i] = bf16_to_f32(b[i]);
  }
  return out;
}

Tensor poisoned(Shape shape, DType dtype) {
  Tensor d = Tensor::empty(device_arena(), shape, dtype);
  Tensor h = Tensor::empty(host_arena(), shape, dtype);
  std::memset(h.raw(), 0xFF, h.nbytes());
  copy(d, h);
  return d;
}

double rel_error(const Tensor& got, const Tensor& ref) {
  if (got.shape() != ref.shape()) return INFINITY;
  const float* g = got.data<float>();
  const float* r = ref.data<float>();
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    if (!std::isfinite(g[i])) return INFINITY;
    const double d = static_cast<double>(g[i]) - r[i];
    diff += d * d;
    norm += static_cast<double>(r[i]) * r[i];
  }
  if (norm == 0) return diff == 0 ? 0 : INFINITY;
  return std::sqrt(diff / norm);
}

void expect_rel(const std::string& what, const Tensor& got_device, const Tensor& ref, double tol) {
  const Tensor got = to_host_f32(got_device);
  const double e = rel_error(got, ref);
  EXPECT_LE(e, tol) << what << ": relative error " << e << " over tolerance " << tol << " (" << got_device.str()
                    << ")";
}

}  // namespace q3vl::test

namespace q3vl::test {

double norm(const Tensor& t) {
  const float* p = t.data<float>();
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += static_cast<double>(p[i]) * p[i];
  return std::sqrt(s);
}

double max_row_norm(const Tensor& t) {
  const int64_t cols = t.ndim() ? t.size(-1) : 1;
  const float* p = t.data<float>();
  double best = 0;
  for (int64_t r = 0; cols > 0 && r < t.numel() / cols; ++r) {
    double s = 0;
    for (int64_t j = 0; j < cols; ++j) s += static_cast<double>(p[r * cols + j]) * p[r * cols + j];
    best = std::max(best, std::sqrt(s));
  }
  return best;
}

void expect_close(const std::string& what, const Tensor& got_device, const Tensor& ref, double tol, double scale) {
  const Tensor got = to_host_f32(got_device);
  ASSERT_EQ(got.shape(), ref.shape()) << what;
  const float* g = got.data<float>();
  const float* r = ref.data<float>();
  double diff = 0;
  bool finite = true;
  for (int64_t i = 0; i < got.numel(); ++i) {
    finite = finite && std::isfinite(g[i]);
    const double d = static_cast<double>(g[i]) - r[i];
    diff += d * d;
  }
  const double bound = tol * std::max(norm(ref), scale);
  EXPECT_TRUE(finite) << what << ": not finite (" << got_device.str() << ")";
  EXPECT_LE(std::sqrt(diff), bound) << what << ": ||got - ref|| = " << std::sqrt(diff) << " over " << tol
                                    << " x max(||ref|| = " << norm(ref) << ", term scale " << scale << ")";
}

}  // namespace q3vl::test
