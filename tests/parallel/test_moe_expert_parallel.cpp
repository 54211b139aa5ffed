// Expert parallelism of the MoE block (moe_forward / moe_backward with a CommExpertExchange) on every rank of the
// mpiexec run against the local path on all ranks' tokens: y and dx rows, the local experts' weight gradients,
// the router gradient and the routing statistics summed over ranks; an EP group of one rank (SelfComm) against
// the local path; all tokens routed to rank 0's experts (zero-row exchanges, a rank without tokens); experts of
// other ranks never read (their weights are NaN) nor written; configuration errors.
//
// Tolerance: EP and the reference do the same fp32 operations on the same values except that GEMMs run over
// other row batches (Eigen may block the k-sums differently) and the router gradient is summed over ranks
// rather than rows. Each compared value is a sum of at most ~100 fp32 terms, so reordering moves it by about
// sqrt(100) * 2^-24 (6e-7) of the tensor's magnitude; 1e-5 of the tensor's largest |value| is >10x above that,
// while a wrong row, expert or weight errs at O(1) of it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/layers/moe.h"
#include "core/rng.h"
#include "parallel/comm.h"
#include "parallel/expert_exchange.h"
#include "parallel/self_comm.h"
#include "tests/parallel/mpi_world.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

using parallel::Comm;

constexpr int64_t kHidden = 32, kExperts = 12, kTopK = 2, kFfn = 24;  // E = 12 splits over 1, 2, 3 and 4 ranks
constexpr double kRelTol = 1e-5;                                         // see the header comment

MoeConfig base_config() { return {kHidden, kExperts, kTopK, kFfn}; }

// Every value of one test case lives here; Tensors are views into it.
struct TestMemory {
  Arena arena{"moe ep test", size_t{64} << 20};
  Tensor zeros(Shape s, DType dt = DType::f32) { return Tensor::zeros(arena, s, dt); }
  Tensor uniform(Shape s, uint64_t seed, double scale) {
    Tensor t = Tensor::empty(arena, s, DType::f32);
    fill_uniform(t, Philox(seed), -scale, scale);
    return t;
  }
};

struct Layer {
  MoeWeights w;
  MoeGradients g;
};

// The same weights on every rank (fixed seeds). With prefer_rank0, experts 0 and 1 (rank 0's in every layout)
// win every token by a wide logit margin: their router rows read only feature 0, which every token sets to 1.
Layer make_layer(TestMemory& m, bool prefer_rank0) {
  const int64_t E = kExperts, H = kHidden, I = kFfn;
  Layer l{{m.uniform({E, H}, 11, prefer_rank0 ? 0.02 : 1.0), m.uniform({E, H, 2 * I}, 12, 0.3),
           m.uniform({E, I, H}, 13, 0.3)},
          {m.zeros({E, H}), m.zeros({E, H, 2 * I}), m.zeros({E, I, H})}};
  if (prefer_rank0) {
    float* r = l.w.router.data<float>();
    std::fill(r, r + 2 * H, 0.f);
    r[0] = 8.f;
    r[H] = 4.f;
  }
  return l;
}

// A copy of l's weights with the experts outside [first, first + count) set to NaN: any read of them shows in
// the outputs. Gradients start at zero.
Layer only_experts(TestMemory& m, const Layer& l, int64_t first, int64_t count) {
  const int64_t E = kExperts, H = kHidden, I = kFfn;
  Layer c{{m.zeros({E, H}), m.zeros({E, H, 2 * I}), m.zeros({E, I, H})},
          {m.zeros({E, H}), m.zeros({E, H, 2 * I}), m.zeros({E, I, H})}};
  copy(c.w.router, l.w.router);
  copy(c.w.gate_up, l.w.gate_up);
  copy(c.w.down, l.w.down);
  for (int64_t e = 0; e < E; ++e)
    if (e < first || e >= first + count) {
      fill(c.w.gate_up[e], std::numeric_limits<double>::quiet_NaN());
      fill(c.w.down[e], std::numeric_limits<double>::quiet_NaN());
    }
  return c;
}

// All ranks' tokens back to back (rank q's from its own seeds, token 1 of each rank with 2+ tokens padding),
// their upstream gradient, and the aux loss gradient every rank shares.
struct Tokens {
  std::vector<int64_t> start;  // [P + 1] rank q's tokens are rows [start[q], start[q + 1])
  Tensor x, valid, dy, aux_dprob;
  int64_t count(int q) const { return start[q + 1] - start[q]; }
  Tensor rows(const Tensor& t, int q) const { return t.narrow(0, start[q], count(q)); }
};

Tokens make_tokens(TestMemory& m, int ranks, const std::function<int64_t(int)>& tokens_of, bool prefer_rank0) {
  Tokens t;
  t.start.assign(1, 0);
  for (int q = 0; q < ranks; ++q) t.start.push_back(t.start.back() + tokens_of(q));
  const int64_t N = t.start.back();
  t.x = m.zeros({N, kHidden});
  t.valid = m.zeros({N}, DType::u8);
  t.dy = m.zeros({N, kHidden});
  for (int q = 0; q < ranks; ++q) {
    fill_uniform(t.rows(t.x, q), Philox(100 + q), -1.0, 1.0);
    fill_uniform(t.rows(t.dy, q), Philox(200 + q), -1.0, 1.0);
    uint8_t* v = t.valid.data<uint8_t>() + t.start[q];
    for (int64_t i = 0; i < t.count(q); ++i) v[i] = i == 1 ? 0 : 1;
  }
  if (prefer_rank0)
    for (int64_t i = 0; i < N; ++i) t.x.data<float>()[i * kHidden] = 1.f;
  t.aux_dprob = m.uniform({kExperts}, 300, 0.01);
  return t;
}

struct Result {
  Tensor y, dx;
  MoeStats stats;
};

// One forward and backward of the rows of x through cfg (local or EP, whose cfg.expert_rows the caller owns),
// into fresh outputs.
Result run_layer(TestMemory& m, const MoeConfig& cfg, const Layer& l, const Tensor& x, const Tensor& valid,
                 const Tensor& dy, const Tensor& aux_dprob, MoeSaved& saved) {
  const int64_t n = x.size(0);
  Result r{m.zeros({n, kHidden}), m.zeros({n, kHidden}),
           {m.zeros({kExperts}, DType::i64), m.zeros({kExperts}, DType::f64), 0}};
  Arena saved_arena("moe ep saved", moe_forward_arena_bytes(cfg, n, DType::f32));
  Arena scratch("moe ep scratch", moe_backward_scratch_bytes(cfg, n, DType::f32));
  moe_forward(cfg, l.w, x, valid, saved_arena, saved, r.y, r.stats);
  moe_backward(cfg, l.w, x, valid, saved, dy, aux_dprob, r.dx, l.g, scratch);
  return r;
}

double max_abs(const float* v, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(static_cast<double>(v[i])));
  return m;
}

// |got - want| <= kRelTol * max |want| element by element (NaN fails); the first mismatch is described.
void expect_close(const std::string& what, const float* got, const float* want, int64_t n) {
  const double tol = kRelTol * max_abs(want, n);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double diff = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(diff <= tol) && bad++ == 0)
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", reference " << want[i] << " (tolerance " << tol
                    << ")";
  }
  EXPECT_EQ(bad, 0) << what << ": elements outside the tolerance";
}

void expect_zero(const std::string& what, const float* v, int64_t n) {
  int64_t nonzero = 0;
  for (int64_t i = 0; i < n; ++i) nonzero += v[i] != 0.f;
  EXPECT_EQ(nonzero, 0) << what << ": elements written";
}

// Every rank runs its tokens through EP over `comm` and compares with the local path on all ranks' tokens.
void check_against_local(Comm& comm, const std::function<int64_t(int)>& tokens_of, bool prefer_rank0) {
  const int P = comm.size(), me = comm.rank();
  if (kExperts % P != 0) GTEST_SKIP() << kExperts << " experts do not split over " << P << " ranks";
  const int64_t El = kExperts / P, H = kHidden, I = kFfn;
  TestMemory m;
  const Layer ref_layer = make_layer(m, prefer_rank0);
  const Tokens tok = make_tokens(m, P, tokens_of, prefer_rank0);

  MoeSaved ref_saved;
  const Result ref = run_layer(m, base_config(), ref_layer, tok.x, tok.valid, tok.dy, tok.aux_dprob, ref_saved);

  parallel::CommExpertExchange exchange(comm);
  MoeConfig cfg = base_config();
  cfg.exchange = &exchange;
  // Sized for the group's largest token count: the worst case the layout allows (all rows to one rank's
  // experts, as AllTokensToRankZerosExperts sends them) must fit.
  int64_t group_tokens = 0;
  for (int q = 0; q < P; ++q) group_tokens = std::max(group_tokens, tok.count(q));
  Arena rows("moe ep rows", moe_expert_rows_bytes(cfg, group_tokens, 1));
  cfg.expert_rows = &rows;
  const Layer layer = only_experts(m, ref_layer, me * El, El);
  MoeSaved saved;
  const Result got = run_layer(m, cfg, layer, tok.rows(tok.x, me), tok.rows(tok.valid, me), tok.rows(tok.dy, me),
                               tok.aux_dprob, saved);
  // What stays is the received rows kept for the backward; the transient rows were handed back.
  EXPECT_GE(rows.used(), sizeof(float) * static_cast<size_t>(saved.ep_rows * (H + 2 * I)));
  if (saved.ep_rows > 0) EXPECT_LT(rows.used(), rows.high_water());

  const std::string at = "rank " + std::to_string(me) + " of " + std::to_string(P) + ": ";
  const int64_t first = tok.start[me] * H, n = tok.count(me) * H;
  expect_close(at + "y", got.y.data<float>(), ref.y.data<float>() + first, n);
  expect_close(at + "dx", got.dx.data<float>(), ref.dx.data<float>() + first, n);
  // The local experts' gradient rows hold every rank's contribution; the other experts' rows stay untouched.
  const int64_t gate_up_rows = H * 2 * I, down_rows = I * H;
  for (int64_t e = 0; e < kExperts; ++e) {
    const std::string name = at + "expert " + std::to_string(e);
    const float* gu = layer.g.gate_up.data<float>() + e * gate_up_rows;
    const float* dn = layer.g.down.data<float>() + e * down_rows;
    if (e / El == me) {
      expect_close(name + " d gate_up", gu, ref_layer.g.gate_up.data<float>() + e * gate_up_rows, gate_up_rows);
      expect_close(name + " d down", dn, ref_layer.g.down.data<float>() + e * down_rows, down_rows);
    } else {
      expect_zero(name + " d gate_up", gu, gate_up_rows);
      expect_zero(name + " d down", dn, down_rows);
    }
  }
  const int64_t router = kExperts * H;
  std::vector<float> d_router(layer.g.router.data<float>(), layer.g.router.data<float>() + router);
  comm.all_reduce_sum(std::span<float>(d_router));
  expect_close(at + "d router summed over ranks", d_router.data(), ref_layer.g.router.data<float>(), router);

  std::vector<int64_t> counts(got.stats.counts.data<int64_t>(), got.stats.counts.data<int64_t>() + kExperts);
  counts.push_back(got.stats.valid_tokens);
  comm.all_reduce_sum(std::span<int64_t>(counts));
  for (int64_t e = 0; e < kExperts; ++e) EXPECT_EQ(counts[e], ref.stats.counts.data<int64_t>()[e]) << at << e;
  EXPECT_EQ(counts[kExperts], ref.stats.valid_tokens) << at;
  std::vector<double> prob_sum(got.stats.prob_sum.data<double>(), got.stats.prob_sum.data<double>() + kExperts);
  comm.all_reduce_sum(std::span<double>(prob_sum));
  for (int64_t e = 0; e < kExperts; ++e)
    EXPECT_NEAR(prob_sum[e], ref.stats.prob_sum.data<double>()[e], kRelTol * ref.stats.valid_tokens) << at << e;
  if (prefer_rank0) {
    EXPECT_EQ(counts[0] + counts[1], kTopK * counts[kExperts]) << at << "routing did not favour experts 0 and 1";
    if (me != 0) {
      EXPECT_EQ(saved.ep_rows, 0) << at;
    }
  }
}

TEST(MoeExpertParallel, EqualsLocalPathOnAllRanksTokens) {
  check_against_local(mpi_world(), [](int q) { return 5 + 3 * int64_t{q}; }, false);
}

// Every token picks experts 0 and 1: rank 0 receives all rows, the others none; the last rank has no tokens.
TEST(MoeExpertParallel, AllTokensToRankZerosExperts) {
  Comm& world = mpi_world();
  const int last = world.size() - 1;
  check_against_local(world, [last](int q) { return q == last && last > 0 ? int64_t{0} : 4 + int64_t{q}; }, true);
}

// A one-rank group runs every expert here, through the exchange: the local path's numbers, and a second step
// in the same arena repeats the first bit for bit taking the same bytes; an arena sized for fewer tokens is an
// error naming it.
TEST(MoeExpertParallel, GroupOfOneEqualsLocalPath) {
  TestMemory m;
  const Layer ref_layer = make_layer(m, false);
  const Tokens tok = make_tokens(m, 1, [](int) { return int64_t{13}; }, false);
  MoeSaved ref_saved;
  const Result ref = run_layer(m, base_config(), ref_layer, tok.x, tok.valid, tok.dy, tok.aux_dprob, ref_saved);
  EXPECT_FALSE(ref_saved.ep_x.defined());

  parallel::SelfComm self;
  parallel::CommExpertExchange exchange(self);
  MoeConfig cfg = base_config();
  cfg.exchange = &exchange;
  Arena rows("moe ep rows", moe_expert_rows_bytes(cfg, 13, 1));
  cfg.expert_rows = &rows;
  EXPECT_LT(moe_forward_arena_bytes(cfg, 13, DType::f32, true), moe_forward_arena_bytes(cfg, 13, DType::f32));
  const Layer layer = only_experts(m, ref_layer, 0, kExperts);
  MoeSaved saved;
  const Result got = run_layer(m, cfg, layer, tok.x, tok.valid, tok.dy, tok.aux_dprob, saved);
  const int64_t n = 13 * kHidden;
  expect_close("y", got.y.data<float>(), ref.y.data<float>(), n);
  expect_close("dx", got.dx.data<float>(), ref.dx.data<float>(), n);
  expect_close("d router", layer.g.router.data<float>(), ref_layer.g.router.data<float>(), layer.g.router.numel());
  expect_close("d gate_up", layer.g.gate_up.data<float>(), ref_layer.g.gate_up.data<float>(),
               layer.g.gate_up.numel());
  expect_close("d down", layer.g.down.data<float>(), ref_layer.g.down.data<float>(), layer.g.down.numel());
  EXPECT_EQ(saved.ep_rows, 13 * kTopK);
  const size_t held = rows.high_water();
  EXPECT_GE(held, sizeof(float) * 13 * kTopK * (kHidden + 2 * kFfn));

  rows.reset();  // as the workspace does at each forward
  const Layer again = only_experts(m, ref_layer, 0, kExperts);
  const Result second = run_layer(m, cfg, again, tok.x, tok.valid, tok.dy, tok.aux_dprob, saved);
  EXPECT_EQ(rows.high_water(), held);
  EXPECT_EQ(max_abs_diff(second.y, got.y), 0.0);
  EXPECT_EQ(max_abs_diff(second.dx, got.dx), 0.0);
  EXPECT_EQ(max_abs_diff(again.g.gate_up, layer.g.gate_up), 0.0);
  EXPECT_EQ(max_abs_diff(again.g.down, layer.g.down), 0.0);

  Arena small("moe ep rows for 5 tokens", moe_expert_rows_bytes(cfg, 5, 1));
  cfg.expert_rows = &small;
  MoeSaved too_many;
  const Layer third = only_experts(m, ref_layer, 0, kExperts);
  expect_error([&] { run_layer(m, cfg, third, tok.x, tok.valid, tok.dy, tok.aux_dprob, too_many); },
               "the forward of 26 received rows need");
  small.reset();
  expect_error([&] { run_layer(m, cfg, third, tok.x, tok.valid, tok.dy, tok.aux_dprob, too_many); },
               "arena 'moe ep rows for 5 tokens'");
}

// An exchange whose size does not divide E, and f64 weights, are refused before anything is sent.
class FixedSizeExchange final : public ExpertExchange {
 public:
  explicit FixedSizeExchange(int size) : size_(size) {}
  int size() const override { return size_; }
  int rank() const override { return 0; }
  void exchange_counts(std::span<const int64_t>, std::span<int64_t>) override { ADD_FAILURE() << "counts sent"; }
  void exchange_rows(const void*, std::span<const int64_t>, void*, std::span<const int64_t>, size_t) override {
    ADD_FAILURE() << "rows sent";
  }

 private:
  int size_;
};

TEST(MoeExpertParallel, RejectsIndivisibleExpertsNonF32AndLocalSaved) {
  TestMemory m;
  const Layer l = make_layer(m, false);
  const Tokens tok = make_tokens(m, 1, [](int) { return int64_t{3}; }, false);
  Result r{m.zeros({3, kHidden}), m.zeros({3, kHidden}),
           {m.zeros({kExperts}, DType::i64), m.zeros({kExperts}, DType::f64), 0}};
  Arena saved_arena("moe ep saved", moe_forward_arena_bytes(base_config(), 3, DType::f64));
  Arena scratch("moe ep scratch", moe_backward_scratch_bytes(base_config(), 3, DType::f32));
  FixedSizeExchange five(5), one(1);
  MoeConfig cfg = base_config();
  cfg.exchange = &five;
  MoeSaved saved;
  expect_error([&] { moe_forward(cfg, l.w, tok.x, tok.valid, saved_arena, saved, r.y, r.stats); },
               "num_experts 12 is not divisible by the expert-parallel group size 5");

  cfg.exchange = &one;
  const int64_t E = kExperts, H = kHidden, I = kFfn;
  const MoeWeights w64{m.zeros({E, H}, DType::f64), m.zeros({E, H, 2 * I}, DType::f64),
                       m.zeros({E, I, H}, DType::f64)};
  const Tensor x64 = m.zeros({3, H}, DType::f64), y64 = m.zeros({3, H}, DType::f64);
  expect_error([&] { moe_forward(cfg, w64, x64, tok.valid, saved_arena, saved, y64, r.stats); }, "f32 only");

  // Expert parallelism needs its rows arena.
  expect_error([&] { moe_forward(cfg, l.w, tok.x, tok.valid, saved_arena, saved, r.y, r.stats); },
               "expert parallelism needs MoeConfig::expert_rows");

  // A local forward's MoeSaved has no received rows for an expert-parallel backward.
  Arena rows("moe ep rows", moe_expert_rows_bytes(cfg, 3, 1));
  cfg.expert_rows = &rows;
  saved_arena.reset();
  moe_forward(base_config(), l.w, tok.x, tok.valid, saved_arena, saved, r.y, r.stats);
  expect_error([&] { moe_backward(cfg, l.w, tok.x, tok.valid, saved, tok.dy, Tensor(), r.dx, l.g, scratch); },
               "saved has no expert-parallel counts");
}

}  // namespace
}  // namespace q3vl::test
