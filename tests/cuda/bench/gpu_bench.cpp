// CUDA-event timing and counters of the CUDA layer benchmarks.
#include "tests/cuda/bench/gpu_bench.h"

#include <cuda_runtime.h>

#include <vector>

#include "core/bf16.h"
#include "core/device.h"
#include "core/kernels/cuda/context.h"
#include "core/rng.h"

namespace q3vl::bench {

Arena& device_arena() {
  static Arena a("bench-device", size_t{40} << 30, Device::cuda);
  return a;
}

Tensor device_random(Shape shape, DType dtype, uint64_t seed, double scale) {
  static Arena host("bench-host", size_t{8} << 30);
  const size_t mark = host.mark();
  Tensor d = Tensor::empty(device_arena(), shape, dtype);
  if (dtype == DType::i64) {
    Tensor h = Tensor::empty(host, shape, DType::i64);
    Tensor u = Tensor::empty(host, shape, DType::f64);
    fill_uniform(u, Philox(seed), 0.0, scale);
    for (int64_t i = 0; i < h.numel(); ++i) h.data<int64_t>()[i] = static_cast<int64_t>(u.data<double>()[i]);
    copy(d, h);
  } else {
    Tensor f = Tensor::empty(host, shape, DType::f32);
    fill_uniform(f, Philox(seed), -scale, scale);
    if (dtype == DType::f32) {
      copy(d, f);
    } else {
      Tensor b = Tensor::empty(host, shape, DType::bf16);
      auto* bits = static_cast<uint16_t*>(b.raw());
      for (int64_t i = 0; i < f.numel(); ++i) bits[i] = f32_to_bf16(f.data<float>()[i]);
      copy(d, b);
    }
  }
  host.release(mark);
  return d;
}

void run_timed(benchmark::State& state, const std::function<void()>& iteration) {
  iteration();
  device_synchronize();
  cudaStream_t stream = cuda::context().stream;  // where every layer queues its work
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    iteration();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

void report_flops(benchmark::State& state, double flops) {
  const double total = flops * static_cast<double>(state.iterations());
  state.counters["TFLOP/s"] = benchmark::Counter(total / 1e12, benchmark::Counter::kIsRate);
  state.counters["ceiling%"] = benchmark::Counter(total / 1e12 / kGemmCeilingTflops * 100.0, benchmark::Counter::kIsRate);
}

void report_bytes(benchmark::State& state, double bytes) {
  const double total = bytes * static_cast<double>(state.iterations());
  state.counters["GB/s"] = benchmark::Counter(total / 1e9, benchmark::Counter::kIsRate);
  state.counters["ceiling%"] = benchmark::Counter(total / 1e12 / kCopyCeilingTBs * 100.0, benchmark::Counter::kIsRate);
}

}  // namespace q3vl::bench
