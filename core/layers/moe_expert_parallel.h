// Private to core/layers (moe.cpp, moe_expert_parallel.cpp): the SwiGLU row kernels both MoE paths share and
// the expert-parallel halves of moe_forward / moe_backward, which replace the per-expert loop of the local path
// between the sort by expert and the per-token combine.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <cstring>

#include "core/layers/moe.h"

namespace q3vl::moe_detail {

template <class T>
void gather_rows(int64_t rows, int64_t H, int64_t K, const int64_t* pair, const T* src, T* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * H, src + (pair[r] / K) * H, sizeof(T) * H);
}

// a = silu(gate) * up for `rows` rows of a fused [rows, 2I] block (Eigen's vectorised exp).
template <class T>
void swiglu_rows(int64_t rows, int64_t I, const T* h, T* a) {
  using Vec = Eigen::Array<T, Eigen::Dynamic, 1>;
  for (int64_t r = 0; r < rows; ++r) {
    Eigen::Map<const Vec> g(h + r * 2 * I, I), u(h + r * 2 * I + I, I);
    Eigen::Map<Vec>(a + r * I, I) = g * u / ((-g).exp() + T(1));
  }
}

// Backward of weight * (silu(gate) * up) @ down for the rows of one expert. Row r's routing weight is
// weight[slot(r)] and its d loss / d weight goes to dweight[slot(r)] (the two may be the same array: the weight
// is read first). On entry grad_act holds dY @ down^T (unweighted); on exit it holds weight * act (the left
// operand of d down), dh holds d gate_up_out, and dweight = <dY @ down^T, act>.
template <class T, class Slot>
void swiglu_backward_rows(int64_t rows, int64_t I, const T* h, Slot slot, const T* weight, T* grad_act, T* dh,
                          T* dweight) {
  using Vec = Eigen::Array<T, Eigen::Dynamic, 1>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict g = h + r * 2 * I;
    const T* __restrict u = g + I;
    T* __restrict ga = grad_act + r * I;
    T* __restrict dg = dh + r * 2 * I;
    T* __restrict du = dg + I;
    Eigen::Map<const Vec> gv(g, I), uv(u, I), gav(ga, I);
    Eigen::Map<Vec> sig(dg, I);
    sig = ((-gv).exp() + T(1)).inverse();
    const int64_t at = slot(r);
    const T wt = weight[at];
    dweight[at] = (gav * gv * sig * uv).sum();
    for (int64_t j = 0; j < I; ++j) {
      const T s = dg[j], silu = g[j] * s, da = wt * ga[j];
      dg[j] = da * u[j] * s * (T(1) + g[j] * (T(1) - s));
      du[j] = da * silu;
      ga[j] = wt * silu * u[j];
    }
  }
}

// Both functions run on every rank of cfg.exchange's group, f32 only, after the caller checked the config
// (check_expert_parallel) and sorted this rank's `pairs` (token, slot) pairs by global expert (offsets [E + 1],
// sorted_pair [pairs] as in MoeSaved).

// Sends the x rows to their experts' owners, runs the local experts on what arrives (kept in saved.ep_*) and
// writes each sorted row's expert output to rows [pairs, H].
void expert_parallel_forward(const MoeConfig& cfg, const MoeWeights& w, const float* x, int64_t pairs,
                             const int64_t* offsets, const int64_t* sorted_pair, MoeSaved& saved, float* rows);

// Sends each sorted row's dy and routing weight (topk_weight [pairs], by pair) to its expert's owner, which
// accumulates its local experts' gate_up / down gradients; rows [pairs, H + 1] gets back each sorted row's
// d x (first H columns) and d loss / d routing weight (last column).
void expert_parallel_backward(const MoeConfig& cfg, const MoeWeights& w, const float* dy, const float* topk_weight,
                              int64_t pairs, const int64_t* offsets, const int64_t* sorted_pair,
                              const MoeSaved& saved, const MoeGradients& grads, float* rows);

// The expert-parallel preconditions (f32, E divisible by the group size), naming the layer function L.
void check_expert_parallel(const char* L, const MoeConfig& cfg, DType dtype);
// That saved holds an expert-parallel forward's buffers for this config.
void check_expert_parallel_saved(const char* L, const MoeConfig& cfg, const MoeSaved& saved);

}  // namespace q3vl::moe_detail
