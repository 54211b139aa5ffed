// Rotary forward/backward on the CUDA device against the CPU reference: f32, and bf16 activations with f32
// tables (the accurate choice) or bf16 tables; odd sizes, one head, head_dim 2, the vision tower's 72, and in
// place (y aliasing x).
#include <gtest/gtest.h>

#include "core/layers/rotary.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct RotaryCase {
  int64_t n, heads, d;
};

const RotaryCase kCases[] = {{1, 1, 2}, {7, 3, 8}, {33, 16, 72}, {257, 32, 128}};

void check_rotary(const RotaryCase& c, DType dt, DType table_dt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n=" + std::to_string(c.n) + " heads=" + std::to_string(c.heads) +
               " d=" + std::to_string(c.d) + " " + std::string(dtype_name(dt)) + " tables " +
               std::string(dtype_name(table_dt)));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  Tensor positions = Tensor::empty(host_arena(), {c.n}, DType::i64);
  for (int64_t i = 0; i < c.n; ++i) positions.data<int64_t>()[i] = static_cast<int64_t>((seed + 7919 * i) % 40000);
  Tensor cos = Tensor::empty(host_arena(), {c.n, c.d}, DType::f32);
  Tensor sin = Tensor::empty(host_arena(), {c.n, c.d}, DType::f32);
  rope_cos_sin(positions, c.d, 1e6, cos, sin);
  if (table_dt == DType::bf16) {
    cos = rounded_to_bf16(cos);
    sin = rounded_to_bf16(sin);
  }
  const Tensor x = in_values(host_random({c.n, c.heads, c.d}, seed, 1.0));
  const Tensor dy = in_values(host_random({c.n, c.heads, c.d}, seed + 1, 1.0));
  Tensor y = Tensor::empty(host_arena(), {c.n, c.heads, c.d}, DType::f32);
  Tensor dx = Tensor::empty(host_arena(), {c.n, c.heads, c.d}, DType::f32);
  rotary_forward(x, cos, sin, y);
  rotary_backward(dy, cos, sin, dx);
  const double tol = bf ? kTolBf16 : kTolF32;

  const Tensor cosd = to_device(cos, table_dt), sind = to_device(sin, table_dt);
  const Tensor xd = to_device(x, dt), dyd = to_device(dy, dt);
  const Tensor yd = poisoned({c.n, c.heads, c.d}, dt), dxd = poisoned({c.n, c.heads, c.d}, dt);
  rotary_forward(xd, cosd, sind, yd);
  expect_rel("y", yd, y, tol);
  rotary_backward(dyd, cosd, sind, dxd);
  expect_rel("dx", dxd, dx, tol);
  rotary_forward(xd, cosd, sind, xd);
  expect_rel("y in place", xd, y, tol);
  rotary_backward(dyd, cosd, sind, dyd);
  expect_rel("dx in place", dyd, dx, tol);
}

TEST(GpuRotary, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_rotary(c, DType::f32, DType::f32);
}

TEST(GpuRotary, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) {
    check_rotary(c, DType::bf16, DType::f32);
    check_rotary(c, DType::bf16, DType::bf16);
  }
}

TEST(GpuRotary, BadInputIsNamed) {
  Q3VL_REQUIRE_GPU();
  const Tensor x = to_device(host_random({4, 2, 8}, 1), DType::f32);
  const Tensor table = to_device(host_random({4, 8}, 2), DType::f32);
  expect_error([&] { rotary_forward(x, to_device(host_random({4, 8}, 2), DType::bf16), table, x); },
               "rotary_forward: cos has dtype bf16, expected f32");
  expect_error([&] { rotary_backward(x, table, host_random({4, 8}, 3), poisoned({4, 2, 8}, DType::f32)); },
               "rotary_backward: sin f32[4,8] is in host memory");
  expect_error([&] { rotary_forward(x, table, table, poisoned({4, 3, 8}, DType::f32)); },
               "rotary_forward: y has shape [4,3,8], expected [4,2,8]");
}

}  // namespace
}  // namespace q3vl::test
