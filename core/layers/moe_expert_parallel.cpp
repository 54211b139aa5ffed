// Expert parallelism of the MoE block: the sorted (token, slot) rows go to the ranks owning their experts over an
// ExpertExchange (counts first, then rows), the owner regroups what arrives expert-major, runs its local experts'
// GEMMs (forward) or their backward with the weight gradients, and sends the result rows back in arrival order.
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <vector>

#include "core/kernels/cpu/gemm.h"
#include "core/layers/moe_expert_parallel.h"

namespace q3vl {

namespace moe_detail {

namespace {

// The vectors are used from their first Arena::kAlign-aligned element, like arena memory: Eigen's element-wise
// kernels (exp, sums) run an unaligned head in scalar code that rounds differently, so results would otherwise
// depend on where the allocator put a buffer.
template <class T>
T* aligned_start(const std::vector<T>& v) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(v.data());
  return const_cast<T*>(v.data()) + (Arena::aligned(at) - at) / sizeof(T);
}
template <class T>
int64_t usable(const std::vector<T>& v) {
  return v.empty() ? 0 : static_cast<int64_t>(v.data() + v.size() - aligned_start(v));
}

// n aligned elements of v, which never shrinks (the buffers are reused across steps). Growth discards the old
// contents (every caller overwrites them), so nothing is copied, and allocates just what is needed.
template <class T>
T* grown(std::vector<T>& v, int64_t n) {
  if (usable(v) < n) {
    v.clear();
    v.reserve(static_cast<size_t>(n) + Arena::kAlign / sizeof(T));
    v.resize(v.capacity());
  }
  return aligned_start(v);
}

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

// Lays out the blocks of `counts` (the received [P * El] matrix) in index (E + E + P + P entries, from
// ex.index); offsets [E + 1] are this rank's sorted rows by global expert.
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
}

void check_expert_parallel_saved(const char* L, const MoeConfig& cfg, const MoeSaved& saved) {
  const int64_t M = saved.ep_rows, H = cfg.hidden, I = cfg.expert_ffn;
  Q3VL_CHECK(saved.ep_counts.size() == static_cast<size_t>(cfg.num_experts), L, ": saved.ep_counts holds ",
             saved.ep_counts.size(), " counts, expected num_experts = ", cfg.num_experts,
             " (was the forward expert-parallel?)");
  Q3VL_CHECK(std::accumulate(saved.ep_counts.begin(), saved.ep_counts.end(), int64_t{0}) == M, L,
             ": saved.ep_counts do not add up to saved.ep_rows = ", M);
  Q3VL_CHECK(usable(saved.ep_x) >= M * H && usable(saved.ep_gate_up_out) >= M * 2 * I, L,
             ": saved.ep_x / saved.ep_gate_up_out hold ", usable(saved.ep_x), " / ", usable(saved.ep_gate_up_out),
             " floats, fewer than ", M, " received rows need");
}

void expert_parallel_forward(const MoeConfig& cfg, const MoeWeights& w, const float* x, int64_t pairs,
                             const int64_t* offsets, const int64_t* sorted_pair, MoeSaved& saved, float* rows) {
  ExpertExchange& ex = *cfg.exchange;
  const int64_t E = cfg.num_experts, H = cfg.hidden, I = cfg.expert_ffn, K = cfg.top_k;
  int64_t* index = grown(ex.index, index_size(E, ex.size()) + E);
  // The first E entries carry the counts this rank sends: rows for each global expert.
  int64_t* send_counts = index + index_size(E, ex.size());
  for (int64_t e = 0; e < E; ++e) send_counts[e] = offsets[e + 1] - offsets[e];
  saved.ep_counts.resize(E);
  int64_t* counts = saved.ep_counts.data();
  ex.exchange_counts({send_counts, static_cast<size_t>(E)}, {counts, static_cast<size_t>(E)});
  const Blocks b = lay_out(ex, E, offsets, counts, index);
  const int64_t M = b.received, El = b.local_experts;
  saved.ep_rows = M;
  float* xr = grown(saved.ep_x, M * H);
  float* h = grown(saved.ep_gate_up_out, M * 2 * I);
  float* arrived = grown(ex.scratch, M * (2 * H + I));
  float* act = arrived + M * H;
  float* out = act + M * I;
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
}

void expert_parallel_backward(const MoeConfig& cfg, const MoeWeights& w, const float* dy, const float* topk_weight,
                              int64_t pairs, const int64_t* offsets, const int64_t* sorted_pair,
                              const MoeSaved& saved, const MoeGradients& grads, float* rows) {
  ExpertExchange& ex = *cfg.exchange;
  const int64_t E = cfg.num_experts, H = cfg.hidden, I = cfg.expert_ffn, K = cfg.top_k, W = H + 1;
  const Blocks b = lay_out(ex, E, offsets, saved.ep_counts.data(), grown(ex.index, index_size(E, ex.size())));
  const int64_t M = b.received, El = b.local_experts;
  const float* xr = aligned_start(saved.ep_x);
  const float* h = aligned_start(saved.ep_gate_up_out);
  float* arrived = grown(ex.scratch, M * (2 * W + 3 * I));
  float* grouped = arrived + M * W;
  float* grad_act = grouped + M * W;
  float* dh = grad_act + M * I;
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
}

}  // namespace moe_detail

size_t moe_expert_parallel_bytes(const MoeSaved& saved) {
  return sizeof(int64_t) * saved.ep_counts.capacity() +
         sizeof(float) * (saved.ep_x.capacity() + saved.ep_gate_up_out.capacity());
}

size_t expert_exchange_scratch_bytes(const ExpertExchange& exchange) {
  return sizeof(float) * exchange.scratch.capacity() + sizeof(int64_t) * exchange.index.capacity();
}

}  // namespace q3vl
