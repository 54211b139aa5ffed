// Embedding and chunked cross-entropy: hand-computed values, ignore index, vocab chunking, FD gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "core/layers/cross_entropy.h"
#include "core/layers/embedding.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

TEST(Embedding, GatherAndGradient) {
  int64_t idv[] = {2, 0, 2, 1};
  Tensor ids(idv, DType::i64, {4});
  Tensor table = random_tensor({3, 5}, 61), r = random_tensor({4, 5}, 62), y = zeros_tensor({4, 5});
  embedding_forward(ids, table, y);
  EXPECT_EQ(y.data<double>()[0], table.data<double>()[10]);
  EXPECT_EQ(y.data<double>()[5], table.data<double>()[0]);
  auto loss = [&] {
    embedding_forward(ids, table, y);
    return dot(y, r);
  };
  Tensor dt = zeros_tensor({3, 5});
  embedding_backward(ids, r, dt);
  expect_gradients("embedding", loss, {{"table", table, dt}});
}

TEST(Embedding, RejectsOutOfRangeIdNamingIt) {
  int64_t idv[] = {0, 7};
  Tensor ids(idv, DType::i64, {2});
  Tensor table = zeros_tensor({3, 2}), y = zeros_tensor({2, 2});
  try {
    embedding_forward(ids, table, y);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ids[1] = 7 is outside the vocabulary [0, 3)"), std::string::npos) << e.what();
  }
}

TEST(CrossEntropy, HandComputedWithIgnoredToken) {
  double lv[] = {0, 0, 0, 0,  // uniform: loss log 4
                 1, 2, 3, 4,  // ignored
                 0, std::log(3.0), 0, 0};  // p(label 1) = 3/6
  int64_t labv[] = {3, kIgnoreIndex, 1};
  Tensor logits(lv, DType::f64, {3, 4}), labels(labv, DType::i64, {3});
  Tensor lse = zeros_tensor({3});
  const CrossEntropySum ce = cross_entropy_forward(logits, labels, lse);
  EXPECT_EQ(ce.count, 2);
  EXPECT_NEAR(ce.mean(), (std::log(4.0) + std::log(2.0)) / 2, 1e-15);
  Tensor d = zeros_tensor({3, 4});
  cross_entropy_backward(logits, labels, lse, 1.0 / ce.count, d);
  EXPECT_NEAR(d.data<double>()[3], (0.25 - 1) / 2, 1e-15);
  for (int j = 4; j < 8; ++j) EXPECT_EQ(d.data<double>()[j], 0.0);
  EXPECT_NEAR(d.data<double>()[9], (0.5 - 1) / 2, 1e-15);
}

TEST(CrossEntropy, ChunkedLogSumExpMatchesDirectAcrossChunks) {
  // V spans three vocabulary chunks with the maximum in the last one, exercising the online rescale.
  const int64_t v = 2 * kVocabChunk + 17;
  Tensor logits = random_tensor({2, v}, 71, 5.0);
  logits.data<double>()[v - 3] = 40;  // row 0's maximum lies in the last chunk
  int64_t labv[] = {5, v - 1};
  Tensor labels(labv, DType::i64, {2}), lse = zeros_tensor({2});
  cross_entropy_forward(logits, labels, lse);
  for (int i = 0; i < 2; ++i) {
    const double* row = logits.data<double>() + i * v;
    double m = row[0];
    for (int64_t j = 0; j < v; ++j) m = std::max(m, row[j]);
    double s = 0;
    for (int64_t j = 0; j < v; ++j) s += std::exp(row[j] - m);
    EXPECT_NEAR(lse.data<double>()[i], m + std::log(s), 1e-12);
  }
}

TEST(CrossEntropy, GradientMatchesFiniteDifferences) {
  Tensor logits = random_tensor({5, 11}, 81, 3.0);
  int64_t labv[] = {0, kIgnoreIndex, 10, 4, 4};
  Tensor labels(labv, DType::i64, {5}), lse = zeros_tensor({5});
  auto loss = [&] { return cross_entropy_forward(logits, labels, lse).mean(); };
  const CrossEntropySum ce = cross_entropy_forward(logits, labels, lse);
  Tensor d = zeros_tensor({5, 11});
  cross_entropy_backward(logits, labels, lse, 1.0 / ce.count, d);
  expect_gradients("cross_entropy", loss, {{"logits", logits, d}});
}

TEST(CrossEntropy, BackwardInPlaceEqualsOutOfPlace) {
  Tensor logits = random_tensor({3, 9}, 91, 2.0), copy_of = zeros_tensor({3, 9});
  copy(copy_of, logits);
  int64_t labv[] = {1, 2, 8};
  Tensor labels(labv, DType::i64, {3}), lse = zeros_tensor({3}), d = zeros_tensor({3, 9});
  cross_entropy_forward(logits, labels, lse);
  cross_entropy_backward(logits, labels, lse, 0.5, d);
  cross_entropy_backward(copy_of, labels, lse, 0.5, copy_of);
  EXPECT_EQ(max_abs_diff(d, copy_of), 0.0);
}

TEST(CrossEntropy, RejectsBadLabel) {
  Tensor logits = zeros_tensor({1, 4}), lse = zeros_tensor({1});
  int64_t labv[] = {-5};
  Tensor labels(labv, DType::i64, {1});
  EXPECT_THROW(cross_entropy_forward(logits, labels, lse), Error);
}

TEST(CrossEntropy, Float32VectorisedExpMatchesDoubleReference) {
  // The f32 path computes exp with the AVX2 polynomial (core/kernels/cpu/vector_exp.h); the f64 path with libm.
  // Same logits (rounded to f32) through both: the polynomial is within 2 ulp and sums run in f64 per block,
  // so the loss agrees to ~1e-7 relative (bound 1e-6) and the softmax gradient to ~1e-7 of its scale.
  const int64_t n = 3, v = 2 * kVocabChunk + 1001;  // odd width: vector body plus scalar tail
  const Tensor ref = random_tensor({n, v}, 5, 12.0);
  std::vector<float> lf(n * v);
  for (int64_t k = 0; k < n * v; ++k) {
    lf[k] = static_cast<float>(ref.data<double>()[k]);
    ref.data<double>()[k] = lf[k];
  }
  lf[7] = -200.0f;  // far below the row maximum: exp underflows to 0 in both paths
  ref.data<double>()[7] = -200.0;
  int64_t labv[] = {3, v - 2, kIgnoreIndex};
  Tensor labels(labv, DType::i64, {n});
  Tensor logits32(lf.data(), DType::f32, {n, v});
  std::vector<float> lse32(n), d32(n * v);
  Tensor lse_f(lse32.data(), DType::f32, {n}), dlog_f(d32.data(), DType::f32, {n, v});
  const Tensor lse_d = zeros_tensor({n}), dlog_d = zeros_tensor({n, v});
  const CrossEntropySum a = cross_entropy_forward(logits32, labels, lse_f);
  const CrossEntropySum b = cross_entropy_forward(ref, labels, lse_d);
  ASSERT_EQ(a.count, 2);
  EXPECT_NEAR(a.sum, b.sum, 1e-6 * std::abs(b.sum));
  cross_entropy_backward(logits32, labels, lse_f, 0.5, dlog_f);
  cross_entropy_backward(ref, labels, lse_d, 0.5, dlog_d);
  double worst = 0;
  for (int64_t k = 0; k < n * v; ++k) worst = std::max(worst, std::abs(d32[k] - dlog_d.data<double>()[k]));
  EXPECT_LT(worst, 0.5 * 1e-6);
  EXPECT_EQ(d32[7], 0.0f);
}

TEST(CrossEntropy, NanLogitMakesTheLossNan) {
  // A NaN anywhere in a counted row must reach the loss (the trainer stops on it), in both precisions.
  const int64_t v = kVocabChunk + 9;
  std::vector<float> lf(v, 0.5f);
  lf[v - 1] = std::numeric_limits<float>::quiet_NaN();  // in the scalar tail of the last chunk
  lf[100] = std::numeric_limits<float>::quiet_NaN();    // in a vector body
  int64_t lab[] = {0};
  Tensor labels(lab, DType::i64, {1});
  float lse = 0;
  Tensor logits(lf.data(), DType::f32, {1, v}), lse_t(&lse, DType::f32, {1});
  EXPECT_TRUE(std::isnan(cross_entropy_forward(logits, labels, lse_t).sum));
  lf[v - 1] = 0.5f;
  EXPECT_TRUE(std::isnan(cross_entropy_forward(logits, labels, lse_t).sum));
}

}  // namespace
}  // namespace q3vl::test
