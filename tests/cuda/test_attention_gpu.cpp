// Reference attention on the CUDA device against the CPU flash-style twin: packed documents (length-1 ones and
// one crossing row 64), causal and not, GQA 4:1 and 1:1, head_dim 16, 72 and 128, f32 and bf16; bitwise
// repeatable backward; bad arguments named.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/layers/attention.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct AttentionCase {
  std::vector<int64_t> cu;
  int64_t hq, hkv, d;
  bool causal;
};

Tensor host_cu(const std::vector<int64_t>& cu) {
  Tensor t = Tensor::empty(host_arena(), {static_cast<int64_t>(cu.size())}, DType::i64);
  std::memcpy(t.raw(), cu.data(), cu.size() * sizeof(int64_t));
  return t;
}

void check_attention(const AttentionCase& c, DType dt) {
  const uint64_t seed = fresh_seed();
  const int64_t n = c.cu.back();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n=" + std::to_string(n) + " hq=" + std::to_string(c.hq) +
               " hkv=" + std::to_string(c.hkv) + " d=" + std::to_string(c.d) + (c.causal ? " causal " : " full ") +
               std::string(dtype_name(dt)));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  const Tensor q = in_values(host_random({n, c.hq, c.d}, seed, 2.0));
  const Tensor k = in_values(host_random({n, c.hkv, c.d}, seed + 1, 2.0));
  const Tensor v = in_values(host_random({n, c.hkv, c.d}, seed + 2, 1.0));
  const Tensor dout = in_values(host_random({n, c.hq, c.d}, seed + 3, 1.0));
  const Tensor cu = host_cu(c.cu);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  // CPU reference in f32.
  Tensor out = Tensor::empty(host_arena(), {n, c.hq, c.d}, DType::f32);
  Tensor lse = Tensor::empty(host_arena(), {c.hq, n}, DType::f32);
  attention_forward(q, k, v, cu, c.causal, scale, out, lse);
  Tensor dq = Tensor::empty(host_arena(), {n, c.hq, c.d}, DType::f32);
  Tensor dk = Tensor::empty(host_arena(), {n, c.hkv, c.d}, DType::f32);
  Tensor dv = Tensor::empty(host_arena(), {n, c.hkv, c.d}, DType::f32);
  attention_backward(q, k, v, out, lse, dout, cu, c.causal, scale, dq, dk, dv, host_arena());
  // Device: the backward takes the device forward's own out and lse.
  const Tensor qd = to_device(q, dt), kd = to_device(k, dt), vd = to_device(v, dt), cud = to_device_raw(cu);
  const Tensor outd = poisoned({n, c.hq, c.d}, dt), lsed = poisoned({c.hq, n}, DType::f32);
  attention_forward(qd, kd, vd, cud, c.causal, scale, outd, lsed);
  const double tol = bf ? kTolBf16 : kTolF32;
  expect_rel("out", outd, out, tol);
  expect_rel("lse", lsed, lse, tol);
  const Tensor dqd = poisoned({n, c.hq, c.d}, dt), dkd = poisoned({n, c.hkv, c.d}, dt);
  const Tensor dvd = poisoned({n, c.hkv, c.d}, dt);
  const Tensor doutd = to_device(dout, dt);
  // A scratch arena of exactly the size the planner is told: the backward must fit and release it.
  Arena scratch("attention-scratch", attention_backward_device_scratch_bytes(n, c.hq), Device::cuda);
  attention_backward(qd, kd, vd, outd, lsed, doutd, cud, c.causal, scale, dqd, dkd, dvd, scratch);
  EXPECT_EQ(scratch.used(), 0u) << "scratch released";
  // dq and dk are sums of P (dP - rowsum(P dP)) k (or q) that cancel, exactly to 0 for a one-token document:
  // their terms are bounded by scale |dout| |v| |k| (or |q|) per row.
  const double dp = scale * norm(dout) * max_row_norm(v);
  expect_close("dq", dqd, dq, tol, dp * max_row_norm(k));
  expect_close("dk", dkd, dk, tol, dp * max_row_norm(q));
  expect_rel("dv", dvd, dv, tol);
}

const AttentionCase kCases[] = {
    // Length-1 documents around a 68-row document that crosses row 64; GQA 4:1; the vision head_dim.
    {{0, 1, 2, 70, 71, 137}, 8, 2, 72, true},
    {{0, 1, 2, 70, 71, 137}, 8, 2, 72, false},
    {{0, 5}, 2, 2, 16, false},
    {{0, 5}, 2, 2, 16, true},
    {{0, 1}, 4, 1, 128, true},
    {{0, 33, 97, 100}, 4, 4, 128, false},
    {{0, 64, 130}, 8, 2, 16, true},
    {{0, 3, 4, 90}, 4, 1, 128, true},
};

TEST(GpuAttention, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_attention(c, DType::f32);
}

TEST(GpuAttention, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_attention(c, DType::bf16);
}

TEST(GpuAttention, BackwardIsBitwiseRepeatable) {
  Q3VL_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int64_t n = 1000, hq = 8, hkv = 2, d = 128;
  const Tensor cu = to_device_raw(host_cu({0, 300, 301, 1000}));
  const Tensor q = to_device(host_random({n, hq, d}, seed), DType::bf16);
  const Tensor k = to_device(host_random({n, hkv, d}, seed + 1), DType::bf16);
  const Tensor v = to_device(host_random({n, hkv, d}, seed + 2), DType::bf16);
  const Tensor dout = to_device(host_random({n, hq, d}, seed + 3), DType::bf16);
  const Tensor out = poisoned({n, hq, d}, DType::bf16), lse = poisoned({hq, n}, DType::f32);
  attention_forward(q, k, v, cu, true, 0.088, out, lse);
  Tensor first[3], second[3];
  for (Tensor* r : {first, second}) {
    r[0] = poisoned({n, hq, d}, DType::bf16);
    r[1] = poisoned({n, hkv, d}, DType::bf16);
    r[2] = poisoned({n, hkv, d}, DType::bf16);
    attention_backward(q, k, v, out, lse, dout, cu, true, 0.088, r[0], r[1], r[2], device_arena());
  }
  for (int t = 0; t < 3; ++t) {
    const Tensor a = to_host_f32(first[t]), b = to_host_f32(second[t]);
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << "gradient " << t;
    EXPECT_EQ(rel_error(a, b), 0.0) << "gradient " << t;  // finite as well as equal
  }
}

TEST(GpuAttention, BadArgumentsAreNamed) {
  Q3VL_REQUIRE_GPU();
  const Tensor q = to_device(host_random({4, 2, 16}, 1), DType::f32);
  const Tensor k = to_device(host_random({4, 1, 16}, 2), DType::f32);
  const Tensor out = poisoned({4, 2, 16}, DType::f32), lse = poisoned({2, 4}, DType::f32);
  const Tensor cu_host = host_cu({0, 4});
  expect_error([&] { attention_forward(q, k, k, cu_host, true, 0.25, out, lse); },
               "attention_forward: cu_seqlens i64[2] is in host memory");
  expect_error([&] { attention_forward(q, k, k, to_device_raw(cu_host), true, 0.25, out, poisoned({2, 4}, DType::bf16)); },
               "attention_forward: lse has dtype bf16");
  const Tensor wide = to_device(host_random({4, 1, 300}, 3), DType::f32);
  expect_error([&] {
    attention_forward(wide, wide, wide, to_device_raw(cu_host), true, 0.25, poisoned({4, 1, 300}, DType::f32),
                      poisoned({1, 4}, DType::f32));
  }, "attention_forward: head_dim 300 exceeds");
}

}  // namespace
}  // namespace q3vl::test
