// Fused lm_head + cross-entropy: equal to linear + cross_entropy across vocabulary chunks in f32, finite-difference
// gradients in f64, ignored rows, accumulation into dw, and argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/layers/cross_entropy.h"
#include "core/layers/linear.h"
#include "core/layers/lm_head_loss.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

// ||a - b|| / ||b|| over two same-shape f32 tensors (0 when both are zero, NaN when either has one).
double rel_diff(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  const float *ap = a.data<float>(), *bp = b.data<float>();
  for (int64_t k = 0; k < a.numel(); ++k) {
    num += (static_cast<double>(ap[k]) - bp[k]) * (static_cast<double>(ap[k]) - bp[k]);
    den += static_cast<double>(bp[k]) * bp[k];
  }
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return std::sqrt(num / den);
}

Tensor labels_tensor(const std::vector<int64_t>& v) {
  Tensor t = Tensor::empty(test_arena(), {static_cast<int64_t>(v.size())}, DType::i64);
  std::copy(v.begin(), v.end(), t.data<int64_t>());
  return t;
}

// The fused layer against linear_forward + cross_entropy_forward / _backward + linear_backward, in f32.
void check_against_unfused(int64_t n, int64_t hidden, int64_t vocab, const std::vector<int64_t>& labs) {
  SCOPED_TRACE("n=" + std::to_string(n) + " hidden=" + std::to_string(hidden) + " vocab=" + std::to_string(vocab));
  Arena& a = test_arena();
  const Tensor x = random_tensor({n, hidden}, 11, 1.0, DType::f32);
  const Tensor w = random_tensor({vocab, hidden}, 12, 0.5, DType::f32);
  const Tensor labels = labels_tensor(labs);
  // Unfused reference.
  Tensor logits = Tensor::empty(a, {n, vocab}, DType::f32), lse_ref = Tensor::empty(a, {n}, DType::f32);
  linear_forward(x, w, Tensor(), logits);
  const CrossEntropySum ce = cross_entropy_forward(logits, labels, lse_ref);
  const double scale = ce.count > 0 ? 1.0 / static_cast<double>(ce.count) : 1.0;
  cross_entropy_backward(logits, labels, lse_ref, scale, logits);
  Tensor dx_ref = Tensor::empty(a, {n, hidden}, DType::f32);
  Tensor dw_ref = random_tensor({vocab, hidden}, 13, 0.1, DType::f32);  // accumulated into
  Tensor dw = Tensor::empty(a, {vocab, hidden}, DType::f32);
  copy(dw, dw_ref);
  linear_backward(x, w, logits, dx_ref, dw_ref, Tensor());
  // Fused.
  Arena scratch("lm-head-scratch", lm_head_cross_entropy_scratch_bytes(n, hidden, vocab, DType::f32));
  Tensor lse = Tensor::empty(a, {n}, DType::f32), dx = Tensor::empty(a, {n, hidden}, DType::f32);
  fill(lse, std::nan(""));
  fill(dx, std::nan(""));
  int64_t count = -1;
  const double sum = lm_head_cross_entropy_forward(x, w, labels, lse, count, scratch);
  EXPECT_EQ(count, ce.count);
  EXPECT_NEAR(sum, ce.sum, 1e-6 * std::abs(ce.sum));
  EXPECT_LT(rel_diff(lse, lse_ref), 1e-5);
  lm_head_cross_entropy_backward(x, w, labels, lse, scale, dx, dw, scratch);
  EXPECT_LT(rel_diff(dx, dx_ref), 1e-5);
  EXPECT_LT(rel_diff(dw, dw_ref), 1e-5);
  EXPECT_EQ(scratch.used(), 0u);
}

TEST(LmHeadLoss, EqualsLinearPlusCrossEntropyAcrossChunks) {
  // Three vocabulary chunks, the last one ragged; labels in the first, middle and last chunk, and ignored.
  const int64_t v = 2 * kVocabChunk + 37;
  check_against_unfused(6, 24, v, {0, kIgnoreIndex, kVocabChunk + 5, v - 1, 2 * kVocabChunk, 17});
  check_against_unfused(1, 7, 9, {8});
  check_against_unfused(3, 5, kVocabChunk, {kVocabChunk - 1, kIgnoreIndex, 0});
}

TEST(LmHeadLoss, AllIgnoredGivesZeroLossAndGradient) {
  check_against_unfused(2, 4, 5, {kIgnoreIndex, kIgnoreIndex});
}

TEST(LmHeadLoss, GradientMatchesFiniteDifferences) {
  Arena scratch("lm-head-scratch", lm_head_cross_entropy_scratch_bytes(5, 6, 11, DType::f64));
  Tensor x = random_tensor({5, 6}, 21, 1.0), w = random_tensor({11, 6}, 22, 1.0);
  const Tensor labels = labels_tensor({3, kIgnoreIndex, 10, 0, 3});
  Tensor lse = zeros_tensor({5});
  int64_t count = 0;
  auto loss = [&] { return lm_head_cross_entropy_forward(x, w, labels, lse, count, scratch) / 4.0; };
  loss();
  ASSERT_EQ(count, 4);
  Tensor dx = zeros_tensor({5, 6}), dw = zeros_tensor({11, 6});
  lm_head_cross_entropy_backward(x, w, labels, lse, 0.25, dx, dw, scratch);
  expect_gradients("lm_head_cross_entropy", loss, {{"x", x, dx}, {"w", w, dw}});
}

TEST(LmHeadLoss, GradientOfXMatchesFiniteDifferencesAcrossChunks) {
  const int64_t v = kVocabChunk + 3;
  Arena scratch("lm-head-scratch", lm_head_cross_entropy_scratch_bytes(3, 4, v, DType::f64));
  Tensor x = random_tensor({3, 4}, 31, 1.0), w = random_tensor({v, 4}, 32, 1.0);
  const Tensor labels = labels_tensor({v - 2, 1, kVocabChunk});
  Tensor lse = zeros_tensor({3});
  int64_t count = 0;
  auto loss = [&] { return lm_head_cross_entropy_forward(x, w, labels, lse, count, scratch) / 3.0; };
  loss();
  Tensor dx = zeros_tensor({3, 4}), dw = zeros_tensor({v, 4});
  lm_head_cross_entropy_backward(x, w, labels, lse, 1.0 / 3.0, dx, dw, scratch);
  expect_gradients("lm_head_cross_entropy (chunked)", loss, {{"x", x, dx}});
}

TEST(LmHeadLoss, RejectsBadLabelAndShapesNamingThem) {
  Arena scratch("lm-head-scratch", lm_head_cross_entropy_scratch_bytes(2, 3, 4, DType::f64));
  const Tensor x = zeros_tensor({2, 3}), w = zeros_tensor({4, 3}), lse = zeros_tensor({2});
  int64_t count = 0;
  expect_error([&] { lm_head_cross_entropy_forward(x, w, labels_tensor({1, 4}), lse, count, scratch); },
               "lm_head_cross_entropy_forward: labels[1] = 4 is neither -100 nor in [0, 4)");
  expect_error([&] { lm_head_cross_entropy_forward(x, zeros_tensor({4, 2}), labels_tensor({1, 2}), lse, count, scratch); },
               "lm_head_cross_entropy_forward: w");
  expect_error([&] {
    lm_head_cross_entropy_backward(x, w, labels_tensor({1, 2}), lse, 1.0, zeros_tensor({2, 4}), zeros_tensor({4, 3}),
                                   scratch);
  }, "lm_head_cross_entropy_backward: dx");
}

}  // namespace
}  // namespace q3vl::test
