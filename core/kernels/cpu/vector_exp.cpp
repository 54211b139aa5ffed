// expf for softmax-shaped loops (vector_exp.h): AVX2+FMA intrinsics, eight lanes at a time, with a scalar
// version of the same arithmetic (std::fma) for tails and for builds without AVX2.
#include "core/kernels/cpu/vector_exp.h"

#include <algorithm>
#include <bit>
#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define Q3VL_EXP_AVX2 1
#endif

namespace q3vl::cpu {

namespace {

// exp(x) = 2^k e^r with k = floor(x log2(e) + 1/2), r = x - k ln 2 (ln 2 split in two for exactness), e^r by the
// Cephes expf polynomial. Below -87.3 the result would be denormal: it is flushed to 0 (callers add it to sums
// of at least 1, or scale a probability that small). NaN in, NaN out: a broken logit must not vanish from a loss.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kMin = -87.3f, kMax = 88.7f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_scalar(float x) {
  if (std::isnan(x)) return x;
  const float xc = std::min(std::max(x, kMin), kMax);
  const float k = std::floor(std::fma(xc, kLog2e, 0.5f));
  float r = std::fma(-k, kLn2Hi, xc);
  r = std::fma(-k, kLn2Lo, r);
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kP[i]);
  const float er = std::fma(p, r * r, r + 1.0f);
  const float two_k = std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  return x < kMin ? 0.0f : er * two_k;
}

#ifdef Q3VL_EXP_AVX2
inline __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kMin);
  // maxps/minps return their second operand when either is NaN: x goes second so a NaN propagates.
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(kMax), _mm256_max_ps(lo, x));
  const __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP[i]));
  const __m256 er = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ki = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(er, _mm256_castsi256_ps(ki));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}
#endif

constexpr int64_t kBlock = 256;

}  // namespace

double sum_exp_shifted(const float* x, int64_t n, float shift) {
  double total = 0;
  int64_t j = 0;
#ifdef Q3VL_EXP_AVX2
  const __m256 s = _mm256_set1_ps(shift);
  while (j + 8 <= n) {
    const int64_t end = std::min(n - n % 8, j + kBlock);
    __m256 acc = _mm256_setzero_ps();
    for (; j < end; j += 8) acc = _mm256_add_ps(acc, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), s)));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float block = 0;
    for (const float v : lanes) block += v;
    total += block;
  }
#endif
  float tail = 0;
  for (; j < n; ++j) tail += exp_scalar(x[j] - shift);
  return total + tail;
}

void exp_shifted_scaled(const float* x, int64_t n, float shift, float scale, float* out) {
  int64_t j = 0;
#ifdef Q3VL_EXP_AVX2
  const __m256 s = _mm256_set1_ps(shift), c = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(c, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), s))));
#endif
  for (; j < n; ++j) out[j] = scale * exp_scalar(x[j] - shift);
}

}  // namespace q3vl::cpu
