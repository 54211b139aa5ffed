// fp32 peak estimate from /proc/cpuinfo's clock and vector flags (see cpu_peak.h).
#include "core/cpu_peak.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace q3vl {

CpuPeak detect_cpu_peak(int threads) {
  CpuPeak p;
  p.threads = threads;
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  bool avx2 = false, fma = false, avx512 = false;
  while (std::getline(in, line)) {
    if (p.ghz == 0.0 && line.rfind("cpu MHz", 0) == 0)
      p.ghz = std::strtod(line.c_str() + line.find(':') + 1, nullptr) / 1000.0;
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
  if (avx512) {
    p.flops_per_cycle = 64;
    p.isa = "AVX-512";
  } else if (avx2 && fma) {
    p.flops_per_cycle = 32;
    p.isa = "AVX2+FMA";
  } else {
    p.flops_per_cycle = 8;
    p.isa = "SSE";
  }
  return p;
}

std::string CpuPeak::describe() const {
  std::ostringstream os;
  os << threads << (threads == 1 ? " thread x " : " threads x ") << ghz << " GHz x " << flops_per_cycle
     << " FLOP/cycle, " << isa;
  return os.str();
}

}  // namespace q3vl
