// Forward + backward of the CUDA layers that are more than one GEMM or one pass, at Qwen3-VL-30B-A3B shapes,
// bf16: the lm_head fused with the cross-entropy (151,936 words in chunks), the reference attention (text:
// causal GQA 32q/4kv x 128 over 4096 tokens; vision: 16 heads x 72 over 4 images of 1024 patches), the
// reference MoE layer (128 experts top-8, FFN 768, 4096 tokens) and AdamW over 100M parameters. These are part
// 1's reference versions (right, not yet fast: issue 15 replaces attention and the MoE); their rows say how
// far each is from the ceilings.
//
// FLOP conventions: lm_head 3 x 2*N*H*V; attention forward 4*N^2*D*Hq per document (halved when causal),
// backward 2.5x the forward; MoE 3 x (router 2*N*H*E + experts 3 x 2*N*k*H*I); AdamW counted in bytes (param,
// grad, both moments read, param and moments written, the bf16 copy written: 30 bytes per element).
#include <benchmark/benchmark.h>

#include <cmath>
#include <vector>

#include "core/device.h"
#include "core/layers/attention.h"
#include "core/layers/lm_head_loss.h"
#include "core/layers/moe.h"
#include "core/optim/adamw.h"
#include "tests/cuda/bench/gpu_bench.h"

namespace q3vl::bench {
namespace {

constexpr DType kBf16 = DType::bf16;

Tensor cu_seqlens(int64_t tokens, int64_t docs) {
  static Arena host("bench-cu-host", 1 << 16);
  host.reset();
  Tensor h = Tensor::empty(host, {docs + 1}, DType::i64);
  for (int64_t i = 0; i <= docs; ++i) h.data<int64_t>()[i] = tokens * i / docs;
  Tensor d = Tensor::empty(device_arena(), {docs + 1}, DType::i64);
  copy(d, h);
  return d;
}

void BM_LmHeadCrossEntropyFwdBwd(benchmark::State& state) {
  const int64_t n = state.range(0), h = state.range(1), v = state.range(2);
  const size_t mark = device_arena().mark();
  Tensor x = device_random({n, h}, kBf16, 1), w = device_random({v, h}, kBf16, 2, 0.02);
  Tensor labels = device_random({n}, DType::i64, 3, static_cast<double>(v));
  Tensor lse = Tensor::empty(device_arena(), {n}, DType::f32), dx = Tensor::empty(device_arena(), {n, h}, kBf16);
  Tensor dw = Tensor::zeros(device_arena(), {v, h}, DType::f32);
  Arena scratch("bench-lm-head-scratch", lm_head_cross_entropy_scratch_bytes(n, h, v, kBf16), Device::cuda);
  run_timed(state, [&] {
    int64_t count = 0;
    const double sum = lm_head_cross_entropy_forward(x, w, labels, lse, count, scratch);
    lm_head_cross_entropy_backward(x, w, labels, lse, 1.0 / static_cast<double>(count), dx, dw, scratch);
    benchmark::DoNotOptimize(sum);
  });
  report_flops(state, 3.0 * 2.0 * n * h * v);
  device_arena().release(mark);
}
BENCHMARK(BM_LmHeadCrossEntropyFwdBwd)
    ->ArgNames({"N", "H", "V"})
    ->Args({4096, 2048, 151936})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

// args {tokens, documents, Hq, Hkv, D, causal}
void BM_AttentionFwdBwd(benchmark::State& state) {
  const int64_t n = state.range(0), docs = state.range(1), hq = state.range(2), hkv = state.range(3),
                d = state.range(4);
  const bool causal = state.range(5) != 0;
  const size_t mark = device_arena().mark();
  Tensor q = device_random({n, hq, d}, kBf16, 1), k = device_random({n, hkv, d}, kBf16, 2);
  Tensor v = device_random({n, hkv, d}, kBf16, 3), dout = device_random({n, hq, d}, kBf16, 4);
  Tensor out = Tensor::empty(device_arena(), {n, hq, d}, kBf16), lse = Tensor::empty(device_arena(), {hq, n}, DType::f32);
  Tensor dq = Tensor::empty(device_arena(), {n, hq, d}, kBf16), dk = Tensor::empty(device_arena(), {n, hkv, d}, kBf16);
  Tensor dv = Tensor::empty(device_arena(), {n, hkv, d}, kBf16);
  Tensor cu = cu_seqlens(n, docs);
  Arena scratch("bench-attention-scratch", attention_backward_device_scratch_bytes(n, hq), Device::cuda);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  run_timed(state, [&] {
    attention_forward(q, k, v, cu, causal, scale, out, lse);
    attention_backward(q, k, v, out, lse, dout, cu, causal, scale, dq, dk, dv, scratch);
  });
  const double len = static_cast<double>(n) / static_cast<double>(docs);
  const double forward = 4.0 * len * len * static_cast<double>(d * hq) * static_cast<double>(docs) * (causal ? 0.5 : 1.0);
  report_flops(state, 3.5 * forward);
  device_arena().release(mark);
}
BENCHMARK(BM_AttentionFwdBwd)
    ->ArgNames({"N", "docs", "Hq", "Hkv", "D", "causal"})
    ->Args({4096, 1, 32, 4, 128, 1})
    ->Args({4096, 8, 32, 4, 128, 1})
    ->Args({4096, 4, 16, 16, 72, 0})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

void BM_MoeFwdBwd(benchmark::State& state) {
  MoeConfig cfg;
  cfg.hidden = state.range(1);
  cfg.num_experts = state.range(2);
  cfg.top_k = state.range(3);
  cfg.expert_ffn = state.range(4);
  const int64_t n = state.range(0), h = cfg.hidden, e = cfg.num_experts, i = cfg.expert_ffn;
  const size_t mark = device_arena().mark();
  MoeWeights w{device_random({e, h}, kBf16, 1, 0.05), device_random({e, h, 2 * i}, kBf16, 2, 0.02),
               device_random({e, i, h}, kBf16, 3, 0.02), Tensor()};
  MoeGradients g{Tensor::zeros(device_arena(), {e, h}, DType::f32),
                 Tensor::zeros(device_arena(), {e, h, 2 * i}, DType::f32), Tensor::zeros(device_arena(), {e, i, h}, DType::f32)};
  Tensor x = device_random({n, h}, kBf16, 4), dy = device_random({n, h}, kBf16, 5);
  Tensor y = Tensor::empty(device_arena(), {n, h}, kBf16), dx = Tensor::empty(device_arena(), {n, h}, kBf16);
  MoeStats stats;
  stats.counts = Tensor::zeros(device_arena(), {e}, DType::i64);
  stats.prob_sum = Tensor::zeros(device_arena(), {e}, DType::f64);
  Arena saved("bench-moe-saved", moe_forward_arena_bytes(cfg, n, kBf16, false, Device::cuda), Device::cuda);
  Arena scratch("bench-moe-scratch", moe_backward_scratch_bytes(cfg, n, kBf16, false, Device::cuda), Device::cuda);
  run_timed(state, [&] {
    saved.reset();
    MoeSaved s;
    moe_forward(cfg, w, x, Tensor(), saved, s, y, stats);
    moe_backward(cfg, w, x, Tensor(), s, dy, Tensor(), dx, g, scratch);
  });
  report_flops(state, 3.0 * (2.0 * n * h * e + 3.0 * 2.0 * n * cfg.top_k * h * i));
  device_arena().release(mark);
}
BENCHMARK(BM_MoeFwdBwd)
    ->ArgNames({"N", "H", "E", "k", "I"})
    ->Args({4096, 2048, 128, 8, 768})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

void BM_AdamWStep(benchmark::State& state) {
  const int64_t numel = state.range(0);
  const size_t mark = device_arena().mark();
  OptimTensor t;
  t.name = "w";
  t.param = device_random({numel}, DType::f32, 1);
  t.grad = device_random({numel}, DType::f32, 2, 0.01);
  t.param_bf16 = Tensor::empty(device_arena(), {numel}, kBf16);
  AdamW opt({t}, AdamWOptions{}, Device::cuda);
  run_timed(state, [&] { opt.step(1e-4); });
  report_bytes(state, 30.0 * static_cast<double>(numel));
  device_arena().release(mark);
}
BENCHMARK(BM_AdamWStep)->ArgNames({"params"})->Args({100000000})->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);

}  // namespace
}  // namespace q3vl::bench
