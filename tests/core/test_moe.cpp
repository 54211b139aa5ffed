// MoE block: hand-computed routing, equality with an independent naive mixture (sparse and dense top-k = E),
// tie order, finite-difference gradients of x and all parameters (with and without the pooled or per-layer aux
// loss, with padding, with a router score bias), the aux losses against SPEC's formula, the score bias choosing
// but not weighting, the router entropy, f32 against f64, determinism, arena sizing and argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "core/layers/moe.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct MoeLayer {
  MoeConfig cfg;
  Tensor router, gate_up, down;
  Tensor d_router, d_gate_up, d_down;
  MoeWeights weights() const { return {router, gate_up, down}; }
  MoeGradients grads() const { return {d_router, d_gate_up, d_down}; }
};

MoeLayer make_layer(const MoeConfig& c, uint64_t seed, DType dt = DType::f64) {
  const int64_t E = c.num_experts, H = c.hidden, I = c.expert_ffn;
  MoeLayer l{c,
             random_tensor({E, H}, seed, 1.0, dt),
             random_tensor({E, H, 2 * I}, seed + 1, 1.0, dt),
             random_tensor({E, I, H}, seed + 2, 1.0, dt),
             zeros_tensor({E, H}, dt),
             zeros_tensor({E, H, 2 * I}, dt),
             zeros_tensor({E, I, H}, dt)};
  return l;
}

MoeStats make_stats(int64_t E) {
  return {Tensor::zeros(test_arena(), {E}, DType::i64), Tensor::zeros(test_arena(), {E}, DType::f64), 0};
}

Tensor make_mask(int64_t n, std::initializer_list<int64_t> padded) {
  Tensor m = Tensor::zeros(test_arena(), {n}, DType::u8);
  for (int64_t t = 0; t < n; ++t) m.data<uint8_t>()[t] = std::find(padded.begin(), padded.end(), t) != padded.end() ? 0 : 1;
  return m;
}

// Independent reference, one token at a time in double.
std::vector<double> naive_probs(const MoeLayer& l, const double* xt) {
  const int64_t E = l.cfg.num_experts, H = l.cfg.hidden;
  std::vector<double> p(E);
  for (int64_t e = 0; e < E; ++e) {
    p[e] = 0;
    for (int64_t i = 0; i < H; ++i) p[e] += xt[i] * l.router.data<double>()[e * H + i];
  }
  const double mx = *std::max_element(p.begin(), p.end());
  double sum = 0;
  for (double& v : p) sum += (v = std::exp(v - mx));
  for (double& v : p) v /= sum;
  return p;
}

// Experts by descending probability, equal values in increasing index: the order torch.topk gives.
std::vector<int64_t> naive_topk(const std::vector<double>& p, int64_t k) {
  std::vector<int64_t> idx(p.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
  idx.resize(k);
  return idx;
}

std::vector<double> naive_expert(const MoeLayer& l, int64_t e, const double* xt) {
  const int64_t H = l.cfg.hidden, I = l.cfg.expert_ffn;
  const double* gu = l.gate_up.data<double>() + e * H * 2 * I;
  const double* dn = l.down.data<double>() + e * I * H;
  std::vector<double> out(H, 0.0);
  for (int64_t j = 0; j < I; ++j) {
    double g = 0, u = 0;
    for (int64_t i = 0; i < H; ++i) {
      g += xt[i] * gu[i * 2 * I + j];
      u += xt[i] * gu[i * 2 * I + I + j];
    }
    const double a = g / (1 + std::exp(-g)) * u;
    for (int64_t c = 0; c < H; ++c) out[c] += a * dn[j * H + c];
  }
  return out;
}

// Smallest gap, over tokens, between the k-th and (k+1)-th largest router logit (log-probability; the gap is
// measured in logits because a perturbation of the inputs moves logits, and probabilities in proportion).
double topk_margin(const MoeSaved& s, int64_t k) {
  const int64_t n = s.probs.size(0), E = s.probs.size(1);
  if (k == E) return std::numeric_limits<double>::infinity();
  double margin = std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    std::vector<double> p(s.probs.data<double>() + t * E, s.probs.data<double>() + (t + 1) * E);
    std::sort(p.begin(), p.end(), std::greater<>());
    margin = std::min(margin, std::log(p[k - 1]) - std::log(p[k]));
  }
  return margin;
}

// An FD perturbation of 1e-6 in one element of x or the router (values in [-1, 1]) moves each logit by at
// most 1e-6; a top-k logit margin of 1e-4 keeps every routing decision fixed.
constexpr double kMinMargin = 1e-4;

TEST(Moe, ForwardHandComputed) {
  // E = 2, k = 1, H = 2, I = 1. The identity router sends x = e0 to expert 0 and x = e1 to expert 1.
  const MoeConfig cfg{2, 2, 1, 1};
  double router[] = {1, 0, 0, 1};
  double gate_up[] = {2, 3, 0, 0,    // expert 0: gate = 2 x0, up = 3 x0
                      0, 0, 1, -1};  // expert 1: gate = x1, up = -x1
  double down[] = {1, -1, 0.5, 2};
  double xv[] = {1, 0, 0, 1, 1, 0};  // token 2 is padding
  Tensor x(xv, DType::f64, {3, 2});
  MoeWeights w{Tensor(router, DType::f64, {2, 2}), Tensor(gate_up, DType::f64, {2, 2, 2}),
               Tensor(down, DType::f64, {2, 1, 2})};
  Tensor valid = make_mask(3, {2});
  Tensor y = zeros_tensor({3, 2});
  MoeStats stats = make_stats(2);
  MoeSaved saved;
  Arena arena("moe saved", moe_forward_arena_bytes(cfg, 3, DType::f64));
  moe_forward(cfg, w, x, valid, arena, saved, y, stats);

  const double a0 = 3 * 2 / (1 + std::exp(-2.0));   // up * silu(gate) of expert 0
  const double a1 = -1 * 1 / (1 + std::exp(-1.0));  // of expert 1
  const double expect[] = {a0, -a0, 0.5 * a1, 2 * a1, a0, -a0};
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(y.data<double>()[i], expect[i], 1e-14) << i;  // a few roundings of values below 6
  const int64_t* ex = saved.topk_expert.data<int64_t>();
  EXPECT_EQ(ex[0], 0);
  EXPECT_EQ(ex[1], 1);
  EXPECT_EQ(ex[2], 0);
  for (int t = 0; t < 3; ++t) EXPECT_EQ(saved.topk_weight.data<double>()[t], 1.0);
  // Padding is left out: each real token puts e/(1+e) on its expert and 1/(1+e) on the other.
  EXPECT_EQ(stats.valid_tokens, 2);
  EXPECT_EQ(stats.counts.data<int64_t>()[0], 1);
  EXPECT_EQ(stats.counts.data<int64_t>()[1], 1);
  EXPECT_NEAR(stats.prob_sum.data<double>()[0], 1.0, 1e-15);
  EXPECT_NEAR(stats.prob_sum.data<double>()[1], 1.0, 1e-15);
}

TEST(Moe, EqualProbabilitiesPickLowerExpertsFirst) {
  const MoeConfig cfg{3, 6, 4, 2};
  MoeLayer l = make_layer(cfg, 10);
  fill(l.router, 0.0);  // every probability is 1/6
  Tensor x = random_tensor({2, 3}, 11), y = zeros_tensor({2, 3});
  MoeStats stats = make_stats(6);
  MoeSaved saved;
  Arena arena("moe saved", moe_forward_arena_bytes(cfg, 2, DType::f64));
  moe_forward(cfg, l.weights(), x, Tensor{}, arena, saved, y, stats);
  for (int64_t t = 0; t < 2; ++t)
    for (int64_t s = 0; s < 4; ++s) {
      EXPECT_EQ(saved.topk_expert.data<int64_t>()[t * 4 + s], s);
      EXPECT_DOUBLE_EQ(saved.topk_weight.data<double>()[t * 4 + s], 0.25);
    }
}

// stats.min_margin is the smallest log(p_k / p_{k+1}) over real tokens: a padding token at an exact tie (x = 0:
// every logit 0) is left out, and with k = E there is no expert left out, so no margin.
TEST(Moe, StatsReportTheSmallestRoutingMarginOfRealTokens) {
  const int64_t n = 6, H = 4;
  for (const int64_t K : {2, 5}) {
    const MoeConfig cfg{H, 5, K, 3};
    MoeLayer l = make_layer(cfg, 30);
    Tensor x = random_tensor({n, H}, 31), y = zeros_tensor({n, H});
    for (int64_t j = 0; j < H; ++j) x.data<double>()[2 * H + j] = 0;
    MoeStats stats = make_stats(5);
    MoeSaved saved;
    Arena arena("moe saved", moe_forward_arena_bytes(cfg, n, DType::f64));
    moe_forward(cfg, l.weights(), x, make_mask(n, {2}), arena, saved, y, stats);
    if (K == 5) {
      EXPECT_EQ(stats.min_margin, std::numeric_limits<double>::infinity());
      continue;
    }
    double expect = std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t < n; ++t) {
      if (t == 2) continue;
      std::vector<double> p(saved.probs.data<double>() + t * 5, saved.probs.data<double>() + (t + 1) * 5);
      std::sort(p.begin(), p.end(), std::greater<>());
      expect = std::min(expect, std::log(p[K - 1] / p[K]));
    }
    EXPECT_GT(expect, 0);
    EXPECT_NEAR(stats.min_margin, expect, 1e-15);  // the same quotient and log; 1e-15 allows another rounding
  }
}

class MoeReference : public testing::TestWithParam<std::tuple<int, int>> {};

// Sparse mixture against the naive per-token reference; with k = E the reference is the dense
// softmax-weighted sum of every expert (renormalising all E probabilities changes nothing).
TEST_P(MoeReference, MatchesNaiveMixture) {
  const auto [E, K] = GetParam();
  const MoeConfig cfg{5, E, K, 3};
  const int64_t n = 9, H = 5;
  MoeLayer l = make_layer(cfg, 20);
  Tensor x = random_tensor({n, H}, 21), y = zeros_tensor({n, H});
  MoeStats stats = make_stats(E);
  MoeSaved saved;
  Arena arena("moe saved", moe_forward_arena_bytes(cfg, n, DType::f64));
  moe_forward(cfg, l.weights(), x, Tensor{}, arena, saved, y, stats);
  ASSERT_GT(topk_margin(saved, K), kMinMargin);  // so the reference's top-k is unambiguous
  double worst = 0;
  for (int64_t t = 0; t < n; ++t) {
    const double* xt = x.data<double>() + t * H;
    const std::vector<double> p = naive_probs(l, xt);
    std::vector<double> ref(H, 0.0);
    if (K == E) {
      for (int64_t e = 0; e < E; ++e) {
        const std::vector<double> o = naive_expert(l, e, xt);
        for (int64_t c = 0; c < H; ++c) ref[c] += p[e] * o[c];
      }
    } else {
      const std::vector<int64_t> top = naive_topk(p, K);
      double chosen = 0;
      for (int64_t e : top) chosen += p[e];
      for (int64_t s = 0; s < K; ++s) {
        EXPECT_EQ(saved.topk_expert.data<int64_t>()[t * K + s], top[s]);
        const std::vector<double> o = naive_expert(l, top[s], xt);
        for (int64_t c = 0; c < H; ++c) ref[c] += p[top[s]] / chosen * o[c];
      }
    }
    for (int64_t c = 0; c < H; ++c) worst = std::max(worst, std::abs(ref[c] - y.data<double>()[t * H + c]));
  }
  // Same f64 arithmetic in a different summation order on O(1) values: differences of a few ulps.
  EXPECT_LT(worst, 1e-12);
}

INSTANTIATE_TEST_SUITE_P(TopK, MoeReference,
                         testing::Values(std::make_tuple(8, 1), std::make_tuple(8, 2), std::make_tuple(10, 3),
                                         std::make_tuple(6, 6), std::make_tuple(8, 8)),
                         [](const testing::TestParamInfo<std::tuple<int, int>>& info) {
                           return "E" + std::to_string(std::get<0>(info.param)) + "k" +
                                  std::to_string(std::get<1>(info.param));
                         });

struct GradCase {
  int E, K;
  bool aux, padding;
  bool per_layer = false;  // the per-layer aux loss instead of the pooled one
  bool bias = false;       // a router score bias that changes the choice of experts
};

// A score bias of +-0.3 (probability units) on alternate experts: it reorders the top-k of most tokens.
Tensor alternating_bias(int64_t E) {
  Tensor b = Tensor::zeros(test_arena(), {E}, DType::f32);
  for (int64_t e = 0; e < E; ++e) b.data<float>()[e] = e % 2 ? 0.3f : -0.3f;
  return b;
}

class MoeGrad : public testing::TestWithParam<GradCase> {};

// Two MoE layers (the aux loss pools them, or averages their own losses): loss = sum(yA * RA) + sum(yB * RB) +
// c * aux(statsA, statsB), c = 0 without the aux term. Gradients of every input and parameter of layer A and of
// x and the router of layer B (which see the aux term) are checked by finite differences. With per_layer, layer
// B has no padding, so the two layers' token counts differ; with bias, both layers choose by probs + bias.
TEST_P(MoeGrad, MatchesFiniteDifferences) {
  const GradCase gc = GetParam();
  const MoeConfig cfg{5, gc.E, gc.K, 3};
  const int64_t n = 7, H = 5;
  const double coef = gc.aux ? 0.5 : 0.0;
  const uint64_t seed = 100 + 10 * gc.E + gc.K + (gc.bias ? 1000 : 0);
  MoeLayer la = make_layer(cfg, seed), lb = make_layer(cfg, seed + 3);
  MoeWeights wa = la.weights(), wb = lb.weights();
  if (gc.bias) wa.score_bias = wb.score_bias = alternating_bias(gc.E);
  Tensor xa = random_tensor({n, H}, seed + 6), xb = random_tensor({n, H}, seed + 7);
  Tensor ra = random_tensor({n, H}, seed + 8), rb = random_tensor({n, H}, seed + 9);
  Tensor va = gc.padding ? make_mask(n, {2, 5}) : Tensor{};
  Tensor vb = gc.padding && !gc.per_layer ? make_mask(n, {2, 5}) : Tensor{};
  Tensor ya = zeros_tensor({n, H}), yb = zeros_tensor({n, H});
  MoeStats stats[2] = {make_stats(gc.E), make_stats(gc.E)};
  MoeSaved sa, sb;
  Arena arena_a("moe saved A", moe_forward_arena_bytes(cfg, n, DType::f64));
  Arena arena_b("moe saved B", moe_forward_arena_bytes(cfg, n, DType::f64));
  auto forward = [&] {
    arena_a.reset();
    arena_b.reset();
    moe_forward(cfg, wa, xa, va, arena_a, sa, ya, stats[0]);
    moe_forward(cfg, wb, xb, vb, arena_b, sb, yb, stats[1]);
  };
  auto aux = [&](const Tensor& dprob) {
    return gc.per_layer ? moe_aux_loss_per_layer(gc.E, stats, coef, dprob) : moe_aux_loss(gc.E, stats, coef, dprob);
  };
  auto loss = [&] {
    forward();
    return dot(ya, ra) + dot(yb, rb) + coef * aux(Tensor{});
  };
  forward();
  if (gc.bias) {
    // The selection scores' gap (probability units): a 1e-6 step moves a probability by less than 1e-6.
    ASSERT_GT(std::min(stats[0].min_margin, stats[1].min_margin), kMinMargin);
  } else {
    ASSERT_GT(topk_margin(sa, gc.K), kMinMargin);
    ASSERT_GT(topk_margin(sb, gc.K), kMinMargin);
  }
  Tensor aux_dprob = gc.aux ? (gc.per_layer ? zeros_tensor({2, gc.E}) : zeros_tensor({gc.E})) : Tensor{};
  if (gc.aux) aux(aux_dprob);
  Tensor dprob_a = aux_dprob, dprob_b = aux_dprob;
  if (gc.aux && gc.per_layer) {
    dprob_a = aux_dprob.narrow(0, 0, 1).view({gc.E});
    dprob_b = aux_dprob.narrow(0, 1, 1).view({gc.E});
  }
  Tensor dxa = zeros_tensor({n, H}), dxb = zeros_tensor({n, H});
  moe_backward(cfg, wa, xa, va, sa, ra, dprob_a, dxa, la.grads(), test_arena());
  moe_backward(cfg, wb, xb, vb, sb, rb, dprob_b, dxb, lb.grads(), test_arena());
  const std::string name = std::string("moe") + (gc.aux ? (gc.per_layer ? "(per-layer aux)" : "(aux)") : "") +
                           (gc.padding ? "(padding)" : "") + (gc.bias ? "(score bias)" : "");
  expect_gradients(name, loss,
                   {{"x", xa, dxa},
                    {"router", la.router, la.d_router},
                    {"gate_up", la.gate_up, la.d_gate_up},
                    {"down", la.down, la.d_down},
                    {"x(layer B)", xb, dxb},
                    {"router(layer B)", lb.router, lb.d_router}});
}

INSTANTIATE_TEST_SUITE_P(Cases, MoeGrad,
                         testing::Values(GradCase{8, 1, false, false}, GradCase{8, 1, true, true},
                                         GradCase{8, 2, false, true}, GradCase{8, 2, true, false},
                                         GradCase{10, 2, true, true}, GradCase{8, 8, false, false},
                                         GradCase{8, 8, true, true}, GradCase{10, 8, true, true},
                                         GradCase{8, 2, true, true, true}, GradCase{10, 3, true, false, true},
                                         GradCase{8, 2, true, true, false, true},
                                         GradCase{8, 2, true, true, true, true}),
                         [](const testing::TestParamInfo<GradCase>& info) {
                           const GradCase& c = info.param;
                           return "E" + std::to_string(c.E) + "k" + std::to_string(c.K) +
                                  (c.aux ? (c.per_layer ? "_per_layer_aux" : "_aux") : "") +
                                  (c.padding ? "_padding" : "") + (c.bias ? "_bias" : "");
                         });

TEST(Moe, AuxLossMatchesSpecFormulaPooledOverLayers) {
  const int64_t E = 8, K = 2, n = 9, H = 5;
  const MoeConfig cfg{H, E, K, 3};
  const std::vector<int64_t> padded = {0, 4, 8};
  MoeLayer layers[2] = {make_layer(cfg, 40), make_layer(cfg, 43)};
  Tensor xs[2] = {random_tensor({n, H}, 46), random_tensor({n, H}, 47)};
  Tensor valid = make_mask(n, {0, 4, 8});
  MoeStats stats[2] = {make_stats(E), make_stats(E)};
  MoeSaved saved[2];
  Arena arena("moe saved", 2 * moe_forward_arena_bytes(cfg, n, DType::f64));
  for (int l = 0; l < 2; ++l) {
    Tensor y = zeros_tensor({n, H});
    moe_forward(cfg, layers[l].weights(), xs[l], valid, arena, saved[l], y, stats[l]);
    ASSERT_GT(topk_margin(saved[l], K), kMinMargin);  // so the naive top-k agrees
  }
  // SPEC: over the real tokens of both layers, f_i = (tokens routed to i) / tokens, P_i = mean prob of i,
  // aux = E * sum_i f_i P_i.
  std::vector<double> routed(E, 0.0), prob(E, 0.0);
  double tokens = 0;
  for (int l = 0; l < 2; ++l)
    for (int64_t t = 0; t < n; ++t) {
      if (std::find(padded.begin(), padded.end(), t) != padded.end()) continue;
      tokens += 1;
      const std::vector<double> p = naive_probs(layers[l], xs[l].data<double>() + t * H);
      for (int64_t e : naive_topk(p, K)) routed[e] += 1;
      for (int64_t e = 0; e < E; ++e) prob[e] += p[e];
    }
  double expect = 0;
  for (int64_t e = 0; e < E; ++e) expect += (routed[e] / tokens) * (prob[e] / tokens);
  expect *= E;
  const double coef = 0.25;
  Tensor aux_dprob = zeros_tensor({E});
  const double aux = moe_aux_loss(E, stats, coef, aux_dprob);
  EXPECT_EQ(tokens, 12);
  EXPECT_NEAR(aux, expect, 1e-14);  // sums of <= 12 O(1) terms in another order
  for (int64_t e = 0; e < E; ++e)
    EXPECT_NEAR(aux_dprob.data<double>()[e], coef * E * routed[e] / tokens / tokens, 1e-15) << e;

  // f32 gradient coefficient, and no real token at all: aux 0 with a zero gradient.
  Tensor aux_f32 = Tensor::zeros(test_arena(), {E}, DType::f32);
  EXPECT_NEAR(moe_aux_loss(E, stats, coef, aux_f32), expect, 1e-14);
  EXPECT_FLOAT_EQ(aux_f32.data<float>()[3], static_cast<float>(aux_dprob.data<double>()[3]));
  MoeStats empty[1] = {make_stats(E)};
  EXPECT_EQ(moe_aux_loss(E, empty, coef, aux_dprob), 0.0);
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(aux_dprob.data<double>()[e], 0.0);
}

// The per-layer loss is the mean of each layer's own pooled loss (a one-layer pool), its gradient row l that
// layer's pooled gradient / L; layers with different token counts, and a layer without real tokens counts 0.
TEST(Moe, AuxLossPerLayerIsTheMeanOfTheLayersOwnLosses) {
  const int64_t E = 8, K = 2, n = 9, H = 5;
  const MoeConfig cfg{H, E, K, 3};
  MoeLayer layers[3] = {make_layer(cfg, 50), make_layer(cfg, 53), make_layer(cfg, 56)};
  const Tensor valid[3] = {make_mask(n, {0, 4, 8}), Tensor{},
                           make_mask(n, {0, 1, 2, 3, 4, 5, 6, 7, 8})};
  MoeStats stats[3] = {make_stats(E), make_stats(E), make_stats(E)};
  MoeSaved saved[3];
  Arena arena("moe saved", 3 * moe_forward_arena_bytes(cfg, n, DType::f64));
  for (int l = 0; l < 3; ++l) {
    Tensor y = zeros_tensor({n, H});
    moe_forward(cfg, layers[l].weights(), random_tensor({n, H}, 60 + l), valid[l], arena, saved[l], y, stats[l]);
  }
  EXPECT_EQ(stats[2].valid_tokens, 0);
  const double coef = 0.25;
  Tensor dprob = zeros_tensor({3, E});
  const double aux = moe_aux_loss_per_layer(E, stats, coef, dprob);
  double expect = 0;
  for (int l = 0; l < 3; ++l) {
    Tensor own = zeros_tensor({E});
    expect += moe_aux_loss(E, std::span<const MoeStats>(stats + l, 1), coef, own) / 3;
    for (int64_t e = 0; e < E; ++e)
      EXPECT_NEAR(dprob.data<double>()[l * E + e], own.data<double>()[e] / 3, 1e-17) << "layer " << l << " expert " << e;
  }
  EXPECT_NEAR(aux, expect, 1e-15);
  EXPECT_GT(aux, 0.0);
  // Two layers collapsed onto different experts (4 experts, top-1, 4 tokens each at p = 0.7 on their expert):
  // pooled they look half balanced (1.6, where 1 is balanced), each alone is collapsed (2.8).
  MoeStats collapsed[2] = {make_stats(4), make_stats(4)};
  for (int l = 0; l < 2; ++l) {
    collapsed[l].valid_tokens = 4;
    collapsed[l].counts.data<int64_t>()[l] = 4;
    for (int64_t e = 0; e < 4; ++e) collapsed[l].prob_sum.data<double>()[e] = e == l ? 2.8 : 0.4;
  }
  EXPECT_NEAR(moe_aux_loss(4, collapsed, coef, Tensor{}), 1.6, 1e-15);
  EXPECT_NEAR(moe_aux_loss_per_layer(4, collapsed, coef, Tensor{}), 2.8, 1e-15);
  EXPECT_EQ(moe_aux_loss_per_layer(E, {}, coef, Tensor{}), 0.0);
  expect_error([&] { moe_aux_loss_per_layer(E, stats, coef, zeros_tensor({E})); },
               "moe_aux_loss_per_layer: aux_dprob has shape [8], expected [3,8]");
}

// The bias decides which experts a token gets; the weights stay the renormalised unbiased probabilities, the
// stats count the biased choice, and the margin is the selection scores' gap.
TEST(Moe, ScoreBiasChoosesTheExpertsButNotTheirWeights) {
  const int64_t E = 6, K = 2, n = 5, H = 4;
  const MoeConfig cfg{H, E, K, 3};
  MoeLayer l = make_layer(cfg, 70);
  MoeWeights w = l.weights();
  w.score_bias = Tensor::zeros(test_arena(), {E}, DType::f32);
  float* bias = w.score_bias.data<float>();
  bias[4] = 2.0f;  // more than any probability: expert 4 always chosen, first
  bias[1] = 1.5f;  // then expert 1
  Tensor x = random_tensor({n, H}, 71), y = zeros_tensor({n, H});
  MoeStats stats = make_stats(E);
  MoeSaved saved;
  Arena arena("moe saved", 2 * moe_forward_arena_bytes(cfg, n, DType::f64));
  moe_forward(cfg, w, x, Tensor{}, arena, saved, y, stats);
  double margin = std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<double> p = naive_probs(l, x.data<double>() + t * H);
    EXPECT_EQ(saved.topk_expert.data<int64_t>()[t * K], 4);
    EXPECT_EQ(saved.topk_expert.data<int64_t>()[t * K + 1], 1);
    EXPECT_NEAR(saved.topk_weight.data<double>()[t * K], p[4] / (p[4] + p[1]), 1e-15);
    EXPECT_NEAR(saved.topk_weight.data<double>()[t * K + 1], p[1] / (p[4] + p[1]), 1e-15);
    double left_out = 0;
    for (int64_t e = 0; e < E; ++e)
      if (e != 4 && e != 1) left_out = std::max(left_out, p[e]);
    margin = std::min(margin, p[1] + 1.5 - left_out);
  }
  EXPECT_EQ(stats.counts.data<int64_t>()[4], n);
  EXPECT_EQ(stats.counts.data<int64_t>()[1], n);
  EXPECT_NEAR(stats.min_margin, margin, 1e-12);
  // A zero bias chooses exactly like no bias.
  fill(w.score_bias, 0.0);
  Tensor y0 = zeros_tensor({n, H}), y1 = zeros_tensor({n, H});
  MoeSaved s0, s1;
  arena.reset();
  moe_forward(cfg, w, x, Tensor{}, arena, s0, y0, stats);
  moe_forward(cfg, l.weights(), x, Tensor{}, arena, s1, y1, stats);
  EXPECT_EQ(std::memcmp(y0.raw(), y1.raw(), y0.nbytes()), 0);
  w.score_bias = Tensor::zeros(test_arena(), {E}, DType::f64);
  expect_error([&] { moe_forward(cfg, w, x, Tensor{}, arena, s0, y0, stats); },
               "moe_forward: w.score_bias has dtype f64, expected f32");
}

// entropy_sum is -sum p log p over the real tokens.
TEST(Moe, StatsSumTheRouterEntropyOfRealTokens) {
  const int64_t E = 5, n = 6, H = 4;
  const MoeConfig cfg{H, E, 2, 3};
  MoeLayer l = make_layer(cfg, 80);
  Tensor x = random_tensor({n, H}, 81), y = zeros_tensor({n, H});
  MoeStats stats = make_stats(E);
  MoeSaved saved;
  Arena arena("moe saved", moe_forward_arena_bytes(cfg, n, DType::f64));
  moe_forward(cfg, l.weights(), x, make_mask(n, {1, 4}), arena, saved, y, stats);
  double expect = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (t == 1 || t == 4) continue;
    for (const double p : naive_probs(l, x.data<double>() + t * H)) expect -= p * std::log(p);
  }
  EXPECT_NEAR(stats.entropy_sum, expect, 1e-13);
  fill(l.router, 0.0);  // uniform routing: log E per token
  arena.reset();
  moe_forward(cfg, l.weights(), x, Tensor{}, arena, saved, y, stats);
  EXPECT_NEAR(stats.entropy_sum, n * std::log(double(E)), 1e-13);
}

// Runs one forward + backward of `l` (f32 or f64) and returns y, dx and the three gradients in order.
std::vector<Tensor> run_layer(const MoeLayer& l, const Tensor& x, const Tensor& dy, const Tensor& valid,
                              const Tensor& aux_dprob, Arena& arena, MoeSaved& saved) {
  const DType dt = x.dtype();
  const int64_t n = x.size(0), H = l.cfg.hidden;
  Tensor y = Tensor::zeros(test_arena(), {n, H}, dt), dx = Tensor::zeros(test_arena(), {n, H}, dt);
  MoeStats stats = make_stats(l.cfg.num_experts);
  moe_forward(l.cfg, l.weights(), x, valid, arena, saved, y, stats);
  moe_backward(l.cfg, l.weights(), x, valid, saved, dy, aux_dprob, dx, l.grads(), test_arena());
  return {y, dx, l.d_router, l.d_gate_up, l.d_down};
}

MoeLayer cast_layer(const MoeLayer& l, DType dt) {
  auto cast = [&](const Tensor& t) {
    Tensor c = Tensor::zeros(test_arena(), t.shape(), dt);
    for (int64_t i = 0; i < t.numel(); ++i) c.data<float>()[i] = static_cast<float>(t.data<double>()[i]);
    return c;
  };
  return {l.cfg, cast(l.router), cast(l.gate_up), cast(l.down), cast(l.d_router), cast(l.d_gate_up), cast(l.d_down)};
}

Tensor to_f32(const Tensor& t) {
  Tensor c = Tensor::empty(test_arena(), t.shape(), DType::f32);
  for (int64_t i = 0; i < t.numel(); ++i) c.data<float>()[i] = static_cast<float>(t.data<double>()[i]);
  return c;
}

TEST(Moe, Float32MatchesFloat64) {
  const MoeConfig cfg{64, 16, 4, 32};
  const int64_t n = 33;
  MoeLayer l64 = make_layer(cfg, 60);
  MoeLayer l32 = cast_layer(l64, DType::f32);
  // x in [-0.25, 0.25] keeps the 64-term logits O(1) so the routing is not saturated.
  Tensor x64 = random_tensor({n, 64}, 63, 0.25), dy64 = random_tensor({n, 64}, 64);
  Tensor valid = make_mask(n, {7, 30});
  Tensor aux64 = random_tensor({16}, 65, 0.1);
  Arena a64("moe saved f64", moe_forward_arena_bytes(cfg, n, DType::f64));
  Arena a32("moe saved f32", moe_forward_arena_bytes(cfg, n, DType::f32));
  MoeSaved s64, s32;
  const std::vector<Tensor> r64 = run_layer(l64, x64, dy64, valid, aux64, a64, s64);
  ASSERT_GT(topk_margin(s64, 4), 1e-3);  // f32 rounding (~1e-6 in the logits) cannot change the routing
  const std::vector<Tensor> r32 = run_layer(l32, to_f32(x64), to_f32(dy64), valid, to_f32(aux64), a32, s32);
  const char* names[] = {"y", "dx", "d_router", "d_gate_up", "d_down"};
  for (size_t i = 0; i < r64.size(); ++i) {
    double scale = 0;
    for (int64_t j = 0; j < r64[i].numel(); ++j) scale = std::max(scale, std::abs(r64[i].data<double>()[j]));
    // f32 sums of <= 64-term products accumulate a relative error of ~64 * 6e-8 ~ 4e-6 of the largest value;
    // 1e-4 leaves margin but still catches any wrong term.
    EXPECT_LT(max_abs_diff(r64[i], r32[i]), 1e-4 * scale) << names[i];
  }
}

TEST(Moe, RepeatsBitwiseAndAccumulatesParameterGradients) {
  const MoeConfig cfg{24, 12, 3, 10};
  const int64_t n = 40;
  MoeLayer l = cast_layer(make_layer(cfg, 70), DType::f32);
  Tensor x = to_f32(random_tensor({n, 24}, 73)), dy = to_f32(random_tensor({n, 24}, 74));
  Arena arena("moe saved", 2 * moe_forward_arena_bytes(cfg, n, DType::f32));
  MoeSaved s1, s2;
  const std::vector<Tensor> first = run_layer(l, x, dy, Tensor{}, Tensor{}, arena, s1);
  std::vector<Tensor> once;
  for (const Tensor& t : first) {
    Tensor c = Tensor::empty(test_arena(), t.shape(), DType::f32);
    copy(c, t);
    once.push_back(c);
  }
  const std::vector<Tensor> second = run_layer(l, x, dy, Tensor{}, Tensor{}, arena, s2);
  EXPECT_EQ(max_abs_diff(once[0], second[0]), 0.0) << "y";
  EXPECT_EQ(max_abs_diff(once[1], second[1]), 0.0) << "dx";
  for (int i = 2; i < 5; ++i)
    for (int64_t j = 0; j < once[i].numel(); ++j)
      ASSERT_EQ(second[i].data<float>()[j], 2 * once[i].data<float>()[j]) << i << " " << j;  // x2 is exact
}

TEST(Moe, ArenaBytesAreExact) {
  const MoeConfig cfg{7, 5, 2, 3};
  const int64_t n = 11;
  MoeLayer l = make_layer(cfg, 80);
  Tensor x = random_tensor({n, 7}, 81), y = zeros_tensor({n, 7});
  MoeStats stats = make_stats(5);
  MoeSaved saved;
  const size_t bytes = moe_forward_arena_bytes(cfg, n, DType::f64);
  Arena tight("tight", bytes);
  moe_forward(cfg, l.weights(), x, Tensor{}, tight, saved, y, stats);
  EXPECT_EQ(tight.high_water(), bytes);
  EXPECT_LT(tight.used(), bytes);  // the scratch part is released
  Arena scratch("scratch", moe_backward_scratch_bytes(cfg, n, DType::f64));
  Tensor dx = zeros_tensor({n, 7});
  moe_backward(cfg, l.weights(), x, Tensor{}, saved, y, Tensor{}, dx, l.grads(), scratch);
  EXPECT_EQ(scratch.high_water(), scratch.capacity());
  EXPECT_EQ(scratch.used(), 0u);

  Arena small("small", bytes - Arena::kAlign);
  try {
    moe_forward(cfg, l.weights(), x, Tensor{}, small, saved, y, stats);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("moe_forward: saved_arena 'small' has"), std::string::npos) << e.what();
  }
}


TEST(Moe, RejectsBadArgumentsNamingThem) {
  const MoeConfig cfg{5, 8, 2, 3};
  const int64_t n = 4;
  MoeLayer l = make_layer(cfg, 90);
  Tensor x = random_tensor({n, 5}, 91), y = zeros_tensor({n, 5});
  MoeStats stats = make_stats(8);
  MoeSaved saved;
  Arena arena("moe saved", moe_forward_arena_bytes(cfg, n, DType::f64));
  auto fwd = [&](const MoeConfig& c, const MoeWeights& w, const Tensor& xx, const Tensor& valid) {
    return [&, c, w, xx, valid] {
      arena.reset();
      moe_forward(c, w, xx, valid, arena, saved, y, stats);
    };
  };
  expect_error(fwd(MoeConfig{5, 8, 9, 3}, l.weights(), x, Tensor{}),
               "moe_forward: config top_k 9 must be in [1, num_experts = 8]");
  expect_error(fwd(MoeConfig{5, 8, 0, 3}, l.weights(), x, Tensor{}), "moe_forward: config top_k 0");
  MoeWeights bad = l.weights();
  bad.gate_up = zeros_tensor({8, 5, 5});
  expect_error(fwd(cfg, bad, x, Tensor{}), "moe_forward: w.gate_up has shape [8,5,5], expected [8,5,6]");
  bad = l.weights();
  bad.router = zeros_tensor({8, 5}, DType::f32);
  expect_error(fwd(cfg, bad, x, Tensor{}), "moe_forward: w.gate_up has dtype f64, expected f32");
  expect_error(fwd(cfg, l.weights(), zeros_tensor({n, 6}), Tensor{}), "moe_forward: x has shape [4,6], expected [*,5]");
  Tensor mask = make_mask(n, {});
  mask.data<uint8_t>()[3] = 2;
  expect_error(fwd(cfg, l.weights(), x, mask), "moe_forward: valid[3] = 2, expected 0 (padding) or 1");
  expect_error(fwd(cfg, l.weights(), x, zeros_tensor({n})), "moe_forward: valid has dtype f64, expected u8");
  expect_error(fwd(cfg, l.weights(), x, Tensor::zeros(test_arena(), {n}, DType::i64)),
               "moe_forward: valid has dtype i64, expected u8");
  expect_error(fwd(cfg, l.weights(), x, make_mask(n + 1, {})), "moe_forward: valid has shape [5]");
  expect_error(
      [&] {
        MoeStats s = stats;
        s.prob_sum = zeros_tensor({8}, DType::f32);
        arena.reset();
        moe_forward(cfg, l.weights(), x, Tensor{}, arena, saved, y, s);
      },
      "moe_forward: stats.prob_sum has dtype f32, expected f64");

  arena.reset();
  moe_forward(cfg, l.weights(), x, Tensor{}, arena, saved, y, stats);
  Tensor dx = zeros_tensor({n, 5});
  auto bwd = [&](const Tensor& dy, const Tensor& aux, const MoeGradients& g) {
    return [&, dy, aux, g] { moe_backward(cfg, l.weights(), x, Tensor{}, saved, dy, aux, dx, g, test_arena()); };
  };
  expect_error(bwd(zeros_tensor({n, 4}), Tensor{}, l.grads()), "moe_backward: dy has shape [4,4], expected [4,5]");
  expect_error(bwd(y, zeros_tensor({7}), l.grads()), "moe_backward: aux_dprob has shape [7], expected [8]");
  MoeGradients g = l.grads();
  g.down = zeros_tensor({8, 5, 3});
  expect_error(bwd(y, Tensor{}, g), "moe_backward: grads.down has shape [8,5,3], expected [8,3,5]");
  Arena tiny("tiny", 64);
  expect_error([&] { moe_backward(cfg, l.weights(), x, Tensor{}, saved, y, Tensor{}, dx, l.grads(), tiny); },
               "moe_backward: scratch 'tiny' has 64 bytes free");
  expect_error(
      [&] {
        moe_backward(cfg, l.weights(), zeros_tensor({n + 1, 5}), Tensor{}, saved, zeros_tensor({n + 1, 5}),
                     Tensor{}, Tensor{}, l.grads(), test_arena());
      },
      "moe_backward: saved.probs has shape [4,8], expected [5,8]");

  MoeStats two[2] = {stats, make_stats(8)};
  two[1].counts = zeros_tensor({8});
  expect_error([&] { moe_aux_loss(8, two, 1.0, Tensor{}); },
               "moe_aux_loss: layers[1].counts has dtype f64, expected i64");
  expect_error([&] { moe_aux_loss(8, std::span<const MoeStats>(two, 1), 1.0, zeros_tensor({8}, DType::i64)); },
               "moe_aux_loss: aux_dprob has dtype i64, expected f32 or f64");
}

}  // namespace
}  // namespace q3vl::test
