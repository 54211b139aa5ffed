// Vectorisable float exponentials for the softmax-shaped loops (cross-entropy over a 151,936-word vocabulary
// spends most of its time in exp): a Cephes-style expf (range reduction by ln 2, degree-6 polynomial) that the
// compiler turns into SIMD code, unlike calls to libm's exp.
#pragma once

#include <cstdint>

namespace q3vl::cpu {

// Sum over j < n of exp(x[j] - shift), exp in f32 (within 2 ulp of the exact value; 0 below e^-87.3), summed
// in f32 over blocks of 256 and the blocks in f64. Deterministic (fixed order for a given build).
double sum_exp_shifted(const float* x, int64_t n, float shift);

// out[j] = scale * exp(x[j] - shift) for j < n (out may alias x).
void exp_shifted_scaled(const float* x, int64_t n, float shift, float scale, float* out);

}  // namespace q3vl::cpu
