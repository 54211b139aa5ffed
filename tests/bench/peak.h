// The machine's fp32 peak estimate used to report each benchmark's share of peak: cores (OpenMP threads)
// x clock x FLOPs per cycle per core, where FLOPs/cycle comes from the widest FMA the CPU reports
// (AVX-512: 2 units x 16 lanes x 2; AVX2+FMA: 2 x 8 x 2; else SSE: 2 x 4 x 2). The clock is the one
// /proc/cpuinfo reports (base clock under a hypervisor), so real boost clocks can exceed 100% slightly.
#pragma once

#include <string>

namespace q3vl::bench {

struct Peak {
  int threads;
  double ghz;
  int flops_per_cycle;
  double gflops() const { return threads * ghz * flops_per_cycle; }
  std::string describe() const;
};

Peak fp32_peak();

// Registers GFLOP/s and % of the fp32 peak as benchmark counters from a per-iteration FLOP count.
}  // namespace q3vl::bench

namespace benchmark { class State; }
namespace q3vl::bench {
void report_flops(benchmark::State& state, double flops_per_iteration);
}  // namespace q3vl::bench
