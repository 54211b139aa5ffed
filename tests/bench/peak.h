// The benchmarks' GFLOP/s and share-of-peak counters against the machine's fp32 peak estimate
// (core/cpu_peak.h, the figure the trainer's MFU uses too).
#pragma once

namespace benchmark { class State; }

namespace q3vl::bench {

// Registers GFLOP/s and % of the fp32 peak as benchmark counters from a per-iteration FLOP count.
void report_flops(benchmark::State& state, double flops_per_iteration);

}  // namespace q3vl::bench
