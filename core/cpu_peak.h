// The CPU's fp32 peak estimate behind the benchmarks' share of peak and the trainer's MFU: threads x clock x
// FLOPs per cycle per core, where FLOPs/cycle assumes two FMA units of the widest vector the CPU reports
// (AVX-512: 2 units x 16 lanes x 2; AVX2+FMA: 2 x 8 x 2; else SSE: 2 x 4 mul/add). The clock is the one
// /proc/cpuinfo reports (the base clock under a hypervisor), so boost clocks can exceed 100% slightly, and a CPU
// with one AVX-512 FMA unit reaches only half. A config can override it (logging.peak_gflops).
#pragma once

#include <string>

namespace q3vl {

struct CpuPeak {
  int threads = 0;
  double ghz = 0.0;          // 0 when /proc/cpuinfo gives no clock (then there is no estimate)
  int flops_per_cycle = 0;
  const char* isa = "";      // AVX-512, AVX2+FMA or SSE
  double gflops() const { return threads * ghz * flops_per_cycle; }
  // "2 threads x 2.445 GHz x 32 FLOP/cycle, AVX2+FMA"
  std::string describe() const;
};

// The estimate for `threads` cores (the trainer and the benchmarks pass their OpenMP thread count).
CpuPeak detect_cpu_peak(int threads);

}  // namespace q3vl
