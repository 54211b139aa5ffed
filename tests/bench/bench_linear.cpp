// Linear 2048x2048 over 4096 tokens, forward + backward (dx, dw, db): 3 GEMMs of 2*N*in*out FLOPs.
#include <benchmark/benchmark.h>

#include "core/arena.h"
#include "core/layers/linear.h"
#include "core/rng.h"
#include "tests/bench/peak.h"

namespace {

void BM_LinearForwardBackward(benchmark::State& state) {
  const int64_t n = state.range(0), in = state.range(1), out = state.range(2);
  using namespace q3vl;
  Arena arena("bench", size_t(4) * (2 * n * in + 2 * n * out + 2 * in * out + 2 * out) + 64 * 16);
  Tensor x = Tensor::empty(arena, {n, in}, DType::f32), w = Tensor::empty(arena, {out, in}, DType::f32);
  Tensor b = Tensor::zeros(arena, {out}, DType::f32), y = Tensor::empty(arena, {n, out}, DType::f32);
  Tensor dy = Tensor::empty(arena, {n, out}, DType::f32), dx = Tensor::empty(arena, {n, in}, DType::f32);
  Tensor dw = Tensor::zeros(arena, {out, in}, DType::f32), db = Tensor::zeros(arena, {out}, DType::f32);
  fill_uniform(x, Philox(1), -1, 1);
  fill_uniform(w, Philox(2), -0.02, 0.02);
  fill_uniform(dy, Philox(3), -1, 1);
  for (auto _ : state) {
    linear_forward(x, w, b, y);
    linear_backward(x, w, dy, dx, dw, db);
    benchmark::DoNotOptimize(dx.raw());
  }
  bench::report_flops(state, 3.0 * 2.0 * double(n) * in * out);
}
BENCHMARK(BM_LinearForwardBackward)->Args({4096, 2048, 2048})->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
