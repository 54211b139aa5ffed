// GELU (tanh and erf) and SwiGLU on the CUDA device against the CPU reference, forward and backward, f32 and
// bf16, odd sizes and size 1, and in place (outputs aliasing inputs) as the CPU allows.
#include <gtest/gtest.h>

#include "core/layers/activations.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

const Shape kGeluShapes[] = {{1}, {7, 13}, {3, 5, 129}, {8195}, {64, 3072}};

void check_gelu(Gelu kind, const Shape& shape, DType dt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " shape " + shape.str() + " " + std::string(dtype_name(dt)) +
               (kind == Gelu::erf ? " erf" : " tanh"));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  const Tensor x = in_values(host_random(shape, seed, 4.0));
  const Tensor dy = in_values(host_random(shape, seed + 1, 1.0));
  Tensor y = Tensor::empty(host_arena(), shape, DType::f32);
  Tensor dx = Tensor::empty(host_arena(), shape, DType::f32);
  gelu_forward(kind, x, y);
  gelu_backward(kind, x, dy, dx);
  const double tol = bf ? kTolBf16 : kTolF32;

  const Tensor xd = to_device(x, dt), dyd = to_device(dy, dt);
  const Tensor yd = poisoned(shape, dt), dxd = poisoned(shape, dt);
  // y = 0.5 x (1 + erf or tanh(...)) cancels for negative x: its terms scale with x; dx's with dy.
  const double y_scale = norm(x), dx_scale = norm(dy);
  gelu_forward(kind, xd, yd);
  expect_close("y", yd, y, tol, y_scale);
  gelu_backward(kind, xd, dyd, dxd);
  expect_close("dx", dxd, dx, tol, dx_scale);
  // In place: y = x, and dx = dy.
  const Tensor inplace = to_device(x, dt);
  gelu_forward(kind, inplace, inplace);
  expect_close("y in place", inplace, y, tol, y_scale);
  gelu_backward(kind, xd, dyd, dyd);
  expect_close("dx in place", dyd, dx, tol, dx_scale);
}

struct SwigluCase {
  int64_t n, inter;
};

const SwigluCase kSwigluCases[] = {{1, 1}, {7, 13}, {33, 129}, {256, 768}};

void check_swiglu(const SwigluCase& c, DType dt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n=" + std::to_string(c.n) + " inter=" + std::to_string(c.inter) +
               " " + std::string(dtype_name(dt)));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  const Tensor gu = in_values(host_random({c.n, 2 * c.inter}, seed, 4.0));
  const Tensor dy = in_values(host_random({c.n, c.inter}, seed + 1, 1.0));
  Tensor y = Tensor::empty(host_arena(), {c.n, c.inter}, DType::f32);
  Tensor dgu = Tensor::empty(host_arena(), {c.n, 2 * c.inter}, DType::f32);
  swiglu_forward(gu, y);
  swiglu_backward(gu, dy, dgu);
  const double tol = bf ? kTolBf16 : kTolF32;

  const Tensor gud = to_device(gu, dt);
  const Tensor yd = poisoned({c.n, c.inter}, dt), dgud = poisoned({c.n, 2 * c.inter}, dt);
  swiglu_forward(gud, yd);
  expect_rel("y", yd, y, tol);
  swiglu_backward(gud, to_device(dy, dt), dgud);
  expect_rel("dgate_up", dgud, dgu, tol);
}

TEST(GpuGelu, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (Gelu kind : {Gelu::tanh, Gelu::erf})
    for (const auto& s : kGeluShapes) check_gelu(kind, s, DType::f32);
}

TEST(GpuGelu, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (Gelu kind : {Gelu::tanh, Gelu::erf})
    for (const auto& s : kGeluShapes) check_gelu(kind, s, DType::bf16);
}

TEST(GpuSwiglu, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kSwigluCases) check_swiglu(c, DType::f32);
}

TEST(GpuSwiglu, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kSwigluCases) check_swiglu(c, DType::bf16);
}

TEST(GpuActivations, BadInputIsNamed) {
  Q3VL_REQUIRE_GPU();
  const Tensor x = to_device(host_random({4, 8}, 1), DType::f32);
  expect_error([&] { gelu_forward(Gelu::erf, x, poisoned({4, 8}, DType::bf16)); }, "gelu_forward: y is bf16[4,8]");
  expect_error([&] { gelu_backward(Gelu::tanh, x, host_random({4, 8}, 2), poisoned({4, 8}, DType::f32)); },
               "gelu_backward: dy f32[4,8] is in host memory");
  expect_error([&] { swiglu_forward(to_device(host_random({4, 7}, 3), DType::f32), poisoned({4, 3}, DType::f32)); },
               "swiglu_forward: gate_up has shape [4,7], expected an even last dimension");
}

}  // namespace
}  // namespace q3vl::test
