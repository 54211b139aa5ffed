// The start-up instruction-set check (see simd.h). Compiled for the x86-64 baseline (cmake/simd.cmake), so it
// runs on any x86-64 CPU whatever level the rest of the program was built for.
#include "app/simd.h"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace q3vl::app {
namespace {

constinit const char* const kSse4[] = {"sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", nullptr};
constinit const char* const kAvx2[] = {"avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe", nullptr};
constinit const char* const kAvx512[] = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", nullptr};

bool listed(const char* const* list, const char* name) {
  for (; *list; ++list)
    if (std::strcmp(*list, name) == 0) return true;
  return false;
}

// Whether a level's features and those of the levels below it are all there.
bool has_level(int level, CpuSupports has) {
  for (int l = 0; l <= level; ++l)
    for (const char* const* f = kSimdLevels[l].features; *f; ++f)
      if (has(*f) != 1) return false;
  return true;
}

// Whether a level lists the feature (or a level below it does).
bool in_level(int level, const char* feature) {
  for (int l = 0; l <= level; ++l)
    if (listed(kSimdLevels[l].features, feature)) return true;
  return false;
}

// Whether a feature list holds a level's features and those of the levels below it.
bool levels_listed(int level, const char* const* features) {
  for (int l = 0; l <= level; ++l)
    for (const char* const* f = kSimdLevels[l].features; *f; ++f)
      if (!listed(features, *f)) return false;
  return true;
}

// Appends to a fixed buffer, truncating (snprintf semantics) once it is full.
struct Writer {
  char* buffer;
  std::size_t size;
  std::size_t used = 0;
  void add(const char* format, ...) __attribute__((format(printf, 2, 3))) {
    if (used + 1 >= size) return;
    va_list args;
    va_start(args, format);
    const int n = std::vsnprintf(buffer + used, size - used, format, args);
    va_end(args);
    if (n > 0) used = used + static_cast<std::size_t>(n) < size ? used + static_cast<std::size_t>(n) : size - 1;
  }
};

int level_index(const char* name) {
  for (int l = 0; l < kSimdLevelCount; ++l)
    if (std::strcmp(kSimdLevels[l].name, name) == 0) return l;
  return -1;
}

// The test hook (simd.h): a CPU with exactly the named level's features.
const char* g_pretend_level = nullptr;
int pretend_supports(const char* feature) {
  const int level = level_index(g_pretend_level);
  return level >= 0 && in_level(level, feature) ? 1 : 0;
}

// Runs before the program's other static initialisers, which are compiled for the level and may already use it.
__attribute__((constructor(101))) void check_the_cpu_first() {
  CpuSupports has = cpu_supports;
  if (const char* pretend = std::getenv("Q3VL_SIMD_PRETEND_CPU")) {
    g_pretend_level = pretend;
    has = pretend_supports;
  }
  char message[2048];
  if (simd_runs_on(kSimdBuild, has, message, sizeof message)) return;
  std::fprintf(stderr, "q3vl: %s\n", message);
  std::fflush(stderr);
  std::_Exit(1);
}

}  // namespace

const SimdLevel kSimdLevels[kSimdLevelCount] = {{"SSE4", kSse4}, {"AVX2", kAvx2}, {"AVX512", kAvx512}};

#if defined(__x86_64__)
#define Q3VL_CPU_FEATURE(name) \
  if (std::strcmp(feature, name) == 0) return __builtin_cpu_supports(name) ? 1 : 0;
int cpu_supports(const char* feature) {
  __builtin_cpu_init();  // the check runs before libgcc's own constructor has read the CPU's features
  Q3VL_CPU_FEATURE("sse3") Q3VL_CPU_FEATURE("ssse3") Q3VL_CPU_FEATURE("sse4.1") Q3VL_CPU_FEATURE("sse4.2")
  Q3VL_CPU_FEATURE("popcnt") Q3VL_CPU_FEATURE("sse4a") Q3VL_CPU_FEATURE("avx") Q3VL_CPU_FEATURE("avx2")
  Q3VL_CPU_FEATURE("bmi") Q3VL_CPU_FEATURE("bmi2") Q3VL_CPU_FEATURE("f16c") Q3VL_CPU_FEATURE("fma")
  Q3VL_CPU_FEATURE("fma4") Q3VL_CPU_FEATURE("xop") Q3VL_CPU_FEATURE("lzcnt") Q3VL_CPU_FEATURE("movbe")
  Q3VL_CPU_FEATURE("aes") Q3VL_CPU_FEATURE("pclmul") Q3VL_CPU_FEATURE("sha") Q3VL_CPU_FEATURE("gfni")
  Q3VL_CPU_FEATURE("vaes") Q3VL_CPU_FEATURE("vpclmulqdq") Q3VL_CPU_FEATURE("avxvnni")
  Q3VL_CPU_FEATURE("avx512f") Q3VL_CPU_FEATURE("avx512bw") Q3VL_CPU_FEATURE("avx512cd")
  Q3VL_CPU_FEATURE("avx512dq") Q3VL_CPU_FEATURE("avx512vl") Q3VL_CPU_FEATURE("avx512ifma")
  Q3VL_CPU_FEATURE("avx512vbmi") Q3VL_CPU_FEATURE("avx512vbmi2") Q3VL_CPU_FEATURE("avx512vnni")
  Q3VL_CPU_FEATURE("avx512bitalg") Q3VL_CPU_FEATURE("avx512vpopcntdq") Q3VL_CPU_FEATURE("avx512bf16")
  Q3VL_CPU_FEATURE("avx512fp16")
  return -1;
}
#undef Q3VL_CPU_FEATURE
#else
// Other architectures record no x86 features (simd_build.cpp), so there is nothing to look up.
int cpu_supports(const char*) { return -1; }
#endif

const char* simd_level_of(CpuSupports has) {
  for (int l = kSimdLevelCount - 1; l >= 0; --l)
    if (has_level(l, has)) return kSimdLevels[l].name;
  return "generic";
}

bool simd_runs_on(const SimdBuild& built, CpuSupports has, char* message, std::size_t size) {
  int missing = 0;
  for (const char* const* f = built.features; *f; ++f) missing += has(*f) != 1;
  if (missing == 0) return true;
  // The build's level, and how many features of the build host a native build has beyond it.
  int level = kSimdLevelCount - 1;
  while (level >= 0 && !levels_listed(level, built.features)) --level;
  int extra = 0;
  for (const char* const* f = built.features; *f; ++f) extra += level < 0 || !in_level(level, *f);
  const char* cpu_level = simd_level_of(has);
  Writer w{message, size};
  w.add("this binary was built for %s", level < 0 ? "generic" : kSimdLevels[level].name);
  if (extra > 0) w.add(" and %d more features of the build host", extra);
  w.add(" (-DQ3VL_SIMD=%s: %s) but this CPU supports only %s (it lacks", built.option, built.flags, cpu_level);
  for (const char* const* f = built.features; *f; ++f)
    if (has(*f) != 1) w.add(" %s", *f);
  w.add("); rebuild with -DQ3VL_SIMD=%s", cpu_level);
  return false;
}

}  // namespace q3vl::app
