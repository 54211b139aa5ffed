// Finite-difference checker, test arena and tensor helpers for the test suites.
#include "tests/support/gradcheck.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <sstream>

namespace q3vl::test {

namespace {
std::map<std::string, std::set<std::string>>& registry() {
  static std::map<std::string, std::set<std::string>> r;
  return r;
}

double get(const Tensor& t, int64_t i) {
  return t.dtype() == DType::f64 ? t.data<double>()[i] : static_cast<double>(t.data<float>()[i]);
}
}  // namespace

void expect_gradients(const std::string& layer, const std::function<double()>& loss,
                      const std::vector<GradTarget>& targets, const GradCheckOptions& opt) {
  for (const GradTarget& t : targets) {
    ASSERT_EQ(t.value.dtype(), DType::f64) << layer << "." << t.name << " must be f64";
    ASSERT_EQ(t.grad.dtype(), DType::f64) << layer << "." << t.name << " gradient must be f64";
    ASSERT_TRUE(t.value.shape() == t.grad.shape()) << layer << "." << t.name;
    ASSERT_GT(t.value.numel(), 0) << layer << "." << t.name << " is empty: nothing would be checked";
    double* v = t.value.data<double>();
    const double* g = t.grad.data<double>();
    int bad = 0;
    double worst = 0;
    for (int64_t i = 0; i < t.value.numel(); ++i) {
      const double orig = v[i];
      v[i] = orig + opt.eps;
      const double lp = loss();
      v[i] = orig - opt.eps;
      const double lm = loss();
      v[i] = orig;
      const double num = (lp - lm) / (2 * opt.eps);
      const double err = std::abs(num - g[i]);
      const double tol = opt.atol + opt.rtol * std::abs(num);
      worst = std::max(worst, err / tol);
      if (!(err <= tol)) {
        if (++bad <= 5)
          ADD_FAILURE() << layer << ": d/d" << t.name << "[" << i << "] analytic " << g[i] << " numeric " << num
                        << " (|diff| " << err << " > tol " << tol << ")";
      }
    }
    EXPECT_EQ(bad, 0) << layer << ": " << bad << " of " << t.value.numel() << " elements of d/d" << t.name
                      << " mismatch; worst err/tol " << worst;
    registry()[layer].insert(t.name);
  }
}

Arena& test_arena() {
  static Arena arena("test", size_t{256} << 20);
  return arena;
}

Tensor random_tensor(Shape shape, uint64_t seed, double scale, DType dtype) {
  Tensor t = Tensor::empty(test_arena(), shape, dtype);
  fill_uniform(t, Philox(seed), -scale, scale);
  return t;
}

Tensor zeros_tensor(Shape shape, DType dtype) { return Tensor::zeros(test_arena(), shape, dtype); }

double dot(const Tensor& a, const Tensor& b) {
  Q3VL_CHECK(a.shape() == b.shape(), "dot: ", a.str(), " vs ", b.str());
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += get(a, i) * get(b, i);
  return s;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  Q3VL_CHECK(a.shape() == b.shape(), "max_abs_diff: ", a.str(), " vs ", b.str());
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(get(a, i) - get(b, i)));
  return m;
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

std::string gradcheck_report() {
  size_t tensors = 0;
  for (const auto& [layer, names] : registry()) tensors += names.size();
  std::ostringstream os;
  os << "gradient checks: " << registry().size() << " layers, " << tensors << " tensors\n";
  for (const auto& [layer, names] : registry()) {
    os << "  " << layer << ":";
    for (const auto& n : names) os << " " << n;
    os << "\n";
  }
  return os.str();
}

}  // namespace q3vl::test
