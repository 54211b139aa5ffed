// Expert parallelism of the MoE block: the sorted (token, slot) rows go to the ranks owning their experts over an
// ExpertExchange (counts first, then rows), the owner regroups what arrives expert-major, runs its local experts'
// GEMMs (forward) or their backward with the weight gradients, and sends the result rows back in arrival order.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <vector>

#include "core/arena_layout.h"
#include "core/check.h"
#include "core/kernels/cpu/gemm.h"
#include "core/layer_checks.h"
#include "core/layers/moe_expert_parallel.h"

namespace q3vl {

namespace moe_detail {

namespace {

// The group's layout and where the received blocks lie. Block b = q * El + j holds the rows rank q sent for local
// expert j (counts[b] of them); it starts at row arrival[b] in arrival order (rank-major, as exchange_rows lands
// them) and at row grouped[b] in expert-major order (expert j: rank 0's block, rank 1's, ...).
struct Blocks {
  int ranks = 0, me = 0;
  int64_t local_experts = 0;  // El
  int64_t received = 0;       // M
  const int64_t* counts = nullptr;
  int64_t* arrival = nullptr;
  int64_t* grouped = nullptr;
  int64_t* send_rows = nullptr;  // [ranks] sorted rows of this rank for rank q's experts
  int64_t* recv_rows = nullptr;  // [ranks] rows arriving from rank q

  int64_t expert_start(int64_t j) const { return grouped[j]; }
  int64_t expert_rows(int64_t j) const {
    int64_t rows = 0;
    for (int q = 0; q < ranks; ++q) rows += counts[q * local_experts + j];
    return rows;
  }
};

// Lays out the blocks of `counts` (the received [P * El] matrix) in index (E + E + P + P entries, of
// MoeSaved::ep_blocks); offsets [E + 1] are this rank's sorted rows by global expert.
Blocks lay_out(const ExpertExchange& ex, int64_t E, const int64_t* offsets, const int64_t* counts, int64_t* index) {
  Blocks b;
  b.ranks = ex.size();
  b.me = ex.rank();
  b.local_experts = E / b.ranks;
  b.counts = counts;
  b.arrival = index;
  b.grouped = index + E;
  b.send_rows = index + 2 * E;
  b.recv_rows = b.send_rows + b.ranks;
  const int64_t El = b.local_experts;
  int64_t row = 0;
  for (int64_t i = 0; i < E; ++i) {
    b.arrival[i] = row;
    row += counts[i];
  }
  b.received = row;
  row = 0;
  for (int64_t j = 0; j < El; ++j)
    for (int q = 0; q < b.ranks; ++q) {
      b.grouped[q * El + j] = row;
      row += counts[q * El + j];
    }
  for (int q = 0; q < b.ranks; ++q) {
    b.send_rows[q] = offsets[(q + 1) * El] - offsets[q * El];
    b.recv_rows[q] = std::accumulate(counts + q * El, counts + (q + 1) * El, int64_t{0});
  }
  return b;
}

int64_t index_size(int64_t E, int ranks) { return 2 * E + 2 * ranks; }

// What the expert-rows arena holds, described once (core/arena_layout.h) for sizing and carving. Each layer keeps
// its counts and blocks' layout (carved before the count exchange: the last E entries of the layout carry the
// counts this rank sends) and then its M received rows for the backward; each direction borrows its transient
// rows after them.
template <class Carve>
void kept_counts(const MoeConfig& c, int P, MoeSaved& s, Carve&& carve) {
  s.ep_counts = carve({c.num_experts}, DType::i64);
  s.ep_blocks = carve({index_size(c.num_experts, P) + c.num_experts}, DType::i64);
}
template <class Carve>
void kept_rows(const MoeConfig& c, int64_t M, MoeSaved& s, Carve&& carve) {
  s.ep_x = carve({M, c.hidden}, DType::f32);
  s.ep_gate_up_out = carve({M, 2 * c.expert_ffn}, DType::f32);
}
// Forward: the arrived x rows (overwritten by the outputs sent back), the SwiGLU activations, the expert outputs.
struct ForwardRows {
  Tensor arrived, act, out;
};
template <class Carve>
ForwardRows forward_rows(const MoeConfig& c, int64_t M, Carve&& carve) {
  return {carve({M, c.hidden}, DType::f32), carve({M, c.expert_ffn}, DType::f32), carve({M, c.hidden}, DType::f32)};
}
// Backward: rows of dy and the routing weight (W = H + 1) as they arrive and expert-major (overwritten by d x and
// d weight), d act and d gate_up_out.
struct BackwardRows {
  Tensor arrived, grouped, grad_act, dh;
};
template <class Carve>
BackwardRows backward_rows(const MoeConfig& c, int64_t M, Carve&& carve) {
  const int64_t W = c.hidden + 1;
  return {carve({M, W}, DType::f32), carve({M, W}, DType::f32), carve({M, c.expert_ffn}, DType::f32),
          carve({M, 2 * c.expert_ffn}, DType::f32)};
}

// The expert-rows arena must hold `bytes` more: otherwise the error says why (a rank of the group has more
// tokens than the arena was sized for).
void require_room(const MoeConfig& c, const char* what, int64_t M, size_t bytes) {
  const Arena& a = *c.expert_rows;
  Q3VL_CHECK(a.capacity() - a.used() >= bytes, "moe expert parallelism: ", what, " of ", M,
             " received rows need ", bytes, " bytes of arena '", a.name(), "', which has ", a.capacity() - a.used(),
             " of ", a.capacity(), " left (it is sized by moe_expert_rows_bytes for the largest rank's tokens)");
}

// Copies every block of rows `width` floats wide from its start in `from` to its start in `to`.
void move_blocks(const Blocks& b, const int64_t* from, const int64_t* to, int64_t width, const float* src,
                 float* dst) {
  const int64_t blocks = b.ranks * b.local_experts;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < blocks; ++i)
    if (b.counts[i] > 0)
      std::memcpy(dst + to[i] * width, src + from[i] * width, sizeof(float) * b.counts[i] * width);
}

}  // namespace

void check_expert_parallel(const char* L, const MoeConfig& cfg, DType dtype) {
  const int P = cfg.exchange->size(), r = cfg.exchange->rank();
  Q3VL_CHECK(dtype == DType::f32, L, ": expert parallelism runs in f32 only, weights are ", dtype_name(dtype));
  Q3VL_CHECK(P >= 1 && r >= 0 && r < P, L, ": expert exchange has rank ", r, " of size ", P);
  Q3VL_CHECK(cfg.num_experts % P == 0, L, ": num_experts ", cfg.num_experts,
             " is not divisible by the expert-parallel group size ", P);
  Q3VL_CHECK(cfg.expert_rows != nullptr && cfg.expert_rows->device() == Device::cpu, L,
             ": expert parallelism needs MoeConfig::expert_rows, a host arena sized by moe_expert_rows_bytes");
}

void check_expert_parallel_saved(const char* L, const MoeConfig& cfg, const MoeSaved& saved) {
  const int64_t M = saved.ep_rows, E = cfg.num_experts, H = cfg.hidden, I = cfg.expert_ffn;
  Q3VL_CHECK(saved.ep_counts.defined() && saved.ep_blocks.defined(), L,
             ": saved has no expert-parallel counts (was the forward expert-parallel?)");
  require(L, "saved.ep_counts", saved.ep_counts, DType::i64, {E});
  require(L, "saved.ep_blocks", saved.ep_blocks, DType::i64, {index_size(E, cfg.exchange->size()) + E});
  const int64_t* counts = saved.ep_counts.data<int64_t>();
  Q3VL_CHECK(std::accumulate(counts, counts + E, int64_t{0}) == M, L, ": saved.ep_counts do not add up to saved.ep_rows = ",
             M);
  require(L, "saved.ep_x", saved.ep_x, DType::f32, {M, H});
  require(L, "saved.ep_gate_up_out", saved.ep_gate_up_out, DType::f32, {M, 2 * I});
}

void expert_parallel_forward(const MoeConfig& cfg, const MoeWeights& w, const float* x, int64_t pairs,
                             const int64_t* offsets, const int64_t* sorted_pair, MoeSaved& saved, float* rows) {
  ExpertExchange& ex = *cfg.exchange;
  Arena& arena = *cfg.expert_rows;
  const int64_t E = cfg.num_experts, H = cfg.hidden, I = cfg.expert_ffn, K = cfg.top_k;
  kept_counts(cfg, ex.size(), saved, ArenaCarver(arena));
  int64_t* index = saved.ep_blocks.data<int64_t>();
  // The last E entries carry the counts this rank sends: rows for each global expert.
  int64_t* send_counts = index + index_size(E, ex.size());
  for (int64_t e = 0; e < E; ++e) send_counts[e] = offsets[e + 1] - offsets[e];
  int64_t* counts = saved.ep_counts.data<int64_t>();
  ex.exchange_counts({send_counts, static_cast<size_t>(E)}, {counts, static_cast<size_t>(E)});
  const Blocks b = lay_out(ex, E, offsets, counts, index);
  const int64_t M = b.received, El = b.local_experts;
  saved.ep_rows = M;
  {
    ArenaSizer need;
    MoeSaved sizing;
    kept_rows(cfg, M, sizing, need);
    forward_rows(cfg, M, need);
    require_room(cfg, "the forward", M, need.bytes());
  }
  kept_rows(cfg, M, saved, ArenaCarver(arena));
  float* xr = saved.ep_x.data<float>();
  float* h = saved.ep_gate_up_out.data<float>();
  const size_t transient = arena.mark();
  const ForwardRows fr = forward_rows(cfg, M, ArenaCarver(arena));
  float* arrived = fr.arrived.data<float>();
  float* act = fr.act.data<float>();
  float* out = fr.out.data<float>();
  const std::span<const int64_t> send_rows(b.send_rows, b.ranks), recv_rows(b.recv_rows, b.ranks);

#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < pairs; ++i) std::memcpy(rows + i * H, x + (sorted_pair[i] / K) * H, sizeof(float) * H);
  ex.exchange_rows(rows, send_rows, arrived, recv_rows, sizeof(float) * H);
  move_blocks(b, b.arrival, b.grouped, H, arrived, xr);

  const float* gate_up = w.gate_up.data<float>();
  const float* down = w.down.data<float>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t j = 0; j < El; ++j) {
    const int64_t r0 = b.expert_start(j), ne = b.expert_rows(j), e = b.me * El + j;
    if (ne == 0) continue;
    cpu::gemm<float>(false, false, ne, 2 * I, H, 1.f, xr + r0 * H, H, gate_up + e * H * 2 * I, 2 * I, 0.f,
                     h + r0 * 2 * I, 2 * I);
    swiglu_rows<float>(ne, I, h + r0 * 2 * I, act + r0 * I);
    cpu::gemm<float>(false, false, ne, H, I, 1.f, act + r0 * I, I, down + e * I * H, H, 0.f, out + r0 * H, H);
  }

  move_blocks(b, b.grouped, b.arrival, H, out, arrived);
  ex.exchange_rows(arrived, recv_rows, rows, send_rows, sizeof(float) * H);
  arena.release(transient);
}

void expert_parallel_backward(const MoeConfig& cfg, const MoeWeights& w, const float* dy, const float* topk_weight,
                              int64_t pairs, const int64_t* offsets, const int64_t* sorted_pair,
                              const MoeSaved& saved, const MoeGradients& grads, float* rows) {
  ExpertExchange& ex = *cfg.exchange;
  const int64_t E = cfg.num_experts, H = cfg.hidden, I = cfg.expert_ffn, K = cfg.top_k, W = H + 1;
  Arena& arena = *cfg.expert_rows;
  const Blocks b = lay_out(ex, E, offsets, saved.ep_counts.data<int64_t>(), saved.ep_blocks.data<int64_t>());
  const int64_t M = b.received, El = b.local_experts;
  const float* xr = saved.ep_x.data<float>();
  const float* h = saved.ep_gate_up_out.data<float>();
  {
    ArenaSizer need;
    backward_rows(cfg, M, need);
    require_room(cfg, "the backward", M, need.bytes());
  }
  const size_t transient = arena.mark();
  const BackwardRows br = backward_rows(cfg, M, ArenaCarver(arena));
  float* arrived = br.arrived.data<float>();
  float* grouped = br.grouped.data<float>();
  float* grad_act = br.grad_act.data<float>();
  float* dh = br.dh.data<float>();
  const std::span<const int64_t> send_rows(b.send_rows, b.ranks), recv_rows(b.recv_rows, b.ranks);

  // Row i: dy of its token, then its routing weight.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < pairs; ++i) {
    std::memcpy(rows + i * W, dy + (sorted_pair[i] / K) * H, sizeof(float) * H);
    rows[i * W + H] = topk_weight[sorted_pair[i]];
  }
  ex.exchange_rows(rows, send_rows, arrived, recv_rows, sizeof(float) * W);
  move_blocks(b, b.arrival, b.grouped, W, arrived, grouped);

  const float* gate_up = w.gate_up.data<float>();
  const float* down = w.down.data<float>();
  float* dgate_up = grads.gate_up.data<float>();
  float* ddown = grads.down.data<float>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t j = 0; j < El; ++j) {
    const int64_t r0 = b.expert_start(j), ne = b.expert_rows(j), e = b.me * El + j;
    if (ne == 0) continue;
    // d: dy in the first H columns and the weight in the last, overwritten by d x and d weight.
    float* d = grouped + r0 * W;
    float* ga = grad_act + r0 * I;
    float* dhe = dh + r0 * 2 * I;
    cpu::gemm<float>(false, true, ne, I, H, 1.f, d, W, down + e * I * H, H, 0.f, ga, I);
    swiglu_backward_rows<float>(ne, I, h + r0 * 2 * I, [W, H](int64_t r) { return r * W + H; }, d, ga, dhe, d);
    cpu::gemm<float>(true, false, I, H, ne, 1.f, ga, I, d, W, 1.f, ddown + e * I * H, H);
    cpu::gemm<float>(true, false, H, 2 * I, ne, 1.f, xr + r0 * H, H, dhe, 2 * I, 1.f, dgate_up + e * H * 2 * I, 2 * I);
    cpu::gemm<float>(false, true, ne, H, 2 * I, 1.f, dhe, 2 * I, gate_up + e * H * 2 * I, 2 * I, 0.f, d, W);
  }

  move_blocks(b, b.grouped, b.arrival, W, grouped, arrived);
  ex.exchange_rows(arrived, recv_rows, rows, send_rows, sizeof(float) * W);
  arena.release(transient);
}

}  // namespace moe_detail

size_t moe_expert_rows_bytes(const MoeConfig& cfg, int64_t max_tokens, int moe_layers) {
  Q3VL_CHECK(cfg.exchange != nullptr && cfg.exchange->size() >= 1 && cfg.num_experts % cfg.exchange->size() == 0,
             "moe_expert_rows_bytes: needs the expert exchange, whose group size divides num_experts");
  Q3VL_CHECK(max_tokens >= 0 && moe_layers >= 0, "moe_expert_rows_bytes: max_tokens ", max_tokens, " and moe_layers ",
             moe_layers, " must be >= 0");
  const int P = cfg.exchange->size();
  const int64_t worst_rows = P * max_tokens * std::min(cfg.top_k, cfg.num_experts / P);
  ArenaSizer layer, forward, backward;
  MoeSaved sizing;
  moe_detail::kept_counts(cfg, P, sizing, layer);
  moe_detail::kept_rows(cfg, worst_rows, sizing, layer);
  moe_detail::forward_rows(cfg, worst_rows, forward);
  moe_detail::backward_rows(cfg, worst_rows, backward);
  return static_cast<size_t>(moe_layers) * layer.bytes() + std::max(forward.bytes(), backward.bytes());
}

}  // namespace q3vl
