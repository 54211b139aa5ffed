// Deterministic random numbers: Philox4x32-10 (Salmon et al., SC'11), the counter-based generator cuRAND
// and PyTorch's CUDA backend also use. Output k of a stream is a pure function of (seed, stream, k), so
// filling a tensor gives the same values whatever the thread count or rank layout, and resuming needs only
// the counter. Uniforms use the top 24 bits (floats in [0,1)); normals use Box-Muller on pairs.
#pragma once

#include <array>
#include <cstdint>

#include "core/tensor.h"

namespace q3vl {

class Philox {
 public:
  Philox(uint64_t seed, uint64_t stream = 0) : seed_(seed), stream_(stream) {}

  // The 4 x 32 random bits of block `counter`.
  std::array<uint32_t, 4> block(uint64_t counter) const;
  // Element k of the uniform [0,1) sequence and of the standard-normal sequence.
  double uniform(uint64_t k) const;
  double normal(uint64_t k) const;

  uint64_t seed() const { return seed_; }
  uint64_t stream() const { return stream_; }

 private:
  uint64_t seed_;
  uint64_t stream_;
};

// Fill a contiguous f32/f64 tensor; element i takes sequence value `offset + i`.
void fill_uniform(const Tensor& t, const Philox& rng, double lo, double hi, uint64_t offset = 0);
void fill_normal(const Tensor& t, const Philox& rng, double mean, double std, uint64_t offset = 0);

}  // namespace q3vl
