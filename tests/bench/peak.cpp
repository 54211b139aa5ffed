// fp32 peak estimate from /proc/cpuinfo and the OpenMP thread count, and the GFLOP/s counters.
#include "tests/bench/peak.h"

#include <benchmark/benchmark.h>
#include <omp.h>

#include <fstream>
#include <sstream>

namespace q3vl::bench {

Peak fp32_peak() {
  Peak p{omp_get_max_threads(), 0.0, 8};
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  bool avx2 = false, fma = false, avx512 = false;
  while (std::getline(in, line)) {
    if (p.ghz == 0.0 && line.rfind("cpu MHz", 0) == 0) p.ghz = std::stod(line.substr(line.find(':') + 1)) / 1000.0;
    if (line.rfind("flags", 0) == 0) {
      std::istringstream fl(line.substr(line.find(':') + 1));
      std::string f;
      while (fl >> f) {
        avx2 |= f == "avx2";
        fma |= f == "fma";
        avx512 |= f == "avx512f";
      }
      break;
    }
  }
  p.flops_per_cycle = avx512 ? 64 : (avx2 && fma) ? 32 : 8;
  return p;
}

std::string Peak::describe() const {
  std::ostringstream os;
  os << "fp32 peak estimate: " << threads << " threads x " << ghz << " GHz x " << flops_per_cycle
     << " FLOP/cycle = " << gflops() << " GFLOP/s";
  return os.str();
}

void report_flops(benchmark::State& state, double flops_per_iteration) {
  static const double peak = fp32_peak().gflops();
  const double total = flops_per_iteration * static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(total / 1e9, benchmark::Counter::kIsRate);
  state.counters["peak%"] = benchmark::Counter(total / 1e9 / peak * 100.0, benchmark::Counter::kIsRate);
}

}  // namespace q3vl::bench
