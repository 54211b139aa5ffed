// MoE forward/backward on the CPU GEMM: router + softmax + top-k, a stable counting sort of the (token, slot)
// pairs by expert, one grouped GEMM per expert and projection (experts run in parallel, each GEMM on one
// thread), fused SwiGLU loops, and a per-token combine in slot order. With expert parallelism the expert GEMMs
// run on the experts' owners instead (moe_expert_parallel.cpp). Device tensors go to the CUDA backend
// (core/kernels/cuda/moe.cu). Also the pooled and per-layer aux losses.
#include "core/layers/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "core/arena_layout.h"
#include "core/kernels/cpu/gemm.h"
#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"
#include "core/layers/moe_expert_parallel.h"

namespace q3vl {

namespace {

using moe_detail::gather_rows;
using moe_detail::swiglu_backward_rows;
using moe_detail::swiglu_rows;

// The saved tensors, in carving order. Expert parallelism keeps gate_up_out on the experts' owners instead.
template <class Carve>
void saved_tensors(const MoeConfig& c, int64_t n, DType dt, bool expert_parallel, Carve&& carve, MoeSaved& s) {
  const int64_t pairs = n * c.top_k;
  s.probs = carve({n, c.num_experts}, dt);
  s.topk_expert = carve({n, c.top_k}, DType::i64);
  s.topk_weight = carve({n, c.top_k}, dt);
  s.expert_offsets = carve({c.num_experts + 1}, DType::i64);
  s.sorted_pair = carve({pairs}, DType::i64);
  s.pair_row = carve({pairs}, DType::i64);
  s.gate_up_out = expert_parallel ? Tensor{} : carve({pairs, 2 * c.expert_ffn}, dt);
}

// The forward's scratch after the saved tensors: the gathered rows of each expert (overwritten by its outputs)
// and, on the local path, the SwiGLU output.
struct ForwardScratch {
  Tensor rows, act;
};
template <class Carve>
ForwardScratch forward_scratch(const MoeConfig& c, int64_t n, DType dt, bool expert_parallel, Carve&& carve) {
  const int64_t pairs = n * c.top_k;
  ForwardScratch s;
  s.rows = carve({pairs, c.hidden}, dt);
  if (!expert_parallel) s.act = carve({pairs, c.expert_ffn}, dt);
  return s;
}

// The backward's scratch: per sorted row the gathered dy, then x, then d x (with expert parallelism one more
// column carries the routing weight out and its gradient back); the local path's activation gradient and d
// gate_up_out; d routing weights; d probs.
struct BackwardScratch {
  Tensor rows, act, dh, dweight, dprobs;
};
template <class Carve>
BackwardScratch backward_scratch(const MoeConfig& c, int64_t n, DType dt, bool expert_parallel, Carve&& carve) {
  const int64_t pairs = n * c.top_k;
  BackwardScratch s;
  s.rows = carve({pairs, expert_parallel ? c.hidden + 1 : c.hidden}, dt);
  if (!expert_parallel) {
    s.act = carve({pairs, c.expert_ffn}, dt);
    s.dh = carve({pairs, 2 * c.expert_ffn}, dt);
  }
  s.dweight = carve({pairs}, dt);
  s.dprobs = carve({n, c.num_experts}, dt);
  return s;
}

// The CUDA path's sizes, in the order core/kernels/cuda/moe.cu carves them: probabilities, routing weights
// and d routing weights in f32 (dt, the activation dtype, for the rest); the forward's scratch adds each
// token's routing margin (f64 [N]) and an i64 [E + 5] buffer through which the per-expert offsets, the
// valid-token count, the mask check and the minimum margin come back to the host in one read.
size_t device_forward_bytes(const MoeConfig& c, int64_t n, DType dt) {
  const int64_t pairs = n * c.top_k;
  const size_t saved = arena_bytes(n * c.num_experts, DType::f32) + arena_bytes(pairs, DType::i64) +
                       arena_bytes(pairs, DType::f32) + arena_bytes(c.num_experts + 1, DType::i64) +
                       arena_bytes(pairs, DType::i64) + arena_bytes(pairs, DType::i64) +
                       arena_bytes(pairs * 2 * c.expert_ffn, dt);
  return saved + arena_bytes(pairs * c.hidden, dt) + arena_bytes(pairs * c.expert_ffn, dt) +
         arena_bytes(n, DType::f64) + arena_bytes(c.num_experts + 5, DType::i64);
}
size_t device_backward_bytes(const MoeConfig& c, int64_t n, DType dt) {
  const int64_t pairs = n * c.top_k;
  return arena_bytes(pairs * c.hidden, dt) + arena_bytes(pairs * c.expert_ffn, dt) +
         arena_bytes(pairs * 2 * c.expert_ffn, dt) + arena_bytes(pairs, DType::f32) +
         arena_bytes(n * c.num_experts, dt);
}

// The valid mask as a predicate; no mask means every token is real.
struct ValidMask {
  const uint8_t* u8 = nullptr;
  bool operator()(int64_t t) const { return u8 ? u8[t] != 0 : true; }
};

void check_config(const char* L, const MoeConfig& c) {
  Q3VL_CHECK(c.hidden > 0 && c.num_experts > 0 && c.expert_ffn > 0, L, ": config needs positive hidden (",
             c.hidden, "), num_experts (", c.num_experts, ") and expert_ffn (", c.expert_ffn, ")");
  Q3VL_CHECK(c.top_k >= 1 && c.top_k <= c.num_experts, L, ": config top_k ", c.top_k,
             " must be in [1, num_experts = ", c.num_experts, "]");
}

// The three parameter tensors of weights or gradients.
void check_params(const char* L, const MoeConfig& c, const Tensor& router, const Tensor& gate_up, const Tensor& down,
                  DType dt, const char* prefix) {
  const int64_t E = c.num_experts, H = c.hidden, I = c.expert_ffn;
  const std::string p(prefix);
  require(L, (p + "router").c_str(), router, dt, {E, H});
  require(L, (p + "gate_up").c_str(), gate_up, dt, {E, H, 2 * I});
  require(L, (p + "down").c_str(), down, dt, {E, I, H});
}

ValidMask check_valid(const char* L, const Tensor& valid, int64_t n) {
  if (!valid.defined()) return {};
  require(L, "valid", valid, DType::u8, {n});
  ValidMask m;
  m.u8 = valid.data<uint8_t>();
  for (int64_t t = 0; t < n; ++t) {
    const int v = m.u8[t];
    Q3VL_CHECK(v == 0 || v == 1, L, ": valid[", t, "] = ", v, ", expected 0 (padding) or 1 (real token)");
  }
  return m;
}

void check_free(const char* L, const char* name, const Arena& arena, size_t need) {
  Q3VL_CHECK(arena.capacity() - arena.used() >= need, L, ": ", name, " '", arena.name(), "' has ",
             arena.capacity() - arena.used(), " bytes free, needs ", need);
}

// Softmax of each logits row in place, then its top-k by selection score p + bias (bias null: p; descending,
// equal values in increasing expert index) and the renormalised weights of the chosen probabilities.
template <class T>
void route(int64_t n, int64_t E, int64_t K, T* probs, const float* bias, int64_t* topk_expert, T* topk_weight) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    T* p = probs + t * E;
    T mx = p[0];
    for (int64_t e = 1; e < E; ++e) mx = p[e] > mx ? p[e] : mx;
    T sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      p[e] = std::exp(p[e] - mx);
      sum += p[e];
    }
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    int64_t* idx = topk_expert + t * K;
    T* val = topk_weight + t * K;  // the chosen scores while selecting
    int64_t filled = 0;
    for (int64_t e = 0; e < E; ++e) {
      const T score = bias ? p[e] + static_cast<T>(bias[e]) : p[e];
      // Strict comparisons keep an earlier (lower) expert ahead of a later one with the same score.
      if (filled == K && !(score > val[K - 1])) continue;
      int64_t j = filled < K ? filled++ : K - 1;
      for (; j > 0 && score > val[j - 1]; --j) {
        val[j] = val[j - 1];
        idx[j] = idx[j - 1];
      }
      val[j] = score;
      idx[j] = e;
    }
    T total = 0;
    for (int64_t s = 0; s < K; ++s) total += p[idx[s]];
    for (int64_t s = 0; s < K; ++s) val[s] = p[idx[s]] / total;
  }
}

// dst[t] (+)= sum over slots s of scale(t, s) * rows[pair_row[t*K + s]] (rows ld elements apart, H used),
// summed in slot order.
template <class T, class Scale>
void combine(int64_t n, int64_t H, int64_t K, const int64_t* pair_row, const T* rows, int64_t ld, bool accumulate,
             Scale scale, T* dst) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    T* __restrict out = dst + t * H;
    for (int64_t s = 0; s < K; ++s) {
      const T* __restrict src = rows + pair_row[t * K + s] * ld;
      const T c = scale(t * K + s);
      if (s == 0 && !accumulate) {
        for (int64_t j = 0; j < H; ++j) out[j] = c * src[j];
      } else {
        for (int64_t j = 0; j < H; ++j) out[j] += c * src[j];
      }
    }
  }
}

template <class T>
void forward_impl(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, ValidMask valid, Arena& arena,
                  MoeSaved& saved, const Tensor& y, MoeStats& stats) {
  const DType dt = dtype_of<T>();
  const int64_t n = x.size(0), H = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, I = cfg.expert_ffn;
  const int64_t pairs = n * K;
  const bool local = cfg.exchange == nullptr;
  saved_tensors(cfg, n, dt, !local, ArenaCarver(arena), saved);
  const size_t mark = arena.mark();
  const ForwardScratch scratch = forward_scratch(cfg, n, dt, !local, ArenaCarver(arena));
  T* rows = scratch.rows.data<T>();
  T* act = local ? scratch.act.data<T>() : nullptr;

  const T* xp = x.data<T>();
  T* probs = saved.probs.data<T>();
  int64_t* topk_expert = saved.topk_expert.data<int64_t>();
  T* topk_weight = saved.topk_weight.data<T>();
  int64_t* offsets = saved.expert_offsets.data<int64_t>();
  int64_t* sorted_pair = saved.sorted_pair.data<int64_t>();
  int64_t* pair_row = saved.pair_row.data<int64_t>();

  cpu::gemm<T>(false, true, n, E, H, T(1), xp, H, w.router.data<T>(), H, T(0), probs, E);
  const float* bias = w.score_bias.defined() ? w.score_bias.data<float>() : nullptr;
  route<T>(n, E, K, probs, bias, topk_expert, topk_weight);

  int64_t* counts = stats.counts.data<int64_t>();
  double* prob_sum = stats.prob_sum.data<double>();
  std::memset(counts, 0, sizeof(int64_t) * E);
  std::memset(prob_sum, 0, sizeof(double) * E);
  stats.valid_tokens = 0;
  stats.min_margin = std::numeric_limits<double>::infinity();
  stats.entropy_sum = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (!valid(t)) continue;
    ++stats.valid_tokens;
    const int64_t* chosen = topk_expert + t * K;
    const T* p = probs + t * E;
    for (int64_t s = 0; s < K; ++s) ++counts[chosen[s]];
    for (int64_t e = 0; e < E; ++e) {
      prob_sum[e] += p[e];
      if (p[e] > 0) stats.entropy_sum -= double(p[e]) * std::log(double(p[e]));
    }
    const auto score = [&](int64_t e) { return bias ? double(p[e] + static_cast<T>(bias[e])) : double(p[e]); };
    // The best expert left out: scores of the chosen ones are at least its score, so skip them by index.
    bool any_left_out = false;
    double left_out = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (std::find(chosen, chosen + K, e) != chosen + K) continue;
      left_out = any_left_out ? std::max(left_out, score(e)) : score(e);
      any_left_out = true;
    }
    if (!any_left_out) continue;
    const double last = score(chosen[K - 1]);
    stats.min_margin = std::min(stats.min_margin, bias ? last - left_out : std::log(last / left_out));
  }

  // Stable counting sort of pairs by expert: offsets[e + 1] counts, prefix sums, then offsets[e] serves as
  // expert e's write cursor (ending at its successor's start) and is shifted back afterwards.
  std::memset(offsets, 0, sizeof(int64_t) * (E + 1));
  for (int64_t p = 0; p < pairs; ++p) ++offsets[topk_expert[p] + 1];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t q = offsets[topk_expert[p]]++;
    sorted_pair[q] = p;
    pair_row[p] = q;
  }
  for (int64_t e = E; e > 0; --e) offsets[e] = offsets[e - 1];
  offsets[0] = 0;

  if constexpr (std::is_same_v<T, float>) {
    if (!local) moe_detail::expert_parallel_forward(cfg, w, xp, pairs, offsets, sorted_pair, saved, rows);
  }
  if (local) {
    T* gate_up_out = saved.gate_up_out.data<T>();
    const T* gate_up = w.gate_up.data<T>();
    const T* down = w.down.data<T>();
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = offsets[e], ne = offsets[e + 1] - r0;
      if (ne == 0) continue;
      T* xr = rows + r0 * H;
      T* h = gate_up_out + r0 * 2 * I;
      T* a = act + r0 * I;
      gather_rows<T>(ne, H, K, sorted_pair + r0, xp, xr);
      cpu::gemm<T>(false, false, ne, 2 * I, H, T(1), xr, H, gate_up + e * H * 2 * I, 2 * I, T(0), h, 2 * I);
      swiglu_rows<T>(ne, I, h, a);
      cpu::gemm<T>(false, false, ne, H, I, T(1), a, I, down + e * I * H, H, T(0), xr, H);
    }
  }

  combine<T>(n, H, K, pair_row, rows, H, false, [&](int64_t p) { return topk_weight[p]; }, y.data<T>());
  arena.release(mark);
}

template <class T>
void backward_impl(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, ValidMask valid,
                   const MoeSaved& saved, const Tensor& dy, const Tensor& aux_dprob, const Tensor& dx,
                   const MoeGradients& grads, Arena& arena) {
  const DType dt = dtype_of<T>();
  const int64_t n = x.size(0), H = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, I = cfg.expert_ffn;
  const int64_t pairs = n * K;
  const bool local = cfg.exchange == nullptr;
  // Expert parallelism: rows carry each sorted row's routing weight out and its d weight back in column H.
  const int64_t ld = local ? H : H + 1;
  const size_t mark = arena.mark();
  const BackwardScratch scratch = backward_scratch(cfg, n, dt, !local, ArenaCarver(arena));
  T* rows = scratch.rows.data<T>();
  T* act = local ? scratch.act.data<T>() : nullptr;
  T* dh = local ? scratch.dh.data<T>() : nullptr;
  T* dweight = scratch.dweight.data<T>();
  T* dprobs = scratch.dprobs.data<T>();

  const T* xp = x.data<T>();
  const T* dyp = dy.data<T>();
  const T* probs = saved.probs.data<T>();
  const int64_t* topk_expert = saved.topk_expert.data<int64_t>();
  const T* topk_weight = saved.topk_weight.data<T>();
  const int64_t* offsets = saved.expert_offsets.data<int64_t>();
  const int64_t* sorted_pair = saved.sorted_pair.data<int64_t>();
  const int64_t* pair_row = saved.pair_row.data<int64_t>();
  const bool want_dx = dx.defined();

  if constexpr (std::is_same_v<T, float>) {
    if (!local) {
      // The owners compute every row's d x (they cannot know whether this rank wants it).
      moe_detail::expert_parallel_backward(cfg, w, dyp, topk_weight, pairs, offsets, sorted_pair, saved, grads, rows);
      for (int64_t p = 0; p < pairs; ++p) dweight[p] = rows[pair_row[p] * ld + H];
    }
  }
  if (local) {
    const T* gate_up_out = saved.gate_up_out.data<T>();
    const T* gate_up = w.gate_up.data<T>();
    const T* down = w.down.data<T>();
    T* dgate_up = grads.gate_up.data<T>();
    T* ddown = grads.down.data<T>();
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = offsets[e], ne = offsets[e + 1] - r0;
      if (ne == 0) continue;
      T* r = rows + r0 * H;
      T* a = act + r0 * I;
      T* d = dh + r0 * 2 * I;
      const int64_t* pair = sorted_pair + r0;
      gather_rows<T>(ne, H, K, pair, dyp, r);
      cpu::gemm<T>(false, true, ne, I, H, T(1), r, H, down + e * I * H, H, T(0), a, I);
      swiglu_backward_rows<T>(ne, I, gate_up_out + r0 * 2 * I, [pair](int64_t i) { return pair[i]; }, topk_weight, a,
                              d, dweight);
      cpu::gemm<T>(true, false, I, H, ne, T(1), a, I, r, H, T(1), ddown + e * I * H, H);
      gather_rows<T>(ne, H, K, pair, xp, r);
      cpu::gemm<T>(true, false, H, 2 * I, ne, T(1), r, H, d, 2 * I, T(1), dgate_up + e * H * 2 * I, 2 * I);
      if (want_dx)
        cpu::gemm<T>(false, true, ne, H, 2 * I, T(1), d, 2 * I, gate_up + e * H * 2 * I, 2 * I, T(0), r, H);
    }
  }

  const T* aux = aux_dprob.defined() ? aux_dprob.data<T>() : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    const T* p = probs + t * E;
    T* dp = dprobs + t * E;
    const bool aux_here = aux != nullptr && valid(t);
    for (int64_t e = 0; e < E; ++e) dp[e] = aux_here ? aux[e] : T(0);
    // weight_s = p_s / S with S the sum of the chosen probabilities:
    // d loss / d p_s = (dweight_s - sum_s' dweight_s' weight_s') / S.
    T chosen = 0, projected = 0;
    for (int64_t s = 0; s < K; ++s) {
      chosen += p[topk_expert[t * K + s]];
      projected += dweight[t * K + s] * topk_weight[t * K + s];
    }
    for (int64_t s = 0; s < K; ++s) dp[topk_expert[t * K + s]] += (dweight[t * K + s] - projected) / chosen;
    T centre = 0;
    for (int64_t e = 0; e < E; ++e) centre += dp[e] * p[e];
    for (int64_t e = 0; e < E; ++e) dp[e] = p[e] * (dp[e] - centre);
  }

  cpu::gemm<T>(true, false, E, H, n, T(1), dprobs, E, xp, H, T(1), grads.router.data<T>(), H);
  if (want_dx) {
    T* dxp = dx.data<T>();
    cpu::gemm<T>(false, false, n, H, E, T(1), dprobs, E, w.router.data<T>(), H, T(0), dxp, H);
    combine<T>(n, H, K, pair_row, rows, ld, true, [](int64_t) { return T(1); }, dxp);
  }
  arena.release(mark);
}

}  // namespace

size_t moe_forward_arena_bytes(const MoeConfig& cfg, int64_t tokens, DType dtype, bool expert_parallel,
                               Device device) {
  if (device == Device::cuda) {
    Q3VL_CHECK(!expert_parallel, "moe_forward_arena_bytes: expert parallelism has no CUDA path");
    return device_forward_bytes(cfg, tokens, dtype);
  }
  ArenaSizer sizer;
  MoeSaved saved;
  saved_tensors(cfg, tokens, dtype, expert_parallel, sizer, saved);
  forward_scratch(cfg, tokens, dtype, expert_parallel, sizer);
  return sizer.bytes();
}

size_t moe_forward_transient_bytes(const MoeConfig& cfg, int64_t tokens, DType dtype, bool expert_parallel) {
  ArenaSizer sizer;
  forward_scratch(cfg, tokens, dtype, expert_parallel, sizer);
  return sizer.bytes();
}

size_t moe_backward_scratch_bytes(const MoeConfig& cfg, int64_t tokens, DType dtype, bool expert_parallel,
                                  Device device) {
  if (device == Device::cuda) {
    Q3VL_CHECK(!expert_parallel, "moe_backward_scratch_bytes: expert parallelism has no CUDA path");
    return device_backward_bytes(cfg, tokens, dtype);
  }
  ArenaSizer sizer;
  backward_scratch(cfg, tokens, dtype, expert_parallel, sizer);
  return sizer.bytes();
}

void moe_forward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                 Arena& saved_arena, MoeSaved& saved, const Tensor& y, MoeStats& stats) {
  if (on_cuda({&x, &w.router, &w.gate_up, &w.down, &valid, &y, &stats.counts, &stats.prob_sum}))
    return cuda_layers().moe_forward(cfg, w, x, valid, saved_arena, saved, y, stats);
  const char* L = "moe_forward";
  check_config(L, cfg);
  const DType dt = w.router.dtype();
  check_params(L, cfg, w.router, w.gate_up, w.down, dt, "w.");
  require(L, "x", x, dt, {-1, cfg.hidden});
  const int64_t n = x.size(0);
  require(L, "y", y, dt, {n, cfg.hidden});
  require(L, "stats.counts", stats.counts, DType::i64, {cfg.num_experts});
  require(L, "stats.prob_sum", stats.prob_sum, DType::f64, {cfg.num_experts});
  if (w.score_bias.defined()) require(L, "w.score_bias", w.score_bias, DType::f32, {cfg.num_experts});
  const ValidMask mask = check_valid(L, valid, n);
  if (cfg.exchange) moe_detail::check_expert_parallel(L, cfg, dt);
  check_free(L, "saved_arena", saved_arena, moe_forward_arena_bytes(cfg, n, dt, cfg.exchange != nullptr));
  dispatch_float(L, dt, [&](auto tag) {
    forward_impl<decltype(tag)>(cfg, w, x, mask, saved_arena, saved, y, stats);
  });
}

void moe_backward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                  const MoeSaved& saved, const Tensor& dy, const Tensor& aux_dprob, const Tensor& dx,
                  const MoeGradients& grads, Arena& scratch) {
  if (on_cuda({&x, &w.router, &w.gate_up, &w.down, &valid, &saved.probs, &dy, &aux_dprob, &dx, &grads.router,
               &grads.gate_up, &grads.down}))
    return cuda_layers().moe_backward(cfg, w, x, valid, saved, dy, aux_dprob, dx, grads, scratch);
  const char* L = "moe_backward";
  check_config(L, cfg);
  const DType dt = w.router.dtype();
  const int64_t E = cfg.num_experts, H = cfg.hidden, K = cfg.top_k, I = cfg.expert_ffn;
  check_params(L, cfg, w.router, w.gate_up, w.down, dt, "w.");
  check_params(L, cfg, grads.router, grads.gate_up, grads.down, dt, "grads.");
  require(L, "x", x, dt, {-1, H});
  const int64_t n = x.size(0);
  require(L, "dy", dy, dt, {n, H});
  if (dx.defined()) require(L, "dx", dx, dt, {n, H});
  if (aux_dprob.defined()) require(L, "aux_dprob", aux_dprob, dt, {E});
  require(L, "saved.probs", saved.probs, dt, {n, E});
  require(L, "saved.topk_expert", saved.topk_expert, DType::i64, {n, K});
  require(L, "saved.topk_weight", saved.topk_weight, dt, {n, K});
  require(L, "saved.expert_offsets", saved.expert_offsets, DType::i64, {E + 1});
  require(L, "saved.sorted_pair", saved.sorted_pair, DType::i64, {n * K});
  require(L, "saved.pair_row", saved.pair_row, DType::i64, {n * K});
  if (cfg.exchange) {
    moe_detail::check_expert_parallel(L, cfg, dt);
    moe_detail::check_expert_parallel_saved(L, cfg, saved);
  } else {
    require(L, "saved.gate_up_out", saved.gate_up_out, dt, {n * K, 2 * I});
  }
  const ValidMask mask = check_valid(L, valid, n);
  check_free(L, "scratch", scratch, moe_backward_scratch_bytes(cfg, n, dt, cfg.exchange != nullptr));
  dispatch_float(L, dt, [&](auto tag) {
    backward_impl<decltype(tag)>(cfg, w, x, mask, saved, dy, aux_dprob, dx, grads, scratch);
  });
}

namespace {

// The checks both aux losses share; returns the valid tokens summed over the layers.
int64_t check_aux_inputs(const char* L, int64_t num_experts, std::span<const MoeStats> layers, const Tensor& aux_dprob,
                         std::initializer_list<int64_t> dprob_shape) {
  Q3VL_CHECK(num_experts > 0, L, ": num_experts ", num_experts, " must be positive");
  int64_t total = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::string counts = "layers[" + std::to_string(l) + "].counts";
    const std::string prob_sum = "layers[" + std::to_string(l) + "].prob_sum";
    require(L, counts.c_str(), layers[l].counts, DType::i64, {num_experts});
    require(L, prob_sum.c_str(), layers[l].prob_sum, DType::f64, {num_experts});
    Q3VL_CHECK(layers[l].valid_tokens >= 0, L, ": layers[", l, "].valid_tokens ", layers[l].valid_tokens,
               " is negative");
    total += layers[l].valid_tokens;
  }
  if (aux_dprob.defined()) {
    Q3VL_CHECK(aux_dprob.dtype() == DType::f32 || aux_dprob.dtype() == DType::f64, L, ": aux_dprob has dtype ",
               dtype_name(aux_dprob.dtype()), ", expected f32 or f64");
    require(L, "aux_dprob", aux_dprob, aux_dprob.dtype(), dprob_shape);
  }
  return total;
}

void set_dprob(const char* L, const Tensor& aux_dprob, int64_t at, double g) {
  dispatch_float(L, aux_dprob.dtype(), [&](auto tag) {
    using T = decltype(tag);
    aux_dprob.data<T>()[at] = static_cast<T>(g);
  });
}

}  // namespace

double moe_aux_loss(int64_t num_experts, std::span<const MoeStats> layers, double coef, const Tensor& aux_dprob) {
  const char* L = "moe_aux_loss";
  const int64_t total = check_aux_inputs(L, num_experts, layers, aux_dprob, {num_experts});
  double aux = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    double count = 0, prob = 0;
    for (const MoeStats& s : layers) {
      count += static_cast<double>(s.counts.data<int64_t>()[e]);
      prob += s.prob_sum.data<double>()[e];
    }
    const double f = total > 0 ? count / static_cast<double>(total) : 0.0;
    const double P = total > 0 ? prob / static_cast<double>(total) : 0.0;
    aux += f * P;
    if (aux_dprob.defined())
      set_dprob(L, aux_dprob, e,
                total > 0 ? coef * static_cast<double>(num_experts) * f / static_cast<double>(total) : 0.0);
  }
  return static_cast<double>(num_experts) * aux;
}

double moe_aux_loss_per_layer(int64_t num_experts, std::span<const MoeStats> layers, double coef,
                              const Tensor& aux_dprob) {
  const char* L = "moe_aux_loss_per_layer";
  const int64_t num_layers = static_cast<int64_t>(layers.size());
  check_aux_inputs(L, num_experts, layers, aux_dprob, {num_layers, num_experts});
  if (num_layers == 0) return 0.0;
  const double E = static_cast<double>(num_experts), per_layer = 1.0 / static_cast<double>(num_layers);
  double aux = 0;
  for (int64_t l = 0; l < num_layers; ++l) {
    const MoeStats& s = layers[l];
    const double T = static_cast<double>(s.valid_tokens);
    double layer = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const double f = T > 0 ? static_cast<double>(s.counts.data<int64_t>()[e]) / T : 0.0;
      const double P = T > 0 ? s.prob_sum.data<double>()[e] / T : 0.0;
      layer += f * P;
      if (aux_dprob.defined()) set_dprob(L, aux_dprob, l * num_experts + e, T > 0 ? coef * E * f / T * per_layer : 0.0);
    }
    aux += E * layer;
  }
  return aux * per_layer;
}

}  // namespace q3vl
