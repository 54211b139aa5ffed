// Sparse Mixture-of-Experts block of Qwen3-VL-MoE (HF Qwen3VLMoeTextSparseMoeBlock) with its backward, and
// the load-balancing aux loss (HF load_balancing_loss_func with an attention mask, pooled over layers).
//
// Forward: logits = x router^T; probs = softmax(logits) in the compute type; the top-k experts of each token
// by probability (descending; equal probabilities are taken in increasing expert index, which is also the slot
// order), or by probs + score_bias when the weights carry a bias (aux-loss-free balancing, below); weights =
// the k probabilities (never the bias) renormalised to sum 1; y = sum over slots of
// weight * down_e(silu(x gate_e) * (x up_e)). The (token, slot) pairs are sorted by expert with a stable
// counting sort so each expert runs one GEMM over all its rows; the per-token sum then runs in slot order, so
// no sum depends on how threads are scheduled.
#pragma once

#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl {

class ExpertExchange;

struct MoeConfig {
  int64_t hidden = 0;       // H
  int64_t num_experts = 0;  // E
  int64_t top_k = 0;        // k
  int64_t expert_ffn = 0;   // I
  // Expert parallelism (f32 only): when set, this rank computes only its local experts (see ExpertExchange)
  // and the (token, slot) rows travel to the rank owning their expert and back. Unset: every expert here.
  ExpertExchange* exchange = nullptr;
  // With exchange: where the expert-parallel rows live (host memory). moe_forward carves each layer's received
  // rows (kept for its backward: MoeSaved::ep_*) once the counts are known, and both directions borrow their
  // transient rows after them; sized by moe_expert_rows_bytes for the worst case, so nothing is allocated in
  // the step and a batch beyond the sizing is an error naming the arena.
  Arena* expert_rows = nullptr;
};

// Expert parallelism: the E experts are split over size() ranks in contiguous blocks, rank q owning experts
// [q * E / size(), (q + 1) * E / size()); weights and gradients of the other experts are never read or
// written on this rank. Implemented over a communicator in parallel/ (core never sees MPI). Every rank of the
// group calls the operations in the same order (the moe_forward / moe_backward of the same layer).
class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // send holds size() blocks of m counts (block q for rank q); recv (same length) gets block q = what rank q
  // sent to this rank.
  virtual void exchange_counts(std::span<const int64_t> send, std::span<int64_t> recv) = 0;
  // Rows of row_bytes bytes: send_rows[q] rows (back to back in rank order in `send`) go to rank q, and
  // recv_rows[q] rows from rank q land back to back in rank order in `recv`.
  virtual void exchange_rows(const void* send, std::span<const int64_t> send_rows, void* recv,
                             std::span<const int64_t> recv_rows, size_t row_bytes) = 0;

};

// The on-disk layouts: router is nn.Linear [E, H]; experts are x @ W with gate_up [E, H, 2I] (gate = first I
// columns, up = last I) and down [E, I, H]. All three share one float dtype (f32, or f64 in tests).
// score_bias: f32 [E] or undefined (none). Aux-loss-free load balancing (DeepSeek-V3): the top-k is chosen by
// probs + score_bias. DeepSeek-V3 adds its bias to sigmoid scores; with HF's softmax router it is added to the
// softmax probabilities (not the logits), so a bias is in probability units whatever the logits' scale. It
// only selects: combine weights, the aux loss and every gradient use the unbiased probabilities. It is state,
// not a parameter (MoeGradients has none); the CPU path only.
struct MoeWeights {
  Tensor router;
  Tensor gate_up;
  Tensor down;
  Tensor score_bias = {};  // initialised, so {router, gate_up, down} is a complete "no bias" initializer
};
// Gradients of the parameters, same shapes as their weights. score_bias has none: it is state.
struct MoeGradients {
  Tensor router;
  Tensor gate_up;
  Tensor down;
};

// What the backward needs, carved by moe_forward from its saved arena. Pair p = t * k + s is slot s of
// token t.
struct MoeSaved {
  Tensor probs;           // [N, E] router softmax
  Tensor topk_expert;     // i64 [N, k] chosen experts, slot order
  Tensor topk_weight;     // [N, k] renormalised routing weights
  Tensor expert_offsets;  // i64 [E + 1] rows of expert e are sorted rows [offsets[e], offsets[e + 1])
  Tensor sorted_pair;     // i64 [N * k] pair id of each sorted row (stable: increasing p within an expert)
  Tensor pair_row;        // i64 [N * k] inverse: sorted row of pair p
  Tensor gate_up_out;     // [N * k, 2I] x @ gate_up_e of each sorted row (local path; undefined with EP)

  // Expert parallelism only (P ranks, El = E / P local experts), carved from MoeConfig::expert_rows: how many
  // rows this rank's experts receive depends on the routing of every rank, so they are carved after the counts
  // arrive, exactly M rows.
  int64_t ep_rows = 0;     // M: rows received for the local experts from all ranks
  Tensor ep_counts;        // i64 [P * El] rows rank q sent for local expert j, at q * El + j
  Tensor ep_blocks;        // i64 [3 E + 2 P] the blocks' layout (arrival and expert-major starts, per-rank rows)
  Tensor ep_x;             // [M, H] received x rows, expert-major (expert j: rank 0's, rank 1's, ...)
  Tensor ep_gate_up_out;   // [M, 2I] ep_x @ gate_up of each row's expert
};

// Per-layer routing statistics of the real (valid) tokens, written by moe_forward.
struct MoeStats {
  Tensor counts;    // i64 [E] (valid token, slot) pairs routed to e (caller-provided)
  Tensor prob_sum;  // f64 [E] sum over valid tokens of probs[:, e] (caller-provided)
  int64_t valid_tokens = 0;
  // Routing margin: the smallest log(p_k / p_{k+1}) over valid tokens, the router-logit gap between the last
  // chosen expert and the best one left out (infinity when there is none: no valid token, or k == E). Below
  // the fp32 noise of the logits a token's expert set can differ between runs that differ only in summation
  // order (another layout, another CPU), which changes that expert's gradient far beyond summation noise.
  // With a score_bias it is the gap of the selection scores p + bias instead (probability units).
  double min_margin = std::numeric_limits<double>::infinity();
  // Sum over valid tokens of the router softmax entropy -sum_e p_e log p_e (expert-health metrics); NaN from
  // the CUDA path, which does not compute it yet.
  double entropy_sum = 0;
};

// Bytes moe_forward takes from its saved arena for N tokens: the MoeSaved tensors (kept) plus the forward's
// scratch (released before it returns), alignment included.
// expert_parallel: sized for the expert-parallel path (cfg.exchange set), which keeps no expert outputs here.
// device: where the layer runs; the CUDA path (core/kernels/cuda/moe.cu, no expert parallelism) keeps the
// router probabilities and routing weights in f32 whatever the activation dtype (f32 or bf16).
size_t moe_forward_arena_bytes(const MoeConfig& cfg, int64_t tokens, DType dtype, bool expert_parallel = false,
                               Device device = Device::cpu);
// The part of moe_forward_arena_bytes the forward only borrows (released before it returns); CPU path.
size_t moe_forward_transient_bytes(const MoeConfig& cfg, int64_t tokens, DType dtype, bool expert_parallel = false);
// Bytes moe_backward takes (and releases) from its scratch arena for N tokens.
size_t moe_backward_scratch_bytes(const MoeConfig& cfg, int64_t tokens, DType dtype, bool expert_parallel = false,
                                  Device device = Device::cpu);

// x [N, H]; valid: u8 [N] of 0/1 (1 = real token; the model's one padding encoding, BatchPlan::valid), or
// undefined for all valid; y [N, H] written.
// Padding tokens are routed and computed like the others (as in HF) but left out of `stats`.
// With cfg.exchange (f32, E divisible by the group size) routing, stats and the sort by expert stay here (global
// expert ids); the x rows travel to the ranks owning their experts, which run the expert GEMMs and send the
// outputs back for the same per-token combine. Every rank of the group must call it (with 0 tokens too).
void moe_forward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                 Arena& saved_arena, MoeSaved& saved, const Tensor& y, MoeStats& stats);

// dx [N, H] written when defined; grads (router, gate_up, down) accumulated (+=). aux_dprob [E] (from
// moe_aux_loss, coefficient included) adds aux_dprob[e] to d loss / d probs[t, e] of every valid token; pass
// it undefined when the aux loss is off. Gradients flow through the renormalised weights and the softmax.
// With cfg.exchange the dy rows and their routing weights travel to the expert owners, which accumulate the
// gate_up / down gradients of their local experts only (rows of other experts untouched; no reduction over
// the group needed) and send back the dx rows and d routing weights; grads.router gets this rank's tokens'
// share only (sum it over ranks like any replicated weight).
void moe_backward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                  const MoeSaved& saved, const Tensor& dy, const Tensor& aux_dprob, const Tensor& dx,
                  const MoeGradients& grads, Arena& scratch);

// Bytes of MoeConfig::expert_rows for `moe_layers` layers of cfg (exchange set: its group size P) when no rank
// of the group has more than `max_tokens` tokens: the worst case the layout allows, each rank receiving all
// P x max_tokens tokens' rows for min(k, E / P) of its experts, per layer, plus one direction's transient rows.
// Balanced routing uses about 1 / P of it; the trainer reports the high-water mark.
size_t moe_expert_rows_bytes(const MoeConfig& cfg, int64_t max_tokens, int moe_layers);

// Pools the stats of L layers: T = sum of valid tokens, f_e = counts_e / T, P_e = prob_sum_e / T, and returns
// aux = E * sum_e f_e P_e (0 when T = 0). When aux_dprob ([E], f32 or f64) is defined it is written with
// coef * d aux / d probs[t, e] = coef * E * f_e / T, the same for every valid token of every layer.
double moe_aux_loss(int64_t num_experts, std::span<const MoeStats> layers, double coef, const Tensor& aux_dprob);

// The per-layer variant: the mean over the L layers of each layer's own balance loss E * sum_e f_le P_le (f, P
// over that layer's T_l valid tokens; a layer with T_l = 0 counts 0), so one layer's collapse cannot hide
// behind another's balance. When aux_dprob ([L, E], f32 or f64) is defined, row l is written with
// coef * E * f_le / (T_l * L), the d / d probs[t, e] of every valid token of layer l.
double moe_aux_loss_per_layer(int64_t num_experts, std::span<const MoeStats> layers, double coef,
                              const Tensor& aux_dprob);

}  // namespace q3vl
