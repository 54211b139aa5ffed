// Padding-query attention through the output projection: padding rows against a reference built from the
// unpadded varlen attention and linear, real rows untouched, scratch equal to its size function, input checks.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/layers/attention.h"
#include "core/layers/linear.h"
#include "core/layers/padding_attention.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

// Two documents [0, 6) with 4 real tokens and [6, 9) with 3 (no padding), then [9, 14) with 2 real tokens.
struct Batch {
  static constexpr int64_t n = 14, hq = 4, hkv = 2, d = 6, hidden = 5;
  std::vector<int64_t> cu = {0, 6, 9, 14}, real = {4, 3, 2};
  Tensor q = random_tensor({n, hq, d}, 61), k = random_tensor({n, hkv, d}, 62), v = random_tensor({n, hkv, d}, 63);
  Tensor wo = random_tensor({hidden, hq * d}, 64);
  Tensor cu_seqlens() { return Tensor(cu.data(), DType::i64, {4}); }
  Tensor doc_real() { return Tensor(real.data(), DType::i64, {3}); }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(d)); }
};

TEST(PaddingAttention, PaddingRowsEqualAttentionOverTheRealTokensThroughWo) {
  Batch b;
  const Tensor before = random_tensor({Batch::n, Batch::hidden}, 65);
  Tensor y = zeros_tensor({Batch::n, Batch::hidden});
  copy(y, before);
  Arena scratch("scratch", 1 << 20);
  padding_attention_forward(b.q, b.k, b.v, b.cu_seqlens(), b.doc_real(), b.scale(), b.wo, y, scratch);
  for (int64_t doc = 0; doc < 3; ++doc) {
    const int64_t begin = b.cu[doc], real = b.real[doc], end = b.cu[doc + 1];
    for (int64_t t = begin; t < begin + real; ++t) EXPECT_EQ(max_abs_diff(y[t], before[t]), 0.0) << t;
    // Reference: non-causal attention whose queries are all padding query t and whose keys are the real tokens,
    // so every output row is t's attention over exactly those keys; then the projection.
    for (int64_t t = begin + real; t < end; ++t) {
      Tensor qq = zeros_tensor({real, Batch::hq, Batch::d}), o = zeros_tensor({real, Batch::hq, Batch::d});
      Tensor lse = zeros_tensor({Batch::hq, real}), row = zeros_tensor({1, Batch::hidden});
      for (int64_t r = 0; r < real; ++r) copy(qq[r], b.q[t]);
      std::vector<int64_t> cu = {0, real};
      attention_forward(qq, b.k.narrow(0, begin, real), b.v.narrow(0, begin, real),
                        Tensor(cu.data(), DType::i64, {2}), false, b.scale(), o, lse);
      linear_forward(o.narrow(0, 0, 1).view({1, Batch::hq * Batch::d}), b.wo, Tensor{}, row);
      // f64, same math in a different order: 1e-12.
      EXPECT_LT(max_abs_diff(row[0], y[t]), 1e-12) << t;
    }
  }
}

TEST(PaddingAttention, ScratchEqualsTheSizeFunction) {
  Batch b;
  Tensor y = zeros_tensor({Batch::n, Batch::hidden});
  Arena scratch("scratch", 1 << 20);
  padding_attention_forward(b.q, b.k, b.v, b.cu_seqlens(), b.doc_real(), b.scale(), b.wo, y, scratch);
  EXPECT_EQ(scratch.used(), 0u);
  EXPECT_EQ(scratch.high_water(), padding_attention_scratch_bytes(3, Batch::hq, Batch::d, DType::f64));
}

TEST(PaddingAttention, RejectsADocumentWithoutRealTokens) {
  Batch b;
  b.real[2] = 0;
  Tensor y = zeros_tensor({Batch::n, Batch::hidden});
  expect_error([&] {
    padding_attention_forward(b.q, b.k, b.v, b.cu_seqlens(), b.doc_real(), b.scale(), b.wo, y, test_arena());
  }, "padding_attention_forward: document 2 has 0 real tokens of 5");
}

}  // namespace
}  // namespace q3vl::test
