// Fused lm_head + cross-entropy on the CUDA device against its CPU twin: one and several vocabulary chunks (the
// last one ragged), ignored tokens, size-1 shapes, f32 and bf16, dw accumulated in f32 or bf16; a bad label and
// a host tensor named.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/layers/cross_entropy.h"
#include "core/layers/lm_head_loss.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct LmHeadCase {
  int64_t n, hidden, vocab;
  bool all_ignored = false;
};

// Random labels in [0, vocab), about a quarter ignored, the last token's in the last vocabulary chunk.
Tensor host_labels(int64_t n, int64_t vocab, uint64_t seed, bool all_ignored) {
  Tensor t = Tensor::empty(host_arena(), {n}, DType::i64);
  std::mt19937_64 rng(seed);
  int64_t* p = static_cast<int64_t*>(t.raw());
  for (int64_t i = 0; i < n; ++i)
    p[i] = all_ignored || rng() % 4 == 0 ? kIgnoreIndex : static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab));
  if (!all_ignored) p[n - 1] = vocab - 1;
  return t;
}

void check_lm_head(const LmHeadCase& c, DType dt, DType grad_dt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n=" + std::to_string(c.n) + " hidden=" + std::to_string(c.hidden) +
               " vocab=" + std::to_string(c.vocab) + " " + std::string(dtype_name(dt)) + " dw " +
               std::string(dtype_name(grad_dt)));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  const Tensor x = in_values(host_random({c.n, c.hidden}, seed, 1.0));
  const Tensor w = in_values(host_random({c.vocab, c.hidden}, seed + 1, 0.5));
  const Tensor labels = host_labels(c.n, c.vocab, seed + 2, c.all_ignored);
  // dw starts from random values (rounded when it is kept in bf16) to check the accumulation.
  const Tensor dw = grad_dt == DType::bf16 ? rounded_to_bf16(host_random({c.vocab, c.hidden}, seed + 3, 0.1))
                                           : host_random({c.vocab, c.hidden}, seed + 3, 0.1);
  const Tensor dwd = to_device(dw, grad_dt);
  // CPU reference in f32.
  Tensor lse = Tensor::empty(host_arena(), {c.n}, DType::f32);
  int64_t count = -1;
  const double sum = lm_head_cross_entropy_forward(x, w, labels, lse, count, host_arena());
  const double scale = count > 0 ? 1.0 / static_cast<double>(count) : 1.0;
  Tensor dx = Tensor::empty(host_arena(), {c.n, c.hidden}, DType::f32);
  lm_head_cross_entropy_backward(x, w, labels, lse, scale, dx, dw, host_arena());
  // Device.
  const Tensor xd = to_device(x, dt), wd = to_device(w, dt), labd = to_device_raw(labels);
  const Tensor lsed = poisoned({c.n}, DType::f32), dxd = poisoned({c.n, c.hidden}, dt);
  const size_t before = device_arena().used();
  int64_t count_d = -1;
  const double sum_d = lm_head_cross_entropy_forward(xd, wd, labd, lsed, count_d, device_arena());
  const double tol = bf ? kTolBf16 : kTolF32;
  EXPECT_EQ(count_d, count);
  EXPECT_LE(std::abs(sum_d - sum), tol * std::abs(sum)) << "loss sum " << sum_d << " vs " << sum;
  expect_rel("lse", lsed, lse, tol);
  lm_head_cross_entropy_backward(xd, wd, labd, lsed, scale, dxd, dwd, device_arena());
  EXPECT_EQ(device_arena().used(), before) << "scratch released";
  expect_rel("dx", dxd, dx, tol);
  expect_rel("dw", dwd, dw, tol);
}

const LmHeadCase kCases[] = {{1, 1, 2}, {7, 13, 37}, {33, 64, kVocabChunk + 129}, {65, 96, 2 * kVocabChunk + 3},
                             {5, 8, 300, true}};

TEST(GpuLmHeadLoss, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_lm_head(c, DType::f32, DType::f32);
}

TEST(GpuLmHeadLoss, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_lm_head(c, DType::bf16, DType::f32);
  check_lm_head({17, 40, kVocabChunk + 7}, DType::bf16, DType::bf16);
}

TEST(GpuLmHeadLoss, BadLabelAndHostTensorAreNamed) {
  Q3VL_REQUIRE_GPU();
  const Tensor x = to_device(host_random({3, 4}, 1), DType::f32), w = to_device(host_random({37, 4}, 2), DType::f32);
  Tensor labels = host_labels(3, 37, 3, false);
  static_cast<int64_t*>(labels.raw())[1] = 99;
  int64_t count = 0;
  expect_error([&] { lm_head_cross_entropy_forward(x, w, to_device_raw(labels), poisoned({3}, DType::f32), count, device_arena()); },
               "lm_head_cross_entropy_forward: labels[1] = 99 is neither -100 nor in [0, 37)");
  const Tensor lse_host = Tensor::empty(host_arena(), {3}, DType::f32);
  expect_error([&] { lm_head_cross_entropy_forward(x, w, to_device_raw(labels), lse_host, count, device_arena()); },
               "lm_head_cross_entropy_forward: lse f32[3] is in host memory");
}

}  // namespace
}  // namespace q3vl::test
