// Causal GQA attention as in the Qwen3-VL-30B text decoder (32 q heads, 4 kv heads, head_dim 128) over one
// 2048-token document, f32, forward + backward.
//
// FLOP convention: useful causal work only. The forward is 2 GEMM-like products (Q K^T and P V) of
// 2*N*N*D FLOPs per q head, halved by the causal mask: 4*N*N*D*Hq/2. The backward is counted as 2.5x the
// forward (5 products: S recompute, dV, dP, dQ, dK), the usual FlashAttention convention. Exponentials and
// the work wasted above the diagonal of diagonal tiles are not counted.
#include <benchmark/benchmark.h>

#include <cmath>

#include "core/arena.h"
#include "core/layers/attention.h"
#include "core/rng.h"
#include "tests/bench/peak.h"

namespace {

void BM_AttentionCausalForwardBackward(benchmark::State& state) {
  using namespace q3vl;
  const int64_t n = state.range(0), hq = state.range(1), hkv = state.range(2), d = state.range(3);
  const size_t q_bytes = size_t(4) * n * hq * d, kv_bytes = size_t(4) * n * hkv * d;
  Arena arena("bench", 4 * q_bytes + 4 * kv_bytes + size_t(4) * hq * n + 64 * 16);
  Arena scratch("bench scratch", attention_backward_scratch_bytes(DType::f32));
  Tensor q = Tensor::empty(arena, {n, hq, d}, DType::f32), k = Tensor::empty(arena, {n, hkv, d}, DType::f32);
  Tensor v = Tensor::empty(arena, {n, hkv, d}, DType::f32), out = Tensor::empty(arena, {n, hq, d}, DType::f32);
  Tensor lse = Tensor::empty(arena, {hq, n}, DType::f32), dout = Tensor::empty(arena, {n, hq, d}, DType::f32);
  Tensor dq = Tensor::empty(arena, {n, hq, d}, DType::f32), dk = Tensor::empty(arena, {n, hkv, d}, DType::f32);
  Tensor dv = Tensor::empty(arena, {n, hkv, d}, DType::f32);
  Tensor cu = Tensor::empty(arena, {2}, DType::i64);
  cu.data<int64_t>()[0] = 0;
  cu.data<int64_t>()[1] = n;
  fill_uniform(q, Philox(1), -1, 1);
  fill_uniform(k, Philox(2), -1, 1);
  fill_uniform(v, Philox(3), -1, 1);
  fill_uniform(dout, Philox(4), -1, 1);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (auto _ : state) {
    attention_forward(q, k, v, cu, true, scale, out, lse);
    attention_backward(q, k, v, out, lse, dout, cu, true, scale, dq, dk, dv, scratch);
    benchmark::DoNotOptimize(dq.raw());
  }
  const double forward = 4.0 * double(n) * double(n) * double(d) * double(hq) / 2.0;
  bench::report_flops(state, forward * 3.5);
}
BENCHMARK(BM_AttentionCausalForwardBackward)
    ->Args({2048, 32, 4, 128})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
