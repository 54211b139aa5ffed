// Benchmark main: prints the fp32 peak estimate before running the registered benchmarks.
#include <benchmark/benchmark.h>

#include <omp.h>

#include <iostream>

#include "core/cpu_peak.h"

int main(int argc, char** argv) {
  const q3vl::CpuPeak peak = q3vl::detect_cpu_peak(omp_get_max_threads());
  std::cout << "fp32 peak estimate: " << peak.gflops() << " GFLOP/s (" << peak.describe() << ")" << std::endl;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
