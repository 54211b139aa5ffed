// Dense SwiGLU MLP: forward against the MLP written out element by element, finite-difference gradients,
// the saved-arena size, and argument checks.
#include <gtest/gtest.h>

#include <cmath>

#include "core/layers/swiglu_mlp.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct Mlp {
  int64_t n, h, inter;
  SwigluMlpWeights w, g;
  Tensor x;

  Mlp(int64_t n_, int64_t h_, int64_t inter_, uint64_t seed) : n(n_), h(h_), inter(inter_) {
    w = {random_tensor({inter, h}, seed, 0.5), random_tensor({inter, h}, seed + 1, 0.5),
         random_tensor({h, inter}, seed + 2, 0.5)};
    g = {zeros_tensor({inter, h}), zeros_tensor({inter, h}), zeros_tensor({h, inter})};
    x = random_tensor({n, h}, seed + 3);
  }
};

TEST(SwigluMlp, ForwardMatchesTheMlpWrittenOut) {
  Mlp m(5, 6, 4, 11);
  Tensor y = zeros_tensor({m.n, m.h});
  const SwigluMlpSaved s = swiglu_mlp_forward(m.w, m.x, test_arena(), y);
  const double *xp = m.x.data<double>(), *wg = m.w.gate_proj.data<double>(), *wu = m.w.up_proj.data<double>(),
               *wd = m.w.down_proj.data<double>();
  for (int64_t t = 0; t < m.n; ++t) {
    std::vector<double> act(m.inter);
    for (int64_t i = 0; i < m.inter; ++i) {
      double gate = 0, up = 0;
      for (int64_t j = 0; j < m.h; ++j) {
        gate += xp[t * m.h + j] * wg[i * m.h + j];
        up += xp[t * m.h + j] * wu[i * m.h + j];
      }
      act[i] = gate / (1 + std::exp(-gate)) * up;
      // f64, same products summed in another order: 1e-12.
      EXPECT_NEAR(s.gate_up.data<double>()[t * 2 * m.inter + i], gate, 1e-12);
      EXPECT_NEAR(s.gate_up.data<double>()[t * 2 * m.inter + m.inter + i], up, 1e-12);
      EXPECT_NEAR(s.act.data<double>()[t * m.inter + i], act[i], 1e-12);
    }
    for (int64_t j = 0; j < m.h; ++j) {
      double out = 0;
      for (int64_t i = 0; i < m.inter; ++i) out += act[i] * wd[j * m.inter + i];
      EXPECT_NEAR(y.data<double>()[t * m.h + j], out, 1e-12);
    }
  }
}

class SwigluMlpGrad : public testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(SwigluMlpGrad, MatchesFiniteDifferences) {
  const auto [n, h, inter] = GetParam();
  Mlp m(n, h, inter, 21);
  Tensor r = random_tensor({n, h}, 25), y = zeros_tensor({n, h}), dx = zeros_tensor({n, h});
  Arena& arena = test_arena();
  auto loss = [&] {
    const size_t mark = arena.mark();
    swiglu_mlp_forward(m.w, m.x, arena, y);
    arena.release(mark);
    return dot(y, r);
  };
  const SwigluMlpSaved s = swiglu_mlp_forward(m.w, m.x, arena, y);
  swiglu_mlp_backward(m.w, m.x, s, r, dx, m.g, arena);
  expect_gradients("swiglu_mlp", loss,
                   {{"x", m.x, dx},
                    {"gate_proj", m.w.gate_proj, m.g.gate_proj},
                    {"up_proj", m.w.up_proj, m.g.up_proj},
                    {"down_proj", m.w.down_proj, m.g.down_proj}});
}

INSTANTIATE_TEST_SUITE_P(Shapes, SwigluMlpGrad,
                         testing::Values(std::make_tuple(1, 1, 1), std::make_tuple(5, 4, 3),
                                         std::make_tuple(7, 6, 10)));

TEST(SwigluMlp, ArenaUseEqualsTheSizeFunctions) {
  Mlp m(9, 8, 5, 31);
  Arena saved("saved", 1 << 20), scratch("scratch", 1 << 20);
  Tensor y = zeros_tensor({m.n, m.h}), dx = zeros_tensor({m.n, m.h});
  const SwigluMlpSaved s = swiglu_mlp_forward(m.w, m.x, saved, y);
  EXPECT_EQ(saved.used(), swiglu_mlp_saved_bytes(m.n, m.inter, DType::f64));
  swiglu_mlp_backward(m.w, m.x, s, y, dx, m.g, scratch);
  EXPECT_EQ(scratch.used(), 0u);
  EXPECT_EQ(scratch.high_water(), swiglu_mlp_scratch_bytes(m.n, m.inter, DType::f64));
}

TEST(SwigluMlp, RejectsMismatchedWeightsNamingThem) {
  Mlp m(3, 4, 2, 41);
  Tensor y = zeros_tensor({m.n, m.h});
  m.w.up_proj = zeros_tensor({3, m.h});
  expect_error([&] { swiglu_mlp_forward(m.w, m.x, test_arena(), y); },
               "swiglu_mlp_forward: up_proj has shape [3,4], expected [2,4]");
}

}  // namespace
}  // namespace q3vl::test
