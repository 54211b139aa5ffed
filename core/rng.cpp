// Philox4x32-10 and tensor fills built on it.
#include "core/rng.h"

#include <cmath>
#include <numbers>

namespace q3vl {

std::array<uint32_t, 4> Philox::block(uint64_t counter) const {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream_), c3 = static_cast<uint32_t>(stream_ >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed_), k1 = static_cast<uint32_t>(seed_ >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(p1);
    c2 = n2;
    c3 = static_cast<uint32_t>(p0);
    k0 += kW0;
    k1 += kW1;
  }
  return {c0, c1, c2, c3};
}

double Philox::uniform(uint64_t k) const {
  const uint32_t bits = block(k / 4)[k % 4];
  return static_cast<double>(bits >> 8) * (1.0 / 16777216.0);
}

double Philox::normal(uint64_t k) const {
  // Pair (2j, 2j+1) shares one Box-Muller draw; u1 is shifted into (0,1] so log() is finite.
  const uint64_t pair = k / 2;
  const auto b = block(pair / 2);
  const int lane = static_cast<int>(pair % 2) * 2;
  const double u1 = (static_cast<double>(b[lane] >> 8) + 1.0) * (1.0 / 16777216.0);
  const double u2 = static_cast<double>(b[lane + 1] >> 8) * (1.0 / 16777216.0);
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double a = 2.0 * std::numbers::pi * u2;
  return (k % 2 == 0) ? r * std::cos(a) : r * std::sin(a);
}

namespace {
template <class F>
void fill_with(const Tensor& t, const char* what, F&& value) {
  Q3VL_CHECK(t.is_contiguous(), what, ": tensor ", t.str(), " is not contiguous");
  const int64_t n = t.numel();
  if (t.dtype() == DType::f32) {
    float* p = t.data<float>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(value(i));
  } else if (t.dtype() == DType::f64) {
    double* p = t.data<double>();
    for (int64_t i = 0; i < n; ++i) p[i] = value(i);
  } else {
    Q3VL_FAIL(what, ": unsupported dtype for ", t.str());
  }
}
}  // namespace

void fill_uniform(const Tensor& t, const Philox& rng, double lo, double hi, uint64_t offset) {
  fill_with(t, "fill_uniform", [&](int64_t i) { return lo + (hi - lo) * rng.uniform(offset + i); });
}

void fill_normal(const Tensor& t, const Philox& rng, double mean, double std, uint64_t offset) {
  fill_with(t, "fill_normal", [&](int64_t i) { return mean + std * rng.normal(offset + i); });
}

}  // namespace q3vl
