// The start-up instruction-set check (app/simd.h): which CPUs run which builds and the message the others get,
// that the check knows every feature this build records, and the fp32 peak estimate behind the MFU.
#include <gtest/gtest.h>

#include <omp.h>

#include <cstring>
#include <string>
#include <vector>

#include "app/simd.h"
#include "core/cpu_peak.h"

namespace q3vl::app {
namespace {

// A pretend CPU: the features in g_cpu.
std::vector<std::string> g_cpu;
int pretend_cpu(const char* feature) {
  for (const std::string& f : g_cpu)
    if (f == feature) return 1;
  return 0;
}

const std::vector<std::string> kSse4 = {"sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"};
const std::vector<std::string> kAvx2 = {"avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe"};
const std::vector<std::string> kAvx512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"};

std::vector<std::string> join(std::initializer_list<std::vector<std::string>> parts) {
  std::vector<std::string> all;
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

// Whether a build recording `features` runs on g_cpu, and the message if not.
struct Verdict {
  bool runs;
  std::string message;
};
Verdict check(const char* option, const char* flags, const std::vector<std::string>& features) {
  std::vector<const char*> list;
  for (const std::string& f : features) list.push_back(f.c_str());
  list.push_back(nullptr);
  char message[2048] = "";
  const bool runs = simd_runs_on(SimdBuild{option, flags, list.data()}, pretend_cpu, message, sizeof message);
  return {runs, message};
}

TEST(SimdTest, AnAvx512BuildOnAnAvx2CpuNamesBothAndTheOptionToRebuildWith) {
  g_cpu = join({kSse4, kAvx2});
  const Verdict v = check("AVX512", "-march=x86-64-v4", join({kSse4, kAvx2, kAvx512}));
  EXPECT_FALSE(v.runs);
  EXPECT_EQ(v.message,
            "this binary was built for AVX512 (-DQ3VL_SIMD=AVX512: -march=x86-64-v4) but this CPU supports only AVX2 "
            "(it lacks avx512f avx512bw avx512cd avx512dq avx512vl); rebuild with -DQ3VL_SIMD=AVX2");
}

TEST(SimdTest, LowerLevelsRunOnHigherCpus) {
  g_cpu = join({kSse4, kAvx2, kAvx512});
  EXPECT_EQ(simd_level_of(pretend_cpu), std::string("AVX512"));
  EXPECT_TRUE(check("AVX512", "-march=x86-64-v4", join({kSse4, kAvx2, kAvx512})).runs);
  EXPECT_TRUE(check("AVX2", "-march=x86-64-v3", join({kSse4, kAvx2})).runs);
  EXPECT_TRUE(check("generic", "the compiler's default target", {}).runs);
  g_cpu = {};
  EXPECT_EQ(simd_level_of(pretend_cpu), std::string("generic"));
  EXPECT_TRUE(check("generic", "the compiler's default target", {}).runs);
}

// A native build on a newer AVX-512 host (VNNI, FP16) refuses an older AVX-512 CPU that lacks those extras,
// which a check of the level alone would let through to SIGILL.
TEST(SimdTest, ANativeBuildNeedsTheBuildHostsExtrasToo) {
  g_cpu = join({kSse4, kAvx2, kAvx512, {"avx512vnni"}});
  const Verdict v = check("native", "-march=native", join({kSse4, kAvx2, kAvx512, {"avx512vnni", "avx512fp16"}}));
  EXPECT_FALSE(v.runs);
  EXPECT_EQ(v.message,
            "this binary was built for AVX512 and 2 more features of the build host "
            "(-DQ3VL_SIMD=native: -march=native) but this CPU supports only AVX512 (it lacks avx512fp16); "
            "rebuild with -DQ3VL_SIMD=AVX512");
}

TEST(SimdTest, TheMessageIsCutToTheBuffer) {
  g_cpu = {};
  std::vector<const char*> list = {"avx2", nullptr};
  char message[16];
  EXPECT_FALSE(simd_runs_on(SimdBuild{"AVX2", "-march=x86-64-v3", list.data()}, pretend_cpu, message, sizeof message));
  EXPECT_EQ(std::string(message), "this binary was");
}

// Every feature this build records, and every level's, is one the check can ask the CPU about (a name it did not
// know would read as missing and refuse every CPU).
TEST(SimdTest, TheCheckKnowsEveryRecordedFeature) {
#if defined(__x86_64__)
  for (const char* const* f = kSimdBuild.features; *f; ++f) EXPECT_NE(cpu_supports(*f), -1) << *f;
  for (const SimdLevel& level : kSimdLevels)
    for (const char* const* f = level.features; *f; ++f) EXPECT_NE(cpu_supports(*f), -1) << *f;
#else
  GTEST_SKIP() << "the check looks up x86 features only";
#endif
}

TEST(SimdTest, ThisCpuRunsThisBuild) {
  char message[2048] = "";
  EXPECT_TRUE(simd_runs_on(kSimdBuild, cpu_supports, message, sizeof message)) << message;
  EXPECT_NE(simd_summary().find("(-DQ3VL_SIMD=" + std::string(kSimdBuild.option) + ": "), std::string::npos)
      << simd_summary();
}

TEST(CpuPeakTest, ThreadsTimesClockTimesVectorFlops) {
  const CpuPeak p = detect_cpu_peak(3);
  EXPECT_EQ(p.threads, 3);
  EXPECT_TRUE(p.flops_per_cycle == 8 || p.flops_per_cycle == 32 || p.flops_per_cycle == 64) << p.flops_per_cycle;
  EXPECT_DOUBLE_EQ(p.gflops(), 3 * p.ghz * p.flops_per_cycle);
#if defined(__x86_64__) && defined(__linux__)
  EXPECT_GT(p.ghz, 0.1) << "/proc/cpuinfo gives the clock on x86 Linux";
#endif
  EXPECT_NE(p.describe().find("3 threads x "), std::string::npos) << p.describe();
}

}  // namespace
}  // namespace q3vl::app
