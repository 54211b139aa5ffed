// Shared pieces of the CUDA layer benchmarks (q3vl_cuda_bench): a device arena, random bf16/f32 device
// tensors, CUDA-event timing of one iteration (Google Benchmark's manual time), and the counters every row
// reports: TFLOP/s or GB/s and the share of the ceilings measured on the H200 (../shared/GPU.md: 798 TFLOP/s
// bf16 GEMM, 4.27 TB/s device copy).
#pragma once

#include <benchmark/benchmark.h>

#include <functional>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl::bench {

constexpr double kGemmCeilingTflops = 798.0;
constexpr double kCopyCeilingTBs = 4.27;

Arena& device_arena();
// Device tensor of `dtype` (f32 or bf16) uniform in [-scale, scale); i64 tensors get values in [0, scale).
Tensor device_random(Shape shape, DType dtype, uint64_t seed, double scale = 1.0);

// Runs `iteration` once for warm-up, then times every benchmark iteration with CUDA events on the backend's
// stream and reports it as the iteration's manual time.
void run_timed(benchmark::State& state, const std::function<void()>& iteration);

// Counters from per-iteration work: TFLOP/s and % of the GEMM ceiling; GB/s and % of the copy ceiling.
void report_flops(benchmark::State& state, double flops);
void report_bytes(benchmark::State& state, double bytes);

}  // namespace q3vl::bench
