// Benchmark main of q3vl_cuda_bench: names the device first, or says why there is none and runs nothing.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <iostream>

#include "core/device.h"

int main(int argc, char** argv) {
  if (q3vl::cuda_device_count() == 0) {
    std::cout << "q3vl_cuda_bench: no CUDA device (" << q3vl::cuda_unavailable_reason() << "); nothing to run\n";
    return 0;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::cout << "device: " << prop.name << ", " << prop.multiProcessorCount << " SMs, "
            << prop.totalGlobalMem / (1 << 20) << " MiB\n";
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
