// Overflow-checked arithmetic on sizes read from files (grids, shapes, counts).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>

namespace q3vl {

// Products and sums of sizes read from files go through these: a wrapped int64 product can land on a plausible
// size (a grid [2^62+1, 6, 8] wraps to 48 patches) and pass every later consistency check. nullopt on overflow.
inline std::optional<int64_t> checked_product(std::initializer_list<int64_t> factors) {
  int64_t p = 1;
  for (const int64_t f : factors)
    if (__builtin_mul_overflow(p, f, &p)) return std::nullopt;
  return p;
}
inline std::optional<int64_t> checked_sum(int64_t a, int64_t b) {
  int64_t s = 0;
  if (__builtin_add_overflow(a, b, &s)) return std::nullopt;
  return s;
}

}  // namespace q3vl
