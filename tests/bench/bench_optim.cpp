// AdamW step and gradient sum of squares over 64M fp32 parameters, as memory bandwidth: the step reads p, g,
// m, v and writes p, m, v (28 bytes per parameter), the norm reads g (4 bytes). A plain loop with the
// step's traffic and no arithmetic to speak of gives the bandwidth this machine reaches, the roofline.
#include <benchmark/benchmark.h>

#include <cstdint>

#include "core/arena.h"
#include "core/optim/adamw.h"
#include "core/rng.h"

namespace {

using namespace q3vl;

void report_bandwidth(benchmark::State& state, double bytes_per_iteration) {
  state.counters["GB/s"] = benchmark::Counter(bytes_per_iteration * double(state.iterations()) / 1e9,
                                              benchmark::Counter::kIsRate);
}

struct Parameters {
  Arena arena;
  Tensor p, g;
  explicit Parameters(int64_t n)
      : arena("bench_optim", 2 * Arena::aligned(size_t(n) * sizeof(float))),
        p(Tensor::empty(arena, {n}, DType::f32)),
        g(Tensor::empty(arena, {n}, DType::f32)) {
    fill_uniform(p, Philox(1), -0.02, 0.02);
    fill_uniform(g, Philox(2), -1, 1);
  }
};

void BM_AdamWStep(benchmark::State& state) {
  const int64_t n = state.range(0);
  Parameters w(n);
  AdamW adamw({{"w", w.p, w.g, true, 1.0, false}}, AdamWOptions{});
  for (auto _ : state) {
    adamw.step(1e-4, 0.5);
    benchmark::DoNotOptimize(w.p.raw());
  }
  report_bandwidth(state, 28.0 * double(n));
}
BENCHMARK(BM_AdamWStep)->Arg(int64_t(64) << 20)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_GradientSumOfSquares(benchmark::State& state) {
  const int64_t n = state.range(0);
  Parameters w(n);
  const std::vector<OptimTensor> tensors = {{"w", w.p, w.g, true, 1.0, false}};
  for (auto _ : state) benchmark::DoNotOptimize(gradient_sum_of_squares(tensors));
  report_bandwidth(state, 4.0 * double(n));
}
BENCHMARK(BM_GradientSumOfSquares)->Arg(int64_t(64) << 20)->Unit(benchmark::kMillisecond)->UseRealTime();

// Reads four arrays, writes three: the AdamW step's memory traffic without its arithmetic.
void BM_RooflineSameTraffic(benchmark::State& state) {
  const int64_t n = state.range(0);
  Parameters w(n);
  Arena moments("bench_optim_moments", 2 * Arena::aligned(size_t(n) * sizeof(float)));
  float* m = static_cast<float*>(Tensor::zeros(moments, {n}, DType::f32).raw());
  float* v = static_cast<float*>(Tensor::zeros(moments, {n}, DType::f32).raw());
  float* p = w.p.data<float>();
  const float* g = w.g.data<float>();
  for (auto _ : state) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      m[i] += g[i];
      v[i] += g[i];
      p[i] += g[i];
    }
    benchmark::DoNotOptimize(p);
  }
  report_bandwidth(state, 28.0 * double(n));
}
BENCHMARK(BM_RooflineSameTraffic)->Arg(int64_t(64) << 20)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
