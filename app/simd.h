// The instruction set this binary was compiled for (-DQ3VL_SIMD=..., cmake/simd.cmake) and the start-up check
// that the CPU has it: a binary built on a newer login node stops with a message naming the build's level, the
// CPU's and the option to rebuild with, instead of dying with SIGILL somewhere in a kernel.
//
// The check runs from a constructor before every other static initialiser of the program and before main(). It
// and everything it calls live in simd.cpp, compiled for the x86-64 baseline, and use no inline library templates
// (the linker could pick a copy of those compiled for the level): plain C strings and fixed buffers only.
// Test hook: Q3VL_SIMD_PRETEND_CPU=<level> makes the check take the CPU for one with exactly that level's
// features (tests/CMakeLists.txt shows the refusal a CPU without this build's level gets).
#pragma once

#include <cstddef>
#include <string>

namespace q3vl::app {

// A level of -DQ3VL_SIMD, lowest first; a level needs its own features and those of every level below it.
// Feature names are those of __builtin_cpu_supports.
struct SimdLevel {
  const char* name;             // SSE4, AVX2, AVX512
  const char* const* features;  // nullptr-terminated
};
inline constexpr int kSimdLevelCount = 3;
extern const SimdLevel kSimdLevels[kSimdLevelCount];

// What the compiler was allowed to emit in this build: recorded by simd_build.cpp, compiled with the level's
// flags (for native: every feature of the build host that the compiler can use).
struct SimdBuild {
  const char* option;           // the Q3VL_SIMD value: native, AVX512, AVX2, SSE4, generic
  const char* flags;            // its compiler flags, e.g. -march=native
  const char* const* features;  // nullptr-terminated
};
extern const SimdBuild kSimdBuild;

// 1 when the running CPU has the feature, 0 when not, -1 when the check does not know the name.
int cpu_supports(const char* feature);
using CpuSupports = int (*)(const char* feature);

// The highest level all of whose features `has` reports (has(f) == 1), or "generic".
const char* simd_level_of(CpuSupports has);

// Whether a CPU with `has` runs a binary built as `built`. If not, writes the message into `message` (at most
// `size` bytes with the terminating 0): the build's level and option, the CPU's level, the features it lacks and
// the -DQ3VL_SIMD to rebuild with.
bool simd_runs_on(const SimdBuild& built, CpuSupports has, char* message, std::size_t size);

// "AVX512 (-DQ3VL_SIMD=native: -march=native)": for --help and the trainer's start record.
std::string simd_summary();

}  // namespace q3vl::app
