// The record of what this build's compiler flags let the compiler emit. Compiled with the level's flags like
// every other file, so the predefined ISA macros say exactly that. The record is data only (constant-initialised,
// no code), because the baseline-compiled start-up check (simd.cpp) reads it before it knows the CPU can run
// this build; simd_summary() here runs only after that check.
// The names are those of __builtin_cpu_supports; keep them in step with cpu_supports() in simd.cpp
// (SimdTest.TheCheckKnowsEveryRecordedFeature).
#include "app/simd.h"

#include <cstring>

namespace q3vl::app {
namespace {

constinit const char* const kBuiltFeatures[] = {
#ifdef __SSE3__
    "sse3",
#endif
#ifdef __SSSE3__
    "ssse3",
#endif
#ifdef __SSE4_1__
    "sse4.1",
#endif
#ifdef __SSE4_2__
    "sse4.2",
#endif
#ifdef __POPCNT__
    "popcnt",
#endif
#ifdef __SSE4A__
    "sse4a",
#endif
#ifdef __AVX__
    "avx",
#endif
#ifdef __AVX2__
    "avx2",
#endif
#ifdef __BMI__
    "bmi",
#endif
#ifdef __BMI2__
    "bmi2",
#endif
#ifdef __F16C__
    "f16c",
#endif
#ifdef __FMA__
    "fma",
#endif
#ifdef __FMA4__
    "fma4",
#endif
#ifdef __XOP__
    "xop",
#endif
#ifdef __LZCNT__
    "lzcnt",
#endif
#ifdef __MOVBE__
    "movbe",
#endif
#ifdef __AES__
    "aes",
#endif
#ifdef __PCLMUL__
    "pclmul",
#endif
#ifdef __SHA__
    "sha",
#endif
#ifdef __GFNI__
    "gfni",
#endif
#ifdef __VAES__
    "vaes",
#endif
#ifdef __VPCLMULQDQ__
    "vpclmulqdq",
#endif
#ifdef __AVXVNNI__
    "avxvnni",
#endif
#ifdef __AVX512F__
    "avx512f",
#endif
#ifdef __AVX512BW__
    "avx512bw",
#endif
#ifdef __AVX512CD__
    "avx512cd",
#endif
#ifdef __AVX512DQ__
    "avx512dq",
#endif
#ifdef __AVX512VL__
    "avx512vl",
#endif
#ifdef __AVX512IFMA__
    "avx512ifma",
#endif
#ifdef __AVX512VBMI__
    "avx512vbmi",
#endif
#ifdef __AVX512VBMI2__
    "avx512vbmi2",
#endif
#ifdef __AVX512VNNI__
    "avx512vnni",
#endif
#ifdef __AVX512BITALG__
    "avx512bitalg",
#endif
#ifdef __AVX512VPOPCNTDQ__
    "avx512vpopcntdq",
#endif
#ifdef __AVX512BF16__
    "avx512bf16",
#endif
#ifdef __AVX512FP16__
    "avx512fp16",
#endif
    nullptr};

int built_supports(const char* feature) {
  for (const char* const* f = kBuiltFeatures; *f; ++f)
    if (std::strcmp(*f, feature) == 0) return 1;
  return 0;
}

}  // namespace

// Q3VL_SIMD_OPTION and Q3VL_SIMD_FLAGS come from cmake/simd.cmake (this file's compile definitions).
extern constinit const SimdBuild kSimdBuild{Q3VL_SIMD_OPTION, Q3VL_SIMD_FLAGS, kBuiltFeatures};

std::string simd_summary() {
  return std::string(simd_level_of(built_supports)) + " (-DQ3VL_SIMD=" + kSimdBuild.option + ": " + kSimdBuild.flags +
         ")";
}

}  // namespace q3vl::app
