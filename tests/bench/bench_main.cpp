// Benchmark main: prints the fp32 peak estimate before running the registered benchmarks.
#include <benchmark/benchmark.h>

#include <iostream>

#include "tests/bench/peak.h"

int main(int argc, char** argv) {
  std::cout << q3vl::bench::fp32_peak().describe() << std::endl;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
