// Linear: hand-computed forward, finite-difference gradients, and argument checks.
#include <gtest/gtest.h>

#include "core/layers/linear.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

TEST(Linear, ForwardHandComputed) {
  double xv[] = {1, 2, 3, -1, 0, 2};
  double wv[] = {1, 0, -1, 2, 1, 0.5};
  double bv[] = {0.5, -1};
  Tensor x(xv, DType::f64, {2, 3}), w(wv, DType::f64, {2, 3}), b(bv, DType::f64, {2});
  Tensor y = zeros_tensor({2, 2});
  linear_forward(x, w, b, y);
  const double* yp = y.data<double>();
  EXPECT_DOUBLE_EQ(yp[0], 1 - 3 + 0.5);          // 1*1 + 2*0 + 3*-1 + 0.5
  EXPECT_DOUBLE_EQ(yp[1], 2 + 2 + 1.5 - 1);      // 1*2 + 2*1 + 3*0.5 - 1
  EXPECT_DOUBLE_EQ(yp[2], -1 - 2 + 0.5);         // -1*1 + 0 + 2*-1 + 0.5
  EXPECT_DOUBLE_EQ(yp[3], -2 + 0 + 1 - 1);
}

class LinearGrad : public testing::TestWithParam<std::tuple<int, int, int, bool>> {};

TEST_P(LinearGrad, MatchesFiniteDifferences) {
  const auto [n, in, out, bias] = GetParam();
  Tensor x = random_tensor({n, in}, 1), w = random_tensor({out, in}, 2), b = random_tensor({out}, 3);
  Tensor r = random_tensor({n, out}, 4);
  Tensor y = zeros_tensor({n, out});
  Tensor no_b;
  auto loss = [&] {
    linear_forward(x, w, bias ? b : no_b, y);
    return dot(y, r);
  };
  Tensor dx = zeros_tensor({n, in}), dw = zeros_tensor({out, in}), db = zeros_tensor({out});
  linear_backward(x, w, r, dx, dw, bias ? db : no_b);
  std::vector<GradTarget> targets = {{"x", x, dx}, {"w", w, dw}};
  if (bias) targets.push_back({"b", b, db});
  expect_gradients(bias ? "linear(bias)" : "linear", loss, targets);
}

INSTANTIATE_TEST_SUITE_P(Shapes, LinearGrad,
                         testing::Values(std::make_tuple(1, 1, 1, true), std::make_tuple(5, 7, 3, true),
                                         std::make_tuple(6, 4, 9, false), std::make_tuple(13, 3, 5, false)));

TEST(Linear, AccumulatesParameterGradients) {
  Tensor x = random_tensor({4, 3}, 5), w = random_tensor({2, 3}, 6), dy = random_tensor({4, 2}, 7);
  Tensor dw1 = zeros_tensor({2, 3}), dw2 = zeros_tensor({2, 3});
  linear_backward(x, w, dy, Tensor{}, dw1, Tensor{});
  linear_backward(x, w, dy, Tensor{}, dw2, Tensor{});
  linear_backward(x, w, dy, Tensor{}, dw2, Tensor{});
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(dw2.data<double>()[i], 2 * dw1.data<double>()[i], 1e-12);
}

TEST(Linear, RejectsMismatchedShapesNamingThem) {
  Tensor x = zeros_tensor({4, 3}), w = zeros_tensor({2, 5}), y = zeros_tensor({4, 2});
  try {
    linear_forward(x, w, Tensor{}, y);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("linear_forward: x has shape [4,3], expected [*,5]"), std::string::npos)
        << e.what();
  }
  Tensor xf = zeros_tensor({4, 5}, DType::f32);
  EXPECT_THROW(linear_forward(xf, w, Tensor{}, y), Error);
}

}  // namespace
}  // namespace q3vl::test
