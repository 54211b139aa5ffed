// Attention: a hand-computed case, agreement with a direct (untiled, [N, N]-materialising) reference
// across tile boundaries, finite-difference gradients for GQA ratios 1/2/4, causal and not, odd head_dim
// and varied document splits, packed documents equal separate runs, thread-count determinism, and
// argument checks.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "core/layers/attention.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

Tensor cu_tensor(const std::vector<int64_t>& cu) {
  Tensor t = Tensor::empty(test_arena(), {static_cast<int64_t>(cu.size())}, DType::i64);
  std::copy(cu.begin(), cu.end(), t.data<int64_t>());
  return t;
}

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

// Softmax attention written directly from its definition, one query row at a time over its whole
// document, with the textbook backward: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)),
// dQ = scale dS K, dK = scale dS^T Q.
Reference reference_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<int64_t>& cu,
                              bool causal, double scale, const Tensor& dout) {
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1), group = hq / hkv;
  const double *qp = q.data<double>(), *kp = k.data<double>(), *vp = v.data<double>(), *gp = dout.data<double>();
  Reference r{std::vector<double>(n * hq * d), std::vector<double>(hq * n), std::vector<double>(n * hq * d),
              std::vector<double>(n * hkv * d), std::vector<double>(n * hkv * d)};
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    for (int64_t h = 0; h < hq; ++h) {
      const int64_t g = h / group;
      for (int64_t i = cu[b]; i < cu[b + 1]; ++i) {
        const int64_t j0 = cu[b], j1 = causal ? i + 1 : cu[b + 1];
        std::vector<double> p(j1 - j0), dp(j1 - j0);
        double mx = -INFINITY;
        for (int64_t j = j0; j < j1; ++j) {
          double s = 0;
          for (int64_t c = 0; c < d; ++c) s += qp[(i * hq + h) * d + c] * kp[(j * hkv + g) * d + c];
          p[j - j0] = s * scale;
          mx = std::max(mx, p[j - j0]);
        }
        double sum = 0;
        for (double& x : p) sum += (x = std::exp(x - mx));
        for (double& x : p) x /= sum;
        r.lse[h * n + i] = mx + std::log(sum);
        double delta = 0;
        for (int64_t j = j0; j < j1; ++j) {
          for (int64_t c = 0; c < d; ++c) {
            r.out[(i * hq + h) * d + c] += p[j - j0] * vp[(j * hkv + g) * d + c];
            dp[j - j0] += gp[(i * hq + h) * d + c] * vp[(j * hkv + g) * d + c];
          }
          delta += p[j - j0] * dp[j - j0];
        }
        for (int64_t j = j0; j < j1; ++j) {
          const double ds = p[j - j0] * (dp[j - j0] - delta);
          for (int64_t c = 0; c < d; ++c) {
            r.dv[(j * hkv + g) * d + c] += p[j - j0] * gp[(i * hq + h) * d + c];
            r.dq[(i * hq + h) * d + c] += scale * ds * kp[(j * hkv + g) * d + c];
            r.dk[(j * hkv + g) * d + c] += scale * ds * qp[(i * hq + h) * d + c];
          }
        }
      }
    }
  }
  return r;
}

void expect_close(const std::string& what, const Tensor& t, const std::vector<double>& ref, double tol) {
  ASSERT_EQ(t.numel(), static_cast<int64_t>(ref.size())) << what;
  int bad = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double got = t.data<double>()[i];
    if (!(std::abs(got - ref[i]) <= tol * (1 + std::abs(ref[i]))) && ++bad <= 5)
      ADD_FAILURE() << what << "[" << i << "]: " << got << " vs reference " << ref[i];
  }
  EXPECT_EQ(bad, 0) << what;
}

TEST(Attention, HandComputedTwoTokens) {
  // One head, head_dim 1, scale 0.5: q = [0, 2 ln 3], k = [0, 1], v = [2, 6].
  // Causal: token 0 sees only itself -> out v0 = 2, lse = 0. Token 1 scores (0, ln 3): weights (1/4, 3/4),
  // out = 2/4 + 18/4 = 5, lse = ln(1 + 3). Bidirectional: token 0 scores (0, 0) -> out 4, lse ln 2.
  double qv[] = {0, 2 * std::log(3.0)}, kv[] = {0, 1}, vv[] = {2, 6};
  Tensor q(qv, DType::f64, {2, 1, 1}), k(kv, DType::f64, {2, 1, 1}), v(vv, DType::f64, {2, 1, 1});
  Tensor cu = cu_tensor({0, 2});
  Tensor out = zeros_tensor({2, 1, 1}), lse = zeros_tensor({1, 2});
  attention_forward(q, k, v, cu, true, 0.5, out, lse);
  EXPECT_EQ(out.data<double>()[0], 2.0);
  EXPECT_EQ(lse.data<double>()[0], 0.0);
  EXPECT_NEAR(out.data<double>()[1], 5.0, 1e-14);  // f64 rounding of ln 3 and the exp/sum: a few ulps of 5
  EXPECT_NEAR(lse.data<double>()[1], std::log(4.0), 1e-15);
  attention_forward(q, k, v, cu, false, 0.5, out, lse);
  EXPECT_EQ(out.data<double>()[0], 4.0);
  EXPECT_NEAR(lse.data<double>()[0], std::log(2.0), 1e-15);
  EXPECT_NEAR(out.data<double>()[1], 5.0, 1e-14);
}

struct Case {
  int64_t hq, hkv, d;
  bool causal;
  std::vector<int64_t> cu;
};

std::string describe(const Case& c) {
  std::string s = "hq" + std::to_string(c.hq) + "_hkv" + std::to_string(c.hkv) + "_d" + std::to_string(c.d) +
                  (c.causal ? "_causal" : "_bidir") + "_cu";
  for (int64_t x : c.cu) s += "_" + std::to_string(x);
  return s;
}

std::string case_name(const testing::TestParamInfo<Case>& info) { return describe(info.param); }

void PrintTo(const Case& c, std::ostream* os) { *os << describe(c); }

class AttentionVsReference : public testing::TestWithParam<Case> {};

TEST_P(AttentionVsReference, ForwardAndBackward) {
  const Case& c = GetParam();
  const int64_t n = c.cu.back();
  Tensor q = random_tensor({n, c.hq, c.d}, 1), k = random_tensor({n, c.hkv, c.d}, 2);
  Tensor v = random_tensor({n, c.hkv, c.d}, 3), dout = random_tensor({n, c.hq, c.d}, 4);
  Tensor cu = cu_tensor(c.cu);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  Tensor out = zeros_tensor({n, c.hq, c.d}), lse = zeros_tensor({c.hq, n});
  attention_forward(q, k, v, cu, c.causal, scale, out, lse);
  Tensor dq = zeros_tensor({n, c.hq, c.d}), dk = zeros_tensor({n, c.hkv, c.d}), dv = zeros_tensor({n, c.hkv, c.d});
  attention_backward(q, k, v, out, lse, dout, cu, c.causal, scale, dq, dk, dv, test_arena());
  const Reference ref = reference_attention(q, k, v, c.cu, c.causal, scale, dout);
  // Both sides are f64 and differ only in summation order (tiles, online softmax rescaling, GEMM
  // blocking): relative differences stay near N * 1e-16 ~ 1e-13, so 1e-11 has margin yet any wrong or
  // missing term (an error of the size of one softmax weight, >= 1e-4 here) fails.
  const double tol = 1e-11;
  expect_close("out", out, ref.out, tol);
  expect_close("lse", lse, ref.lse, tol);
  expect_close("dq", dq, ref.dq, tol);
  expect_close("dk", dk, ref.dk, tol);
  expect_close("dv", dv, ref.dv, tol);
}

// Lengths above the 128-token tile exercise multi-tile online softmax, partial last tiles and the causal
// diagonal tiles; length-1 documents the smallest blocks.
INSTANTIATE_TEST_SUITE_P(
    Splits, AttentionVsReference,
    testing::Values(Case{4, 2, 5, true, {0, 300}}, Case{4, 2, 5, false, {0, 300}},
                    Case{4, 1, 3, true, {0, 129, 130, 387}}, Case{2, 2, 8, false, {0, 1, 257, 260}},
                    Case{4, 4, 4, true, {0, 128, 256}}, Case{8, 2, 7, true, {0, 5, 6, 7, 200}},
                    Case{3, 1, 2, false, {0, 1, 2, 3}}),
    case_name);

class AttentionGrad : public testing::TestWithParam<Case> {};

TEST_P(AttentionGrad, MatchesFiniteDifferences) {
  const Case& c = GetParam();
  const int64_t n = c.cu.back();
  Tensor q = random_tensor({n, c.hq, c.d}, 11), k = random_tensor({n, c.hkv, c.d}, 12);
  Tensor v = random_tensor({n, c.hkv, c.d}, 13), r = random_tensor({n, c.hq, c.d}, 14);
  Tensor cu = cu_tensor(c.cu);
  const double scale = 0.7;
  Tensor out = zeros_tensor({n, c.hq, c.d}), lse = zeros_tensor({c.hq, n});
  auto loss = [&] {
    attention_forward(q, k, v, cu, c.causal, scale, out, lse);
    return dot(out, r);
  };
  loss();
  Tensor dq = zeros_tensor({n, c.hq, c.d}), dk = zeros_tensor({n, c.hkv, c.d}), dv = zeros_tensor({n, c.hkv, c.d});
  attention_backward(q, k, v, out, lse, r, cu, c.causal, scale, dq, dk, dv, test_arena());
  const std::string layer = std::string("attention(") + (c.causal ? "causal" : "bidirectional") + ")";
  expect_gradients(layer, loss, {{"q", q, dq}, {"k", k, dk}, {"v", v, dv}});
}

std::vector<Case> grad_cases() {
  std::vector<Case> cases;
  const std::vector<std::vector<int64_t>> splits = {{0, 7}, {0, 1, 4, 9}, {0, 3, 4, 5, 11}, {0, 1, 2, 3}};
  for (int64_t hkv : {4, 2, 1})
    for (bool causal : {true, false})
      for (size_t s = 0; s < splits.size(); ++s) cases.push_back(Case{4, hkv, s % 2 ? 5 : 3, causal, splits[s]});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(GqaSplits, AttentionGrad, testing::ValuesIn(grad_cases()), case_name);

TEST(Attention, PackedDocumentsEqualSeparateRuns) {
  // f32 and bitwise: each document is computed by the same tiles whether packed or alone.
  const std::vector<int64_t> cuv = {0, 130, 131, 200};
  const int64_t n = 200, hq = 4, hkv = 2, d = 16;
  Tensor q = random_tensor({n, hq, d}, 21, 1.0, DType::f32), k = random_tensor({n, hkv, d}, 22, 1.0, DType::f32);
  Tensor v = random_tensor({n, hkv, d}, 23, 1.0, DType::f32), dout = random_tensor({n, hq, d}, 24, 1.0, DType::f32);
  for (bool causal : {true, false}) {
    Tensor out = zeros_tensor({n, hq, d}, DType::f32), lse = zeros_tensor({hq, n}, DType::f32);
    attention_forward(q, k, v, cu_tensor(cuv), causal, 0.25, out, lse);
    Tensor dq = zeros_tensor({n, hq, d}, DType::f32), dk = zeros_tensor({n, hkv, d}, DType::f32);
    Tensor dv = zeros_tensor({n, hkv, d}, DType::f32);
    attention_backward(q, k, v, out, lse, dout, cu_tensor(cuv), causal, 0.25, dq, dk, dv, test_arena());
    for (size_t b = 0; b + 1 < cuv.size(); ++b) {
      const int64_t s = cuv[b], len = cuv[b + 1] - cuv[b];
      Tensor out1 = zeros_tensor({len, hq, d}, DType::f32), lse1 = zeros_tensor({hq, len}, DType::f32);
      Tensor cu1 = cu_tensor({0, len});
      attention_forward(q.narrow(0, s, len), k.narrow(0, s, len), v.narrow(0, s, len), cu1, causal, 0.25, out1, lse1);
      Tensor dq1 = zeros_tensor({len, hq, d}, DType::f32), dk1 = zeros_tensor({len, hkv, d}, DType::f32);
      Tensor dv1 = zeros_tensor({len, hkv, d}, DType::f32);
      attention_backward(q.narrow(0, s, len), k.narrow(0, s, len), v.narrow(0, s, len), out1, lse1,
                         dout.narrow(0, s, len), cu1, causal, 0.25, dq1, dk1, dv1, test_arena());
      EXPECT_EQ(max_abs_diff(out1, out.narrow(0, s, len)), 0.0) << "document " << b;
      EXPECT_EQ(max_abs_diff(dq1, dq.narrow(0, s, len)), 0.0) << "document " << b;
      EXPECT_EQ(max_abs_diff(dk1, dk.narrow(0, s, len)), 0.0) << "document " << b;
      EXPECT_EQ(max_abs_diff(dv1, dv.narrow(0, s, len)), 0.0) << "document " << b;
      for (int64_t h = 0; h < hq; ++h)
        for (int64_t i = 0; i < len; ++i)
          EXPECT_EQ(lse1.data<float>()[h * len + i], lse.data<float>()[h * n + s + i]) << "document " << b;
    }
  }
}

TEST(Attention, DeterministicAcrossThreadCounts) {
  const int64_t n = 300, hq = 4, hkv = 2, d = 16;
  const std::vector<int64_t> cuv = {0, 150, 300};
  Tensor q = random_tensor({n, hq, d}, 31, 1.0, DType::f32), k = random_tensor({n, hkv, d}, 32, 1.0, DType::f32);
  Tensor v = random_tensor({n, hkv, d}, 33, 1.0, DType::f32), dout = random_tensor({n, hq, d}, 34, 1.0, DType::f32);
  Tensor cu = cu_tensor(cuv);
  const int saved_threads = omp_get_max_threads();
  Tensor results[2][4];
  const int thread_counts[2] = {1, 3};
  for (int run = 0; run < 2; ++run) {
    omp_set_num_threads(thread_counts[run]);
    Tensor out = zeros_tensor({n, hq, d}, DType::f32), lse = zeros_tensor({hq, n}, DType::f32);
    attention_forward(q, k, v, cu, true, 0.25, out, lse);
    Tensor dq = zeros_tensor({n, hq, d}, DType::f32), dk = zeros_tensor({n, hkv, d}, DType::f32);
    Tensor dv = zeros_tensor({n, hkv, d}, DType::f32);
    attention_backward(q, k, v, out, lse, dout, cu, true, 0.25, dq, dk, dv, test_arena());
    results[run][0] = out;
    results[run][1] = dq;
    results[run][2] = dk;
    results[run][3] = dv;
  }
  omp_set_num_threads(saved_threads);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(max_abs_diff(results[0][i], results[1][i]), 0.0) << "output " << i;
}

TEST(Attention, BackwardScratchIsSizedAndReleased) {
  const int64_t n = 20, hq = 2, hkv = 1, d = 4;
  Tensor q = random_tensor({n, hq, d}, 41), k = random_tensor({n, hkv, d}, 42), v = random_tensor({n, hkv, d}, 43);
  Tensor cu = cu_tensor({0, 20});
  Tensor out = zeros_tensor({n, hq, d}), lse = zeros_tensor({hq, n});
  attention_forward(q, k, v, cu, true, 0.5, out, lse);
  Tensor dq = zeros_tensor({n, hq, d}), dk = zeros_tensor({n, hkv, d}), dv = zeros_tensor({n, hkv, d});
  Arena scratch("attention scratch", attention_backward_scratch_bytes(DType::f64));
  attention_backward(q, k, v, out, lse, out, cu, true, 0.5, dq, dk, dv, scratch);
  EXPECT_EQ(scratch.used(), 0u);
  EXPECT_GT(scratch.high_water(), 0u);
}


TEST(Attention, RejectsBadArguments) {
  const int64_t n = 5;
  Tensor q = zeros_tensor({n, 4, 3}), k = zeros_tensor({n, 2, 3}), v = zeros_tensor({n, 2, 3});
  Tensor out = zeros_tensor({n, 4, 3}), lse = zeros_tensor({4, n});
  auto fwd = [&](const Tensor& cu) { attention_forward(q, k, v, cu, true, 1.0, out, lse); };
  expect_error([&] { fwd(cu_tensor({1, 5})); }, "attention_forward: cu_seqlens must start at 0, got 1");
  expect_error([&] { fwd(cu_tensor({0, 3, 3, 5})); }, "attention_forward: cu_seqlens must be strictly increasing");
  expect_error([&] { fwd(cu_tensor({0, 2, 1, 5})); }, "attention_forward: cu_seqlens must be strictly increasing");
  expect_error([&] { fwd(cu_tensor({0, 4})); }, "attention_forward: cu_seqlens must end at the token count 5, got 4");
  expect_error([&] { fwd(cu_tensor({0})); }, "attention_forward: cu_seqlens needs at least 2 entries");
  Tensor cu32 = Tensor::zeros(test_arena(), {2}, DType::i32);
  expect_error([&] { fwd(cu32); }, "attention_forward: cu_seqlens has dtype i32, expected i64");

  Tensor cu = cu_tensor({0, 5});
  Tensor q3 = zeros_tensor({n, 3, 3}), out3 = zeros_tensor({n, 3, 3}), lse3 = zeros_tensor({3, n});
  expect_error([&] { attention_forward(q3, k, v, cu, true, 1.0, out3, lse3); },
               "attention_forward: q heads (3) must be a multiple of kv heads (2)");
  Tensor v_bad = zeros_tensor({n, 2, 4});
  expect_error([&] { attention_forward(q, k, v_bad, cu, true, 1.0, out, lse); },
               "attention_forward: v has shape [5,2,4], expected [5,2,3]");
  Tensor lse_bad = zeros_tensor({n, 4});
  expect_error([&] { attention_forward(q, k, v, cu, true, 1.0, out, lse_bad); },
               "attention_forward: lse has shape [5,4], expected [4,5]");
  expect_error([&] { attention_forward(q, k, v, cu, true, 0.0, out, lse); },
               "attention_forward: scale must be positive and finite");
  Tensor qf = zeros_tensor({n, 4, 3}, DType::f32);
  expect_error([&] { attention_forward(qf, k, v, cu, true, 1.0, out, lse); },
               "attention_forward: k has dtype f64, expected f32");

  Tensor dq = zeros_tensor({n, 4, 3}), dk_bad = zeros_tensor({n, 4, 3}), dv = zeros_tensor({n, 2, 3});
  expect_error([&] { attention_backward(q, k, v, out, lse, out, cu, true, 1.0, dq, dk_bad, dv, test_arena()); },
               "attention_backward: dk has shape [5,4,3], expected [5,2,3]");
  expect_error([&] { attention_backward(q, k, v, out, lse, out, cu_tensor({0, 6}), true, 1.0, dq, dv, dv, test_arena()); },
               "attention_backward: cu_seqlens must end at the token count 5, got 6");
}

}  // namespace
}  // namespace q3vl::test
