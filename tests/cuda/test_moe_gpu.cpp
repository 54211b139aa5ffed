// The reference MoE expert path on the CUDA device against the CPU twin, f32 and bf16: routing (probabilities,
// top-k, weights), the sort by expert, stats, y, and the backward (dx, accumulated router / expert gradients,
// the aux term, the routing margin), on balanced and skewed loads (experts with 0 rows), N = 1, top-k = E and padding tokens; the
// arenas sized by the byte functions exactly; determinism; bad input.
//
// The router is built so that every routing decision has a wide margin: logits = x[:, :E] (an identity block
// of the router) + noise of at most step / 4, where each token's x[:, :E] gives its k chosen experts the
// levels k, k-1, ..., 1 (times step) and the others 0. So consecutive top-(k+1) logits differ by at least
// step / 2, far above any f32 or bf16 rounding, and both devices pick the same experts in the same slots.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/layers/moe.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct MoeCase {
  int64_t n, H, E, K, I;
  bool skewed;   // expert 0 takes most tokens; experts >= max(K + 1, E / 2) get no rows
  bool padding;  // every fifth token is padding
};

constexpr float kStep = 1.0f;

struct Inputs {
  Tensor x, router, gate_up, down, valid, dy, aux;
};

Inputs make_inputs(const MoeCase& c, uint64_t seed, bool bf) {
  const int64_t E = c.E, H = c.H, I = c.I, K = c.K;
  Inputs in;
  in.x = host_random({c.n, H}, seed, 1.0);
  in.router = host_random({E, H}, seed + 1, 0.25 * kStep / double(H - E));
  in.gate_up = host_random({E, H, 2 * I}, seed + 2, 1.0 / std::sqrt(double(H)));
  in.down = host_random({E, I, H}, seed + 3, 1.0 / std::sqrt(double(I)));
  in.dy = host_random({c.n, H}, seed + 4, 1.0);
  in.aux = host_random({E}, seed + 5, 0.05);
  float* r = in.router.data<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < E; ++j) r[e * H + j] = e == j ? 1.0f : 0.0f;
  std::vector<double> weight(E, 1.0);
  if (c.skewed) {
    weight[0] = 50.0;
    for (int64_t e = std::max(K + 1, E / 2); e < E; ++e) weight[e] = 0.0;
  }
  std::mt19937_64 rng(seed + 6);
  float* x = in.x.data<float>();
  for (int64_t t = 0; t < c.n; ++t) {
    for (int64_t j = 0; j < E; ++j) x[t * H + j] = 0.0f;
    std::vector<double> w = weight;
    for (int64_t i = 0; i < K; ++i) {
      const int64_t e = std::discrete_distribution<int64_t>(w.begin(), w.end())(rng);
      w[e] = 0.0;
      x[t * H + e] = kStep * float(K - i);
    }
  }
  in.valid = Tensor::empty(host_arena(), {c.n}, DType::u8);
  for (int64_t t = 0; t < c.n; ++t) in.valid.data<uint8_t>()[t] = c.padding && t % 5 == 3 ? 0 : 1;
  if (bf) {
    for (Tensor* t : {&in.x, &in.router, &in.gate_up, &in.down, &in.dy, &in.aux}) *t = rounded_to_bf16(*t);
  }
  return in;
}

// Smallest gap, over tokens, between consecutive probabilities among the top k + 1, in log space (= logits).
double routing_margin(const Tensor& probs, int64_t K) {
  const int64_t n = probs.size(0), E = probs.size(1);
  double margin = INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> p(probs.data<float>() + t * E, probs.data<float>() + (t + 1) * E);
    std::sort(p.begin(), p.end(), std::greater<>());
    for (int64_t i = 0; i < std::min(K, E - 1); ++i) margin = std::min(margin, std::log(double(p[i]) / p[i + 1]));
  }
  return margin;
}

template <class V>
std::vector<V> host_values(const Tensor& d) {
  std::vector<V> out(static_cast<size_t>(d.numel()));
  copy(Tensor(out.data(), d.dtype(), d.shape()), d);
  return out;
}

template <class V>
std::vector<V> values(const Tensor& h) {
  return std::vector<V>(h.data<V>(), h.data<V>() + h.numel());
}

MoeStats host_stats(int64_t E) {
  return {Tensor::zeros(host_arena(), {E}, DType::i64), Tensor::zeros(host_arena(), {E}, DType::f64), 0};
}

MoeStats device_stats(int64_t E) {
  return {poisoned({E}, DType::i64), poisoned({E}, DType::f64), -1};
}

void check_moe(const MoeCase& c, DType dt, DType grad_dt = DType::f32) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n=" + std::to_string(c.n) + " H=" + std::to_string(c.H) +
               " E=" + std::to_string(c.E) + " K=" + std::to_string(c.K) + " I=" + std::to_string(c.I) +
               (c.skewed ? " skewed" : "") + (c.padding ? " padding" : "") + " " + std::string(dtype_name(dt)) +
               " grads " + std::string(dtype_name(grad_dt)));
  const bool bf = dt == DType::bf16;
  const double tol = bf ? kTolBf16 : kTolF32;
  const MoeConfig cfg{c.H, c.E, c.K, c.I};
  const int64_t E = c.E, H = c.H, I = c.I, n = c.n;
  const Inputs in = make_inputs(c, seed, bf);
  auto start_grad = [&](Shape s, uint64_t k) {
    Tensor g = host_random(s, seed + k, 0.01);
    return grad_dt == DType::bf16 ? rounded_to_bf16(g) : g;
  };
  const Tensor g_router = start_grad({E, H}, 20), g_gate_up = start_grad({E, H, 2 * I}, 21),
               g_down = start_grad({E, I, H}, 22);

  // CPU reference in f32.
  const MoeWeights w{in.router, in.gate_up, in.down};
  MoeSaved saved;
  MoeStats stats = host_stats(E);
  const Tensor y = Tensor::empty(host_arena(), {n, H}, DType::f32);
  moe_forward(cfg, w, in.x, in.valid, host_arena(), saved, y, stats);
  EXPECT_GE(routing_margin(saved.probs, c.K), 0.4 * kStep) << "the inputs do not separate the top-k";
  const Tensor dx = Tensor::empty(host_arena(), {n, H}, DType::f32);
  const MoeGradients grads{g_router, g_gate_up, g_down};
  const MoeGradients grads_d{to_device(g_router, grad_dt), to_device(g_gate_up, grad_dt), to_device(g_down, grad_dt)};
  moe_backward(cfg, w, in.x, in.valid, saved, in.dy, in.aux, dx, grads, host_arena());

  // Device, in arenas of exactly the sizes the byte functions give.
  const MoeWeights wd{to_device(in.router, dt), to_device(in.gate_up, dt), to_device(in.down, dt)};
  const Tensor xd = to_device(in.x, dt), valid_d = to_device_raw(in.valid);
  Arena saved_arena("moe saved (device)", moe_forward_arena_bytes(cfg, n, dt, false, Device::cuda), Device::cuda);
  Arena scratch("moe scratch (device)", moe_backward_scratch_bytes(cfg, n, dt, false, Device::cuda), Device::cuda);
  MoeSaved saved_d;
  MoeStats stats_d = device_stats(E);
  const Tensor yd = poisoned({n, H}, dt);
  moe_forward(cfg, wd, xd, valid_d, saved_arena, saved_d, yd, stats_d);
  EXPECT_EQ(saved_arena.high_water(), saved_arena.capacity());

  expect_rel("y", yd, y, tol);
  expect_rel("probs", saved_d.probs, saved.probs, tol);
  expect_rel("topk_weight", saved_d.topk_weight, saved.topk_weight, tol);
  expect_rel("gate_up_out", saved_d.gate_up_out, saved.gate_up_out, tol);
  EXPECT_EQ(host_values<int64_t>(saved_d.topk_expert), values<int64_t>(saved.topk_expert));
  EXPECT_EQ(host_values<int64_t>(saved_d.expert_offsets), values<int64_t>(saved.expert_offsets));
  EXPECT_EQ(host_values<int64_t>(saved_d.sorted_pair), values<int64_t>(saved.sorted_pair));
  EXPECT_EQ(host_values<int64_t>(saved_d.pair_row), values<int64_t>(saved.pair_row));
  EXPECT_EQ(host_values<int64_t>(stats_d.counts), values<int64_t>(stats.counts));
  EXPECT_EQ(stats_d.valid_tokens, stats.valid_tokens);
  if (std::isinf(stats.min_margin)) EXPECT_EQ(stats_d.min_margin, stats.min_margin);
  else EXPECT_NEAR(stats_d.min_margin, stats.min_margin, 1e-4);
  const std::vector<double> prob_sum = host_values<double>(stats_d.prob_sum), prob_sum_ref = values<double>(stats.prob_sum);
  for (int64_t e = 0; e < E; ++e)
    EXPECT_NEAR(prob_sum[e], prob_sum_ref[e], tol * (std::fabs(prob_sum_ref[e]) + 1e-3)) << "prob_sum[" << e << "]";
  if (c.skewed) {
    const std::vector<int64_t> off = values<int64_t>(saved.expert_offsets);
    EXPECT_GT(off[1] - off[0], n / 2) << "expert 0 should take most tokens";
    EXPECT_EQ(off[E] - off[E - 1], 0) << "the last expert should get no rows";
  }

  const Tensor dxd = poisoned({n, H}, dt);
  moe_backward(cfg, wd, xd, valid_d, saved_d, to_device(in.dy, dt), to_device(in.aux, DType::f32), dxd, grads_d,
               scratch);
  EXPECT_EQ(scratch.high_water(), scratch.capacity());
  EXPECT_EQ(scratch.used(), 0u);
  expect_rel("dx", dxd, dx, tol);
  expect_rel("grads.router", grads_d.router, grads.router, tol);
  expect_rel("grads.gate_up", grads_d.gate_up, grads.gate_up, tol);
  expect_rel("grads.down", grads_d.down, grads.down, tol);
}

const MoeCase kCases[] = {
    {1, 24, 8, 2, 5, false, false},     {37, 40, 16, 4, 12, false, true},   {130, 48, 8, 8, 16, false, true},
    {200, 72, 32, 4, 24, true, true},   {512, 192, 128, 8, 64, false, true},
};

TEST(GpuMoe, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_moe(c, DType::f32);
}

TEST(GpuMoe, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_moe(c, DType::bf16);
}

TEST(GpuMoe, Bf16Gradients) {
  Q3VL_REQUIRE_GPU();
  check_moe({37, 40, 16, 4, 12, true, true}, DType::bf16, DType::bf16);
  check_moe({37, 40, 16, 4, 12, false, true}, DType::f32, DType::f32);
}

// Equal probabilities (a zero router): the top-k are experts 0..k-1 in that order, as on the CPU.
TEST(GpuMoe, TiesGoToTheLowerExpert) {
  Q3VL_REQUIRE_GPU();
  const MoeConfig cfg{16, 8, 3, 4};
  const int64_t n = 5;
  Arena saved_arena("moe saved (device)", moe_forward_arena_bytes(cfg, n, DType::f32, false, Device::cuda),
                    Device::cuda);
  const Tensor zero_router = Tensor::zeros(host_arena(), {8, 16}, DType::f32);
  const MoeWeights wd{to_device(zero_router, DType::f32),
                      to_device(host_random({8, 16, 8}, fresh_seed()), DType::f32),
                      to_device(host_random({8, 4, 16}, fresh_seed()), DType::f32)};
  MoeSaved saved;
  MoeStats stats = device_stats(8);
  moe_forward(cfg, wd, to_device(host_random({n, 16}, fresh_seed()), DType::f32), Tensor(), saved_arena, saved,
              poisoned({n, 16}, DType::f32), stats);
  const std::vector<int64_t> topk = host_values<int64_t>(saved.topk_expert);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t s = 0; s < 3; ++s) EXPECT_EQ(topk[t * 3 + s], s) << "token " << t << " slot " << s;
  EXPECT_EQ(stats.valid_tokens, n);
  EXPECT_EQ(host_values<int64_t>(stats.counts), (std::vector<int64_t>{n, n, n, 0, 0, 0, 0, 0}));
}

// Two runs give the same bits (no atomics, fixed summation orders).
TEST(GpuMoe, Deterministic) {
  Q3VL_REQUIRE_GPU();
  const MoeCase c{300, 80, 16, 4, 32, true, true};
  const MoeConfig cfg{c.H, c.E, c.K, c.I};
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Inputs in = make_inputs(c, seed, true);
  const DType dt = DType::bf16;
  const MoeWeights wd{to_device(in.router, dt), to_device(in.gate_up, dt), to_device(in.down, dt)};
  const Tensor xd = to_device(in.x, dt), valid_d = to_device_raw(in.valid), dyd = to_device(in.dy, dt);
  Arena saved_arena("moe saved (device)", 2 * moe_forward_arena_bytes(cfg, c.n, dt, false, Device::cuda),
                    Device::cuda);
  Arena scratch("moe scratch (device)", moe_backward_scratch_bytes(cfg, c.n, dt, false, Device::cuda), Device::cuda);
  std::vector<std::vector<uint16_t>> runs;
  std::vector<std::vector<float>> grad_runs;
  for (int run = 0; run < 2; ++run) {
    MoeSaved saved;
    MoeStats stats = device_stats(c.E);
    const Tensor yd = poisoned({c.n, c.H}, dt), dxd = poisoned({c.n, c.H}, dt);
    moe_forward(cfg, wd, xd, valid_d, saved_arena, saved, yd, stats);
    const MoeGradients g{Tensor::zeros(device_arena(), {c.E, c.H}, DType::f32),
                     Tensor::zeros(device_arena(), {c.E, c.H, 2 * c.I}, DType::f32),
                     Tensor::zeros(device_arena(), {c.E, c.I, c.H}, DType::f32)};
    moe_backward(cfg, wd, xd, valid_d, saved, dyd, Tensor(), dxd, g, scratch);
    std::vector<uint16_t> bits = host_values<uint16_t>(yd.view({c.n * c.H}));
    const std::vector<uint16_t> dx_bits = host_values<uint16_t>(dxd);
    bits.insert(bits.end(), dx_bits.begin(), dx_bits.end());
    runs.push_back(bits);
    std::vector<float> gr = host_values<float>(g.router);
    for (const Tensor* t : {&g.gate_up, &g.down}) {
      const std::vector<float> v = host_values<float>(*t);
      gr.insert(gr.end(), v.begin(), v.end());
    }
    grad_runs.push_back(gr);
  }
  EXPECT_TRUE(runs[0] == runs[1]) << "y / dx differ between runs";
  EXPECT_EQ(std::memcmp(grad_runs[0].data(), grad_runs[1].data(), grad_runs[0].size() * sizeof(float)), 0)
      << "gradients differ between runs";
}

class NoExchange final : public ExpertExchange {
 public:
  int size() const override { return 2; }
  int rank() const override { return 0; }
  void exchange_counts(std::span<const int64_t>, std::span<int64_t>) override {}
  void exchange_rows(const void*, std::span<const int64_t>, void*, std::span<const int64_t>, size_t) override {}
};

TEST(GpuMoe, BadInputIsNamed) {
  Q3VL_REQUIRE_GPU();
  MoeConfig cfg{16, 4, 2, 4};
  const int64_t n = 6;
  const MoeWeights wd{to_device(host_random({4, 16}, 1), DType::f32), to_device(host_random({4, 16, 8}, 2), DType::f32),
                      to_device(host_random({4, 4, 16}, 3), DType::f32)};
  const Tensor xd = to_device(host_random({n, 16}, 4), DType::f32), yd = poisoned({n, 16}, DType::f32);
  Arena saved_arena("moe saved (device)", moe_forward_arena_bytes(cfg, n, DType::f32, false, Device::cuda),
                    Device::cuda);
  MoeSaved saved;
  MoeStats stats = device_stats(4);
  NoExchange exchange;
  cfg.exchange = &exchange;
  expect_error([&] { moe_forward(cfg, wd, xd, Tensor(), saved_arena, saved, yd, stats); },
               "moe_forward: expert parallelism (cfg.exchange) is not supported on the CUDA device");
  cfg.exchange = nullptr;
  MoeWeights biased = wd;
  biased.score_bias = Tensor::zeros(host_arena(), {4}, DType::f32);
  expect_error([&] { moe_forward(cfg, biased, xd, Tensor(), saved_arena, saved, yd, stats); },
               "moe_forward: a router score bias (moe.balance: bias or aux+bias) is not supported on the CUDA device "
               "yet");
  const MoeWeights mixed{host_random({4, 16}, 1), wd.gate_up, wd.down};
  expect_error([&] { moe_forward(cfg, mixed, xd, Tensor(), saved_arena, saved, yd, stats); },
               "moe_forward: w.router f32[4,16] is in host memory");
  Arena host_saved("moe saved (host)", moe_forward_arena_bytes(cfg, n, DType::f32));
  expect_error([&] { moe_forward(cfg, wd, xd, Tensor(), host_saved, saved, yd, stats); },
               "moe_forward: saved_arena 'moe saved (host)' is host memory");
  Tensor bad = Tensor::empty(host_arena(), {n}, DType::u8);
  for (int64_t t = 0; t < n; ++t) bad.data<uint8_t>()[t] = t == 3 ? 2 : 1;
  expect_error([&] { moe_forward(cfg, wd, xd, to_device_raw(bad), saved_arena, saved, yd, stats); },
               "moe_forward: valid[3] = 2, expected 0 (padding) or 1 (real token)");
  EXPECT_EQ(saved_arena.used(), 0u);
}

}  // namespace
}  // namespace q3vl::test
