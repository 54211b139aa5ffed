// Bit-exact conversions between fp32 and the 16-bit storage formats of checkpoints: bf16 (core/bf16.h) and
// IEEE fp16.
// Widening is exact; narrowing rounds to nearest, ties to even (what torch's .to(bfloat16/float16) does),
// overflows to infinity and keeps NaN a (quiet) NaN of the same sign. Bit manipulation only, so results do
// not depend on compiler or CPU half-float support; inline so conversion loops vectorise.
#pragma once

#include <bit>
#include <cstdint>

#include "core/bf16.h"

namespace q3vl::io {

// bf16 conversion lives in core (one place for the whole project).
using q3vl::bf16_to_f32;
using q3vl::f32_to_bf16;

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return std::bit_cast<float>(sign);
  // Subnormal fp16: normalise; every fp16 subnormal is a normal fp32.
  int shift = 0;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shift;
  }
  mantissa &= 0x3ffu;
  return std::bit_cast<float>(sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  if (exponent >= -14) {
    // Normal fp16: drop 13 mantissa bits with ties-to-even; a carry moves to the next binade correctly.
    const uint32_t rebased = magnitude - (112u << 23);
    const uint32_t rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
    return static_cast<uint16_t>(sign | (rounded >> 13));
  }
  if (exponent < -25) return sign;  // below half the smallest subnormal: rounds to zero
  // Subnormal fp16: value = m * 2^-24 with m = full mantissa >> (-exponent - 1); round the dropped bits.
  const uint32_t full = (magnitude & 0x7fffffu) | 0x800000u;
  const int drop = -exponent - 1;  // 14..24
  const uint32_t kept = full >> drop;
  const uint32_t rest = full & ((1u << drop) - 1u);
  const uint32_t half = 1u << (drop - 1);
  const uint32_t rounded = kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | rounded);
}

}  // namespace q3vl::io
