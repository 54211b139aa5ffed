// Finite-difference gradient checking in double precision, and a registry of what was checked so the test
// run can report how many layers and tensors had their backward verified.
//
// A test builds a layer's inputs and parameters as f64 tensors, defines loss() = sum(output * R) for a
// fixed random R, runs the layer's backward with dy = R to get analytic gradients, and hands each
// (value, analytic gradient) pair here. Every element is perturbed by +-eps and the central difference
// (loss(+) - loss(-)) / 2eps is compared with the analytic value.
//
// Tolerance: with eps = 1e-6 in f64 the truncation error is O(eps^2 * f''') ~ 1e-12 and the rounding error
// ~ 1e-16 * |loss| / eps ~ 1e-10 * |loss|; test losses are O(1..100), so |num - ana| <= 1e-7 + 1e-6 * |num|
// is two orders above the noise yet catches any wrong term (which errs at O(|grad|)).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace q3vl::test {

struct GradTarget {
  std::string name;  // "x", "w", ...
  Tensor value;      // f64, perturbed in place and restored
  Tensor grad;       // f64 analytic gradient, same shape
};

struct GradCheckOptions {
  double eps = 1e-6;
  double atol = 1e-7;
  double rtol = 1e-6;
};

// Adds a gtest failure for each mismatching element (the first few are described) and records every
// target in the registry under `layer`.
void expect_gradients(const std::string& layer, const std::function<double()>& loss,
                      const std::vector<GradTarget>& targets, const GradCheckOptions& opt = {});

// A scratch arena for tests (256 MiB) reset at the start of every test.
Arena& test_arena();

// Random f64 (or other float dtype) tensor from the documented Philox stream `seed`.
Tensor random_tensor(Shape shape, uint64_t seed, double scale = 1.0, DType dtype = DType::f64);
Tensor zeros_tensor(Shape shape, DType dtype = DType::f64);
// sum(a * b) over two same-shape float tensors.
double dot(const Tensor& a, const Tensor& b);
// max |a - b| over two same-shape float tensors.
double max_abs_diff(const Tensor& a, const Tensor& b);

// Runs f and expects a q3vl::Error whose message contains `needle` (a gtest failure otherwise).
void expect_error(const std::function<void()>& f, const std::string& needle);

// Registry report: "gradient checks: N layers, M tensors" plus one line per layer.
std::string gradcheck_report();

}  // namespace q3vl::test
