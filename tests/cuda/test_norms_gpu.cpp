// RMSNorm and LayerNorm on the CUDA device against the CPU reference, forward and backward, f32 and bf16
// (statistics f32 on the device), odd sizes and size 1, gradients accumulated into random starting values.
#include <gtest/gtest.h>

#include <cmath>

#include "core/layers/norms.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct NormCase {
  int64_t n, d;
};

const NormCase kCases[] = {{1, 1}, {1, 5}, {7, 33}, {33, 257}, {128, 2048}, {3, 4608}};

// Norm of the terms w[j] dy[i, j] rstd[i] that a norm's dx is a cancelling combination of.
double dx_term_scale(const Tensor& dy, const Tensor& w, const Tensor& rstd) {
  const int64_t n = dy.size(0), d = dy.size(1);
  double s = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) {
      const double t = static_cast<double>(dy.data<float>()[i * d + j]) * w.data<float>()[j] * rstd.data<float>()[i];
      s += t * t;
    }
  return std::sqrt(s);
}

std::string trace(uint64_t seed, const NormCase& c, DType dt, DType gdt) {
  return "seed " + std::to_string(seed) + " n=" + std::to_string(c.n) + " d=" + std::to_string(c.d) + " " +
         std::string(dtype_name(dt)) + " grads " + std::string(dtype_name(gdt));
}

// Parameter gradients: f32, or the weight's dtype for every other case in bf16 mode.
DType grad_dtype(DType dt, size_t case_index) { return dt == DType::bf16 && case_index % 2 ? DType::bf16 : DType::f32; }

void check_rmsnorm(const NormCase& c, DType dt, DType gdt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(trace(seed, c, dt, gdt));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  auto grad_values = [&](Tensor t) { return gdt == DType::bf16 ? rounded_to_bf16(t) : t; };
  const Tensor x = in_values(host_random({c.n, c.d}, seed, 2.0));
  const Tensor w = in_values(host_random({c.d}, seed + 1, 1.0));
  const Tensor dy = in_values(host_random({c.n, c.d}, seed + 2, 1.0));
  const double eps = 1e-6;
  Tensor y = Tensor::empty(host_arena(), {c.n, c.d}, DType::f32);
  Tensor rstd = Tensor::empty(host_arena(), {c.n}, DType::f32);
  rmsnorm_forward(x, w, eps, y, rstd);
  Tensor dx = Tensor::empty(host_arena(), {c.n, c.d}, DType::f32);
  Tensor dw = grad_values(host_random({c.d}, seed + 3, 0.5));
  const Tensor dwd = to_device(dw, gdt);
  rmsnorm_backward(x, w, rstd, dy, dx, dw);

  const Tensor xd = to_device(x, dt), wd = to_device(w, dt);
  const Tensor yd = poisoned({c.n, c.d}, dt), rstdd = poisoned({c.n}, DType::f32);
  rmsnorm_forward(xd, wd, eps, yd, rstdd);
  const double tol = bf ? kTolBf16 : kTolF32;
  expect_rel("y", yd, y, tol);
  expect_rel("rstd", rstdd, rstd, kTolF32);
  const Tensor dxd = poisoned({c.n, c.d}, dt);
  rmsnorm_backward(xd, wd, rstdd, to_device(dy, dt), dxd, dwd);
  // dx = rstd (w dy - x rstd^2 mean(w dy x)) cancels (exactly at D = 1 up to eps): its terms are w dy rstd.
  expect_close("dx", dxd, dx, tol, dx_term_scale(dy, w, rstd));
  expect_rel("dw", dwd, dw, tol);
}

void check_layernorm(const NormCase& c, DType dt, DType gdt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(trace(seed, c, dt, gdt));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  auto grad_values = [&](Tensor t) { return gdt == DType::bf16 ? rounded_to_bf16(t) : t; };
  const Tensor x = in_values(host_random({c.n, c.d}, seed, 2.0));
  const Tensor w = in_values(host_random({c.d}, seed + 1, 1.0));
  const Tensor b = in_values(host_random({c.d}, seed + 2, 0.5));
  const Tensor dy = in_values(host_random({c.n, c.d}, seed + 3, 1.0));
  const double eps = 1e-6;
  Tensor y = Tensor::empty(host_arena(), {c.n, c.d}, DType::f32);
  Tensor mean = Tensor::empty(host_arena(), {c.n}, DType::f32);
  Tensor rstd = Tensor::empty(host_arena(), {c.n}, DType::f32);
  layernorm_forward(x, w, b, eps, y, mean, rstd);
  Tensor dx = Tensor::empty(host_arena(), {c.n, c.d}, DType::f32);
  Tensor dw = grad_values(host_random({c.d}, seed + 4, 0.5));
  Tensor db = grad_values(host_random({c.d}, seed + 5, 0.5));
  const Tensor dwd = to_device(dw, gdt), dbd = to_device(db, gdt);
  layernorm_backward(x, w, mean, rstd, dy, dx, dw, db);

  const Tensor xd = to_device(x, dt), wd = to_device(w, dt), bd = to_device(b, dt);
  const Tensor yd = poisoned({c.n, c.d}, dt);
  const Tensor meand = poisoned({c.n}, DType::f32), rstdd = poisoned({c.n}, DType::f32);
  layernorm_forward(xd, wd, bd, eps, yd, meand, rstdd);
  const double tol = bf ? kTolBf16 : kTolF32;
  expect_rel("y", yd, y, tol);
  expect_rel("rstd", rstdd, rstd, kTolF32);
  // The mean of centred random values is small next to the values it sums: its rounding scales with the mean
  // of |x| of each row, whose norm over rows is about ||x|| / sqrt(D).
  expect_close("mean", meand, mean, kTolF32, norm(x) / std::sqrt(static_cast<double>(c.d)));
  const Tensor dxd = poisoned({c.n, c.d}, dt);
  layernorm_backward(xd, wd, meand, rstdd, to_device(dy, dt), dxd, dwd, dbd);
  // As RMSNorm's, dx cancels (it is exactly 0 at D = 1): its terms are w dy rstd.
  expect_close("dx", dxd, dx, tol, dx_term_scale(dy, w, rstd));
  expect_rel("dw", dwd, dw, tol);
  expect_rel("db", dbd, db, tol);
}

TEST(GpuRmsNorm, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_rmsnorm(c, DType::f32, DType::f32);
}

TEST(GpuRmsNorm, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (size_t i = 0; i < std::size(kCases); ++i) check_rmsnorm(kCases[i], DType::bf16, grad_dtype(DType::bf16, i));
}

TEST(GpuLayerNorm, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_layernorm(c, DType::f32, DType::f32);
}

TEST(GpuLayerNorm, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (size_t i = 0; i < std::size(kCases); ++i) check_layernorm(kCases[i], DType::bf16, grad_dtype(DType::bf16, i));
}

TEST(GpuNorms, BadInputIsNamed) {
  Q3VL_REQUIRE_GPU();
  const Tensor x = to_device(host_random({4, 8}, 1), DType::bf16);
  const Tensor w = to_device(host_random({8}, 2), DType::bf16);
  const Tensor y = poisoned({4, 8}, DType::bf16);
  expect_error([&] { rmsnorm_forward(x, w, 1e-6, y, poisoned({4}, DType::bf16)); },
               "rmsnorm_forward: rstd has dtype bf16, expected f32");
  expect_error([&] { rmsnorm_forward(x, host_random({8}, 2), 1e-6, y, poisoned({4}, DType::f32)); },
               "rmsnorm_forward: w f32[8] is in host memory");
  expect_error([&] {
    layernorm_forward(x, w, to_device(host_random({7}, 3), DType::bf16), 1e-6, y, poisoned({4}, DType::f32),
                      poisoned({4}, DType::f32));
  }, "layernorm_forward: b has shape [7], expected [8]");
}

}  // namespace
}  // namespace q3vl::test
