// bf16: the 16-bit brain-float type of the CUDA backend's weights and activations, as a host type (2 bytes,
// the upper half of an fp32), with the one fp32 <-> bf16 conversion of the project. Widening is exact;
// narrowing rounds to nearest, ties to even (torch's .to(bfloat16)), overflows to infinity and keeps NaN a
// quiet NaN of the same sign. Bit manipulation only, so the result does not depend on the CPU or compiler.
// Device code uses CUDA's __nv_bfloat16, which has the same bits and rounding.
#pragma once

#include <bit>
#include <cstdint>

#include "core/dtype.h"

namespace q3vl {

inline float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  // Adding 0x7fff plus the lowest kept bit rounds to nearest with ties to even; a carry into the exponent
  // is the correct rounding up (to the next binade or to infinity).
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float f) : bits(f32_to_bf16(f)) {}
  explicit operator float() const { return bf16_to_f32(bits); }
};
static_assert(sizeof(bf16) == 2);

template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }

// The value a float takes after a round trip through bf16 (what a bf16 tensor can hold).
inline float round_to_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

}  // namespace q3vl
