// GFLOP/s counters against the fp32 peak estimate of the OpenMP threads the benchmarks run on.
#include "tests/bench/peak.h"

#include <benchmark/benchmark.h>
#include <omp.h>

#include "core/cpu_peak.h"

namespace q3vl::bench {

void report_flops(benchmark::State& state, double flops_per_iteration) {
  static const double peak = detect_cpu_peak(omp_get_max_threads()).gflops();
  const double total = flops_per_iteration * static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(total / 1e9, benchmark::Counter::kIsRate);
  state.counters["peak%"] = benchmark::Counter(total / 1e9 / peak * 100.0, benchmark::Counter::kIsRate);
}

}  // namespace q3vl::bench
