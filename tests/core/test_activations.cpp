// GELU (tanh, erf) and SwiGLU: forward values against closed forms, finite-difference gradients.
#include <gtest/gtest.h>

#include <cmath>

#include "core/layers/activations.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

TEST(Gelu, ForwardKnownValues) {
  double xv[] = {0, 1, -2};
  Tensor x(xv, DType::f64, {3});
  Tensor y = zeros_tensor({3});
  gelu_forward(Gelu::erf, x, y);
  EXPECT_DOUBLE_EQ(y.data<double>()[0], 0);
  EXPECT_NEAR(y.data<double>()[1], 0.8413447460685429, 1e-15);   // Phi(1)
  EXPECT_NEAR(y.data<double>()[2], -2 * 0.0227501319481792, 1e-15);  // -2 * Phi(-2)
  gelu_forward(Gelu::tanh, x, y);
  const double c = std::sqrt(2 / M_PI);
  EXPECT_NEAR(y.data<double>()[1], 0.5 * (1 + std::tanh(c * 1.044715)), 1e-15);
  EXPECT_NEAR(y.data<double>()[1], 0.8411919906082768, 1e-15);  // torch gelu(1, approximate='tanh')
}

TEST(Gelu, GradientsMatchFiniteDifferences) {
  for (Gelu kind : {Gelu::tanh, Gelu::erf}) {
    Tensor x = random_tensor({3, 7}, 41, 3.0), r = random_tensor({3, 7}, 42), y = zeros_tensor({3, 7});
    auto loss = [&] {
      gelu_forward(kind, x, y);
      return dot(y, r);
    };
    Tensor dx = zeros_tensor({3, 7});
    gelu_backward(kind, x, r, dx);
    expect_gradients(kind == Gelu::tanh ? "gelu_tanh" : "gelu_erf", loss, {{"x", x, dx}});
  }
}

TEST(SwiGlu, ForwardHandComputed) {
  double v[] = {1, -1, 2, 3};  // gate = [1, -1], up = [2, 3]
  Tensor gu(v, DType::f64, {1, 4});
  Tensor y = zeros_tensor({1, 2});
  swiglu_forward(gu, y);
  const double s1 = 1 / (1 + std::exp(-1.0)), sm1 = 1 / (1 + std::exp(1.0));
  EXPECT_NEAR(y.data<double>()[0], 1 * s1 * 2, 1e-15);
  EXPECT_NEAR(y.data<double>()[1], -1 * sm1 * 3, 1e-15);
}

TEST(SwiGlu, GradientsMatchFiniteDifferences) {
  for (auto [n, inter] : {std::pair{1, 1}, std::pair{5, 3}, std::pair{4, 8}}) {
    Tensor gu = random_tensor({n, 2 * inter}, 51, 2.0), r = random_tensor({n, inter}, 52), y = zeros_tensor({n, inter});
    auto loss = [&] {
      swiglu_forward(gu, y);
      return dot(y, r);
    };
    Tensor dgu = zeros_tensor({n, 2 * inter});
    swiglu_backward(gu, r, dgu);
    expect_gradients("swiglu", loss, {{"gate_up", gu, dgu}});
  }
}

TEST(SwiGlu, RejectsOddWidth) {
  Tensor gu = zeros_tensor({2, 5}), y = zeros_tensor({2, 2});
  EXPECT_THROW(swiglu_forward(gu, y), Error);
}

}  // namespace
}  // namespace q3vl::test
