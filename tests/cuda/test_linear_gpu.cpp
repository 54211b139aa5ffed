// Linear layer and GEMM on the CUDA device against the CPU reference, f32 and bf16, odd sizes included.
#include <gtest/gtest.h>

#include "core/layers/linear.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct LinearCase {
  int64_t n, in, out;
  bool bias;
};

void check_linear(const LinearCase& c, DType dt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n=" + std::to_string(c.n) + " in=" + std::to_string(c.in) +
               " out=" + std::to_string(c.out) + " " + std::string(dtype_name(dt)));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  const Tensor x = in_values(host_random({c.n, c.in}, seed, 1.0));
  const Tensor w = in_values(host_random({c.out, c.in}, seed + 1, 0.5));
  const Tensor b = c.bias ? in_values(host_random({c.out}, seed + 2, 0.5)) : Tensor();
  const Tensor dy = in_values(host_random({c.n, c.out}, seed + 3, 1.0));
  // CPU reference in f32.
  Tensor y = Tensor::empty(host_arena(), {c.n, c.out}, DType::f32);
  linear_forward(x, w, b, y);
  Tensor dx = Tensor::empty(host_arena(), {c.n, c.in}, DType::f32);
  Tensor dw = host_random({c.out, c.in}, seed + 4, 0.1);  // accumulated into
  Tensor db = c.bias ? host_random({c.out}, seed + 5, 0.1) : Tensor();
  const Tensor dw0 = to_device(dw, DType::f32), db0 = c.bias ? to_device(db, DType::f32) : Tensor();
  linear_backward(x, w, dy, dx, dw, db);
  // Device: activations in dt, parameter gradients f32.
  const Tensor xd = to_device(x, dt), wd = to_device(w, dt), bd = c.bias ? to_device(b, dt) : Tensor();
  const Tensor yd = poisoned({c.n, c.out}, dt);
  linear_forward(xd, wd, bd, yd);
  const double tol = bf ? kTolBf16 : kTolF32;
  expect_rel("y", yd, y, tol);
  const Tensor dxd = poisoned({c.n, c.in}, dt);
  linear_backward(xd, wd, to_device(dy, dt), dxd, dw0, db0);
  expect_rel("dx", dxd, dx, tol);
  expect_rel("dw", dw0, dw, tol);
  if (c.bias) expect_rel("db", db0, db, tol);
}

const LinearCase kCases[] = {{1, 1, 1, true}, {7, 13, 5, true}, {64, 96, 48, false}, {129, 257, 65, true},
                             {512, 2048, 768, false}};

TEST(GpuLinear, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_linear(c, DType::f32);
}

TEST(GpuLinear, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_linear(c, DType::bf16);
}

TEST(GpuLinear, MixedDevicesAreRefusedWithTheArgumentNamed) {
  Q3VL_REQUIRE_GPU();
  const Tensor x = to_device(host_random({4, 8}, 1), DType::f32);
  const Tensor w = host_random({3, 8}, 2);
  const Tensor y = poisoned({4, 3}, DType::f32);
  expect_error([&] { linear_forward(x, w, Tensor(), y); }, "linear_forward: w f32[3,8] is in host memory");
}

TEST(GpuLinear, UnsupportedDtypeIsNamed) {
  Q3VL_REQUIRE_GPU();
  Tensor x64 = Tensor::empty(device_arena(), {2, 2}, DType::f64);
  expect_error([&] { linear_forward(x64, x64, Tensor(), x64); }, "linear_forward: x has dtype f64");
}

}  // namespace
}  // namespace q3vl::test
