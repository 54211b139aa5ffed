// Support for the CUDA layer tests (binary q3vl_cuda_tests, CTest label gpu): the skip rule, host and device
// arenas reset before each test, fresh random inputs, poisoned outputs, bf16 rounding and the relative error
// every check uses.
//
// Checks compare a CUDA layer with its CPU twin (the reference) on the same inputs: in f32 mode within 1e-5
// relative (fp32 arithmetic in another order: ~1e-7 per operation, sums of up to a few thousand terms), in
// bf16 mode within 1e-2 relative against the CPU run in f32 on the same bf16-rounded inputs (the device
// rounds its bf16 outputs, 2^-9 relative each, and its intermediates). NaN anywhere fails.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl::test {

// Skips the test when no CUDA device is usable (the reason named), or fails it when Q3VL_REQUIRE_GPU=1.
#define Q3VL_REQUIRE_GPU()                                                     \
  do {                                                                         \
    const std::string q3vl_why_ = ::q3vl::test::gpu_missing_reason();          \
    if (!q3vl_why_.empty()) {                                                  \
      if (::q3vl::test::gpu_required()) FAIL() << "Q3VL_REQUIRE_GPU=1 but " << q3vl_why_; \
      GTEST_SKIP() << q3vl_why_;                                               \
    }                                                                          \
  } while (0)

std::string gpu_missing_reason();  // empty when a device is usable
bool gpu_required();               // Q3VL_REQUIRE_GPU=1

// Arenas reset before every test: host (2 GiB, pages committed on use) and device (4 GiB, made on first use).
Arena& host_arena();
Arena& device_arena();
void reset_test_arenas();

// A seed for this test's random inputs: different on every run (fresh inputs), printed on failure.
uint64_t fresh_seed();

// Host f32 tensor, uniform in [-scale, scale) from Philox stream `seed`.
Tensor host_random(Shape shape, uint64_t seed, double scale = 1.0);
// Host f32 copy rounded to bf16 values (the inputs both sides see in bf16 mode).
Tensor rounded_to_bf16(const Tensor& host_f32);
// Device copy of a host f32 tensor as `dtype` (f32, or bf16 by round-to-nearest-even).
Tensor to_device(const Tensor& host_f32, DType dtype);
// Device copy of a host tensor of any dtype, unchanged (ids, offsets).
Tensor to_device_raw(const Tensor& host);
// Host f32 copy of a device tensor (bf16 widened exactly).
Tensor to_host_f32(const Tensor& device);
// Device tensor of `shape`/`dtype` whose bytes are all 0xFF (NaN in f32 and bf16): an element the kernel
// does not write stays NaN and fails the comparison.
Tensor poisoned(Shape shape, DType dtype);

// ||got - ref|| / ||ref|| over all elements (infinity when got has a NaN or Inf, or the sizes differ).
double rel_error(const Tensor& got_host_f32, const Tensor& ref_host_f32);
// Adds a failure naming `what` when rel_error exceeds tol.
void expect_rel(const std::string& what, const Tensor& got_device, const Tensor& ref_host_f32, double tol);

// The same test with the error measured against max(||ref||, scale): for a result that cancels (a sum of terms
// far larger than itself, such as RMSNorm's dx at D = 1, GELU's 1 + erf(x) at x = -4, or the q/k gradients of a
// one-token document, which are exactly 0), fp32 rounding error is relative to the terms, not to the result.
// `scale` is a norm of those terms, derived in each test from its inputs.
void expect_close(const std::string& what, const Tensor& got_device, const Tensor& ref_host_f32, double tol,
                  double scale);
// Euclidean norm of a host f32 tensor, and the largest norm of its rows over the last dimension.
double norm(const Tensor& host_f32);
double max_row_norm(const Tensor& host_f32);

constexpr double kTolF32 = 1e-5;
constexpr double kTolBf16 = 1e-2;

}  // namespace q3vl::test
