// RMSNorm and LayerNorm: hand-computed forward, finite-difference gradients for x and every parameter.
#include <gtest/gtest.h>

#include <cmath>

#include "core/layers/norms.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

TEST(RmsNorm, ForwardHandComputed) {
  double xv[] = {3, 4};  // mean square 12.5
  double wv[] = {2, -1};
  Tensor x(xv, DType::f64, {1, 2}), w(wv, DType::f64, {2});
  Tensor y = zeros_tensor({1, 2}), rstd = zeros_tensor({1});
  rmsnorm_forward(x, w, 1e-6, y, rstd);
  const double r = 1 / std::sqrt(12.5 + 1e-6);
  EXPECT_DOUBLE_EQ(rstd.data<double>()[0], r);
  EXPECT_DOUBLE_EQ(y.data<double>()[0], 2 * 3 * r);
  EXPECT_DOUBLE_EQ(y.data<double>()[1], -4 * r);
}

TEST(LayerNorm, ForwardHandComputed) {
  double xv[] = {1, 2, 3, 6};  // mean 3, variance (4+1+0+9)/4 = 3.5
  double wv[] = {1, 2, 1, 1}, bv[] = {0, 0, 1, -1};
  Tensor x(xv, DType::f64, {1, 4}), w(wv, DType::f64, {4}), b(bv, DType::f64, {4});
  Tensor y = zeros_tensor({1, 4}), mean = zeros_tensor({1}), rstd = zeros_tensor({1});
  layernorm_forward(x, w, b, 1e-6, y, mean, rstd);
  const double r = 1 / std::sqrt(3.5 + 1e-6);
  EXPECT_DOUBLE_EQ(mean.data<double>()[0], 3);
  EXPECT_NEAR(y.data<double>()[0], -2 * r, 1e-15);
  EXPECT_NEAR(y.data<double>()[1], 2 * -1 * r, 1e-15);
  EXPECT_NEAR(y.data<double>()[2], 1, 1e-15);
  EXPECT_NEAR(y.data<double>()[3], 3 * r - 1, 1e-15);
}

class NormGrad : public testing::TestWithParam<std::pair<int, int>> {};

TEST_P(NormGrad, RmsNormMatchesFiniteDifferences) {
  const auto [n, d] = GetParam();
  Tensor x = random_tensor({n, d}, 11), w = random_tensor({d}, 12), r = random_tensor({n, d}, 13);
  Tensor y = zeros_tensor({n, d}), rstd = zeros_tensor({n});
  auto loss = [&] {
    rmsnorm_forward(x, w, 1e-6, y, rstd);
    return dot(y, r);
  };
  loss();
  Tensor dx = zeros_tensor({n, d}), dw = zeros_tensor({d});
  rmsnorm_backward(x, w, rstd, r, dx, dw);
  expect_gradients("rmsnorm", loss, {{"x", x, dx}, {"w", w, dw}});
}

TEST_P(NormGrad, LayerNormMatchesFiniteDifferences) {
  const auto [n, d] = GetParam();
  Tensor x = random_tensor({n, d}, 21), w = random_tensor({d}, 22), b = random_tensor({d}, 23);
  Tensor r = random_tensor({n, d}, 24);
  Tensor y = zeros_tensor({n, d}), mean = zeros_tensor({n}), rstd = zeros_tensor({n});
  auto loss = [&] {
    layernorm_forward(x, w, b, 1e-6, y, mean, rstd);
    return dot(y, r);
  };
  loss();
  Tensor dx = zeros_tensor({n, d}), dw = zeros_tensor({d}), db = zeros_tensor({d});
  layernorm_backward(x, w, mean, rstd, r, dx, dw, db);
  expect_gradients("layernorm", loss, {{"x", x, dx}, {"w", w, dw}, {"b", b, db}});
}

INSTANTIATE_TEST_SUITE_P(Shapes, NormGrad, testing::Values(std::make_pair(1, 3), std::make_pair(5, 7), std::make_pair(3, 130)));

TEST(RmsNorm, F32MatchesF64) {
  // fp32 storage, fp64 statistics: the f32 result is the f64 result rounded (error ~ 1 ulp of |y| <= 10).
  Tensor x64 = random_tensor({4, 33}, 31, 3.0), w64 = random_tensor({33}, 32);
  Tensor x32 = random_tensor({4, 33}, 31, 3.0, DType::f32), w32 = random_tensor({33}, 32, 1.0, DType::f32);
  Tensor y64 = zeros_tensor({4, 33}), r64 = zeros_tensor({4});
  Tensor y32 = zeros_tensor({4, 33}, DType::f32), r32 = zeros_tensor({4}, DType::f32);
  rmsnorm_forward(x64, w64, 1e-6, y64, r64);
  rmsnorm_forward(x32, w32, 1e-6, y32, r32);
  EXPECT_LT(max_abs_diff(y64, y32), 1e-5);
}

TEST(Norms, RejectBadShapes) {
  Tensor x = zeros_tensor({2, 4}), w = zeros_tensor({3}), y = zeros_tensor({2, 4}), s = zeros_tensor({2});
  EXPECT_THROW(rmsnorm_forward(x, w, 1e-6, y, s), Error);
  try {
    layernorm_forward(x, w, w, 1e-6, y, s, s);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layernorm_forward: w has shape [3], expected [4]"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace q3vl::test
