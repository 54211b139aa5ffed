// The reference MoE expert path on the device (core/layers/moe.h's contract; no expert parallelism): right and
// deterministic, not yet fast (part 2 replaces the per-expert loop with grouped kernels).
//
// Forward: router logits by cuBLASLt into f32; per token (one thread) the softmax in fp32, the top-k by the
// CPU's own insertion (descending probability, equal values in increasing expert index), the routing margin
// and the renormalisation; per expert (one thread scanning the tokens in order) the routing statistics and row
// count; a stable counting sort of the (token, slot) pairs by expert (one thread per expert scanning the pairs
// in order, so rows of an expert are in increasing pair id); then one GEMM per expert and projection over its
// contiguous rows, SwiGLU, and the per-token combine in slot order. Backward: the same per-expert GEMMs, the SwiGLU backward (d routing
// weight per row by one warp in a fixed shuffle order), the router gradient through the renormalised top-k and
// the softmax per token (one thread), parameter gradients accumulated (+=) by GEMMs with beta 1.
//
// Dtypes: x, weights, y, dx, saved.gate_up_out and the scratch rows f32 or bf16 (fp32 arithmetic); router
// probabilities, routing weights and d routing weights f32; stats i64 / f64 on the device; parameter gradients
// f32 or the weights' dtype; aux_dprob f32 or the weights' dtype.
//
// Host synchronisation: the host must know each expert's row count to size its GEMMs. The forward reads back
// one i64 [E + 5] buffer (expert offsets, the valid-token count for stats.valid_tokens, the first valid mask
// value that is not 0/1, and stats.min_margin); the backward reads saved.expert_offsets [E + 1] once. Nothing
// else waits.
#include <cuda_bf16.h>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "core/device.h"
#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/gemm.h"
#include "core/kernels/cuda/layers_impl.h"
#include "core/layers/moe.h"

namespace q3vl::cuda {

namespace {

// The valid mask (u8, or none: every token real); nonzero is real (the host checks for 0/1).
struct Mask {
  const uint8_t* u8 = nullptr;
  __device__ int64_t value(int64_t t) const { return u8 ? int64_t(u8[t]) : 1; }
  __device__ bool operator()(int64_t t) const { return value(t) != 0; }
};

Mask mask_of(const Tensor& valid) {
  Mask m;
  if (!valid.defined()) return m;
  m.u8 = static_cast<const uint8_t*>(valid.raw());
  return m;
}

#define Q3VL_GRID_STRIDE(i, n)                                                            \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// probs holds the logits [n, E] on entry and the softmax on exit; then the top-k (the CPU's insertion: strict
// comparisons keep a lower expert ahead of a higher one with the same probability), the token's routing
// margin log(p_k / best left-out p) in f64 as the CPU forms it (infinity when k = E), and the renormalisation.
__global__ void route_tokens(int64_t n, int64_t E, int64_t K, float* probs, int64_t* topk_expert,
                             float* topk_weight, double* margin) {
  Q3VL_GRID_STRIDE(t, n) {
    float* p = probs + t * E;
    float mx = p[0];
    for (int64_t e = 1; e < E; ++e) mx = p[e] > mx ? p[e] : mx;
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      p[e] = expf(p[e] - mx);
      sum += p[e];
    }
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    int64_t* idx = topk_expert + t * K;
    float* val = topk_weight + t * K;
    int64_t filled = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (filled == K && !(p[e] > val[K - 1])) continue;
      int64_t j = filled < K ? filled++ : K - 1;
      for (; j > 0 && p[e] > val[j - 1]; --j) {
        val[j] = val[j - 1];
        idx[j] = idx[j - 1];
      }
      val[j] = p[e];
      idx[j] = e;
    }
    double left_out = -1.0;
    for (int64_t e = 0; e < E; ++e) {
      bool chosen = false;
      for (int64_t s = 0; s < K; ++s) chosen = chosen || idx[s] == e;
      if (!chosen) left_out = fmax(left_out, static_cast<double>(p[e]));
    }
    margin[t] = left_out >= 0.0 ? log(static_cast<double>(val[K - 1]) / left_out) : INFINITY;
    float total = 0.0f;
    for (int64_t s = 0; s < K; ++s) total += val[s];
    for (int64_t s = 0; s < K; ++s) val[s] /= total;
  }
}

// One thread per expert, tokens in order: rows routed to e (all tokens; offsets[e + 1] before the prefix sum),
// and the stats of the valid tokens (pairs routed to e, sum of probs[:, e] in f64).
__global__ void expert_stats(int64_t n, int64_t E, int64_t K, const float* probs, const int64_t* topk_expert,
                             Mask valid, int64_t* offsets, int64_t* counts, double* prob_sum) {
  Q3VL_GRID_STRIDE(e, E) {
    int64_t rows = 0, count = 0;
    double ps = 0.0;
    for (int64_t t = 0; t < n; ++t) {
      const bool real = valid(t);
      if (real) ps += static_cast<double>(probs[t * E + e]);
      for (int64_t s = 0; s < K; ++s) {
        if (topk_expert[t * K + s] != e) continue;
        ++rows;
        if (real) ++count;
      }
    }
    offsets[e + 1] = rows;
    counts[e] = count;
    prob_sum[e] = ps;
  }
}

constexpr int kSummaryThreads = 1024;

// One block: the valid-token count, the first token whose mask is not 0/1, and the minimum margin over valid
// tokens (exact operations, so the tree order does not matter); then thread 0 turns the row counts in
// offsets[1..E] into offsets (prefix sum from offsets[0] = 0) and fills readback [E + 5]: offsets, the count,
// the bad token (-1 if none) and its value, the margin's bits.
__global__ void summarise(int64_t n, int64_t E, Mask valid, const double* margin, int64_t* offsets,
                          int64_t* readback) {
  __shared__ int64_t real_s[kSummaryThreads], bad_s[kSummaryThreads];
  __shared__ double margin_s[kSummaryThreads];
  const int tid = threadIdx.x;
  int64_t real = 0, bad = n;
  double m = INFINITY;
  for (int64_t t = tid; t < n; t += blockDim.x) {
    const int64_t v = valid.value(t);
    if (v != 0 && v != 1 && t < bad) bad = t;
    if (v != 0) {
      ++real;
      m = fmin(m, margin[t]);
    }
  }
  real_s[tid] = real;
  bad_s[tid] = bad;
  margin_s[tid] = m;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (tid < half) {
      real_s[tid] += real_s[tid + half];
      bad_s[tid] = bad_s[tid] < bad_s[tid + half] ? bad_s[tid] : bad_s[tid + half];
      margin_s[tid] = fmin(margin_s[tid], margin_s[tid + half]);
    }
    __syncthreads();
  }
  if (tid != 0) return;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  for (int64_t e = 0; e <= E; ++e) readback[e] = offsets[e];
  readback[E + 1] = real_s[0];
  readback[E + 2] = bad_s[0] < n ? bad_s[0] : -1;
  readback[E + 3] = bad_s[0] < n ? valid.value(bad_s[0]) : 0;
  readback[E + 4] = __double_as_longlong(margin_s[0]);
}

// Stable counting sort: expert e's thread walks the pairs in increasing id, writing them from offsets[e] on.
__global__ void sort_by_expert(int64_t pairs, int64_t E, const int64_t* topk_expert, const int64_t* offsets,
                               int64_t* sorted_pair, int64_t* pair_row) {
  Q3VL_GRID_STRIDE(e, E) {
    int64_t q = offsets[e];
    for (int64_t p = 0; p < pairs; ++p) {
      if (topk_expert[p] != e) continue;
      sorted_pair[q] = p;
      pair_row[p] = q;
      ++q;
    }
  }
}

// dst[r] = src[token of sorted row r] (rows of H).
template <class T>
__global__ void gather_rows(int64_t rows, int64_t H, int64_t K, const int64_t* sorted_pair, const T* src, T* dst) {
  Q3VL_GRID_STRIDE(i, rows * H) {
    const int64_t r = i / H, j = i % H;
    dst[i] = src[(sorted_pair[r] / K) * H + j];
  }
}

// a = silu(gate) * up of each row of h [rows, 2I] (gate first), as the CPU: g * u / (exp(-g) + 1).
template <class T>
__global__ void swiglu_rows(int64_t rows, int64_t I, const T* h, T* a) {
  Q3VL_GRID_STRIDE(i, rows * I) {
    const int64_t r = i / I, j = i % I;
    const float g = to_float(h[r * 2 * I + j]), u = to_float(h[r * 2 * I + I + j]);
    a[i] = from_float<T>(g * u / (expf(-g) + 1.0f));
  }
}

// out[t] (+)= sum over slots s, in slot order, of scale_s * rows[pair_row[t * K + s]] (scale = the routing
// weight, or 1 when weight is null); accumulate adds to what out holds.
template <class T>
__global__ void combine(int64_t n, int64_t H, int64_t K, const int64_t* pair_row, const T* rows, const float* weight,
                        bool accumulate, T* out) {
  Q3VL_GRID_STRIDE(i, n * H) {
    const int64_t t = i / H, j = i % H;
    float acc = accumulate ? to_float(out[i]) : 0.0f;
    for (int64_t s = 0; s < K; ++s) {
      const float v = to_float(rows[pair_row[t * K + s] * H + j]);
      acc += weight ? weight[t * K + s] * v : v;
    }
    out[i] = from_float<T>(acc);
  }
}

// d loss / d routing weight of each sorted row: <dY down^T, silu(gate) * up> (ga holds dY down^T), one warp per
// row, lanes striding the row and a fixed butterfly: the same order on every run.
template <class T>
__global__ void swiglu_dweight(int64_t rows, int64_t I, const T* h, const T* ga, const int64_t* sorted_pair,
                               float* dweight) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x % 32;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    float acc = 0.0f;
    for (int64_t j = lane; j < I; j += 32) {
      const float g = to_float(h[r * 2 * I + j]), u = to_float(h[r * 2 * I + I + j]);
      const float sig = 1.0f / (expf(-g) + 1.0f);
      acc += to_float(ga[r * I + j]) * g * sig * u;
    }
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) dweight[sorted_pair[r]] = acc;
  }
}

// The rest of the SwiGLU backward per element (the CPU's formulas): with da = weight * ga,
// d gate = da * u * s * (1 + g (1 - s)), d up = da * silu(g); ga becomes weight * silu(g) * u (the left operand
// of d down).
template <class T>
__global__ void swiglu_backward(int64_t rows, int64_t I, const T* h, const int64_t* sorted_pair,
                                const float* topk_weight, T* ga, T* dh) {
  Q3VL_GRID_STRIDE(i, rows * I) {
    const int64_t r = i / I, j = i % I;
    const float g = to_float(h[r * 2 * I + j]), u = to_float(h[r * 2 * I + I + j]);
    const float wt = topk_weight[sorted_pair[r]];
    const float s = 1.0f / (expf(-g) + 1.0f), silu = g * s, da = wt * to_float(ga[i]);
    dh[r * 2 * I + j] = from_float<T>(da * u * s * (1.0f + g * (1.0f - s)));
    dh[r * 2 * I + I + j] = from_float<T>(da * silu);
    ga[i] = from_float<T>(wt * silu * u);
  }
}

// d loss / d logits of each token (one thread, experts in order as the CPU): dp = aux (valid tokens) plus
// (dweight_s - sum_s' dweight_s' weight_s') / S at the chosen experts (S = their probability sum), then the
// softmax backward p * (dp - <dp, p>). dp is recomputed for the second pass instead of stored.
template <class T, class A>
__global__ void router_backward(int64_t n, int64_t E, int64_t K, const float* probs, const int64_t* topk_expert,
                                const float* topk_weight, const float* dweight, const A* aux, Mask valid,
                                T* dprobs) {
  Q3VL_GRID_STRIDE(t, n) {
    const float* p = probs + t * E;
    const int64_t* idx = topk_expert + t * K;
    const bool aux_here = aux != nullptr && valid(t);
    float chosen = 0.0f, projected = 0.0f;
    for (int64_t s = 0; s < K; ++s) {
      chosen += p[idx[s]];
      projected += dweight[t * K + s] * topk_weight[t * K + s];
    }
    auto dp = [&](int64_t e) {
      float v = aux_here ? to_float(aux[e]) : 0.0f;
      for (int64_t s = 0; s < K; ++s)
        if (idx[s] == e) v += (dweight[t * K + s] - projected) / chosen;
      return v;
    };
    float centre = 0.0f;
    for (int64_t e = 0; e < E; ++e) centre += dp(e) * p[e];
    for (int64_t e = 0; e < E; ++e) dprobs[t * E + e] = from_float<T>(p[e] * (dp(e) - centre));
  }
}

void check_config(const char* L, const MoeConfig& c) {
  Q3VL_CHECK(c.hidden > 0 && c.num_experts > 0 && c.expert_ffn > 0, L, ": config needs positive hidden (",
             c.hidden, "), num_experts (", c.num_experts, ") and expert_ffn (", c.expert_ffn, ")");
  Q3VL_CHECK(c.top_k >= 1 && c.top_k <= c.num_experts, L, ": config top_k ", c.top_k,
             " must be in [1, num_experts = ", c.num_experts, "]");
  Q3VL_CHECK(c.exchange == nullptr, L, ": expert parallelism (cfg.exchange) is not supported on the CUDA device; "
             "the reference expert path runs every expert on this device");
}

void check_weights(const char* L, const MoeConfig& c, const MoeWeights& w, DType dt) {
  const int64_t E = c.num_experts, H = c.hidden, I = c.expert_ffn;
  require_device(L, "w.router", w.router, dt, {E, H});
  require_device(L, "w.gate_up", w.gate_up, dt, {E, H, 2 * I});
  require_device(L, "w.down", w.down, dt, {E, I, H});
}

void check_valid(const char* L, const Tensor& valid, int64_t n) {
  if (!valid.defined()) return;
  require_device(L, "valid", valid, DType::u8, {n});
}

void check_arena(const char* L, const char* name, const Arena& arena, size_t need) {
  Q3VL_CHECK(arena.device() == Device::cuda, L, ": ", name, " '", arena.name(),
             "' is host memory, but the layer runs on the CUDA device");
  Q3VL_CHECK(arena.capacity() - arena.used() >= need, L, ": ", name, " '", arena.name(), "' has ",
             arena.capacity() - arena.used(), " bytes free, needs ", need);
}

// Element `i` of a device buffer of dtype dt.
void* at(void* base, int64_t i, DType dt) { return static_cast<char*>(base) + i * static_cast<int64_t>(dtype_size(dt)); }

template <class T>
void forward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid, Arena& arena,
             MoeSaved& saved, const Tensor& y, MoeStats& stats) {
  const DType dt = x.dtype();
  const int64_t n = x.size(0), H = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, I = cfg.expert_ffn;
  const int64_t pairs = n * K;
  const cudaStream_t stream = context().stream;
  const Mask mask = mask_of(valid);
  const size_t start = arena.mark();
  saved.probs = Tensor::empty(arena, {n, E}, DType::f32);
  saved.topk_expert = Tensor::empty(arena, {n, K}, DType::i64);
  saved.topk_weight = Tensor::empty(arena, {n, K}, DType::f32);
  saved.expert_offsets = Tensor::empty(arena, {E + 1}, DType::i64);
  saved.sorted_pair = Tensor::empty(arena, {pairs}, DType::i64);
  saved.pair_row = Tensor::empty(arena, {pairs}, DType::i64);
  saved.gate_up_out = Tensor::empty(arena, {pairs, 2 * I}, dt);
  const size_t mark = arena.mark();
  // Gathered x rows of each expert, overwritten in place by that expert's outputs.
  T* rows = static_cast<T*>(Tensor::empty(arena, {pairs, H}, dt).raw());
  T* act = static_cast<T*>(Tensor::empty(arena, {pairs, I}, dt).raw());
  double* margin = static_cast<double*>(Tensor::empty(arena, {n}, DType::f64).raw());
  const Tensor readback = Tensor::empty(arena, {E + 5}, DType::i64);

  float* probs = static_cast<float*>(saved.probs.raw());
  int64_t* topk_expert = static_cast<int64_t*>(saved.topk_expert.raw());
  float* topk_weight = static_cast<float*>(saved.topk_weight.raw());
  int64_t* offsets = static_cast<int64_t*>(saved.expert_offsets.raw());
  int64_t* sorted_pair = static_cast<int64_t*>(saved.sorted_pair.raw());
  int64_t* pair_row = static_cast<int64_t*>(saved.pair_row.raw());
  T* gate_up_out = static_cast<T*>(saved.gate_up_out.raw());
  const T* xp = static_cast<const T*>(x.raw());

  gemm(false, true, n, E, H, 1.0f, xp, H, w.router.raw(), H, 0.0f, probs, E, dt, DType::f32);
  route_tokens<<<blocks_for(n), kThreads, 0, stream>>>(n, E, K, probs, topk_expert, topk_weight, margin);
  Q3VL_CUDA_LAUNCHED("route_tokens");
  expert_stats<<<blocks_for(E), kThreads, 0, stream>>>(n, E, K, probs, topk_expert, mask, offsets,
                                                         static_cast<int64_t*>(stats.counts.raw()),
                                                         static_cast<double*>(stats.prob_sum.raw()));
  Q3VL_CUDA_LAUNCHED("expert_stats");
  summarise<<<1, kSummaryThreads, 0, stream>>>(n, E, mask, margin, offsets, static_cast<int64_t*>(readback.raw()));
  Q3VL_CUDA_LAUNCHED("summarise");
  sort_by_expert<<<blocks_for(E), kThreads, 0, stream>>>(pairs, E, topk_expert, offsets, sorted_pair, pair_row);
  Q3VL_CUDA_LAUNCHED("sort_by_expert");

  // The layer's one wait: the per-expert row counts size the GEMMs below.
  std::vector<int64_t> host(static_cast<size_t>(E + 5));
  copy_bytes(host.data(), Device::cpu, readback.raw(), Device::cuda, host.size() * sizeof(int64_t));
  if (host[E + 2] >= 0) {
    arena.release(start);
    Q3VL_FAIL("moe_forward: valid[", host[E + 2], "] = ", host[E + 3],
              ", expected 0 (padding) or 1 (real token)");
  }
  stats.valid_tokens = host[E + 1];
  stats.min_margin = std::bit_cast<double>(host[E + 4]);
  stats.entropy_sum = std::numeric_limits<double>::quiet_NaN();  // not computed on the device yet

  gather_rows<T><<<blocks_for(pairs * H), kThreads, 0, stream>>>(pairs, H, K, sorted_pair, xp, rows);
  Q3VL_CUDA_LAUNCHED("gather_rows");
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = host[e], ne = host[e + 1] - r0;
    if (ne == 0) continue;
    gemm(false, false, ne, 2 * I, H, 1.0f, rows + r0 * H, H, at(w.gate_up.raw(), e * H * 2 * I, dt), 2 * I, 0.0f,
         gate_up_out + r0 * 2 * I, 2 * I, dt, dt);
  }
  swiglu_rows<T><<<blocks_for(pairs * I), kThreads, 0, stream>>>(pairs, I, gate_up_out, act);
  Q3VL_CUDA_LAUNCHED("swiglu_rows");
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = host[e], ne = host[e + 1] - r0;
    if (ne == 0) continue;
    gemm(false, false, ne, H, I, 1.0f, act + r0 * I, I, at(w.down.raw(), e * I * H, dt), H, 0.0f, rows + r0 * H, H,
         dt, dt);
  }
  combine<T><<<blocks_for(n * H), kThreads, 0, stream>>>(n, H, K, pair_row, rows, topk_weight, false,
                                                          static_cast<T*>(y.raw()));
  Q3VL_CUDA_LAUNCHED("combine");
  arena.release(mark);
}

template <class T>
void backward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid, const MoeSaved& saved,
              const Tensor& dy, const Tensor& aux_dprob, const Tensor& dx, const MoeGradients& grads, Arena& arena) {
  const DType dt = x.dtype();
  const int64_t n = x.size(0), H = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, I = cfg.expert_ffn;
  const int64_t pairs = n * K;
  const cudaStream_t stream = context().stream;
  const size_t mark = arena.mark();
  // Per sorted row: gathered dy, then gathered x, then d x of the pair.
  T* rows = static_cast<T*>(Tensor::empty(arena, {pairs, H}, dt).raw());
  T* act = static_cast<T*>(Tensor::empty(arena, {pairs, I}, dt).raw());
  T* dh = static_cast<T*>(Tensor::empty(arena, {pairs, 2 * I}, dt).raw());
  float* dweight = static_cast<float*>(Tensor::empty(arena, {pairs}, DType::f32).raw());
  T* dprobs = static_cast<T*>(Tensor::empty(arena, {n, E}, dt).raw());

  const T* xp = static_cast<const T*>(x.raw());
  const float* probs = static_cast<const float*>(saved.probs.raw());
  const int64_t* topk_expert = static_cast<const int64_t*>(saved.topk_expert.raw());
  const float* topk_weight = static_cast<const float*>(saved.topk_weight.raw());
  const int64_t* sorted_pair = static_cast<const int64_t*>(saved.sorted_pair.raw());
  const T* gate_up_out = static_cast<const T*>(saved.gate_up_out.raw());
  const bool want_dx = dx.defined();

  // The backward's one wait: the per-expert row counts size the GEMMs below.
  std::vector<int64_t> host(static_cast<size_t>(E + 1));
  copy_bytes(host.data(), Device::cpu, saved.expert_offsets.raw(), Device::cuda, host.size() * sizeof(int64_t));

  gather_rows<T><<<blocks_for(pairs * H), kThreads, 0, stream>>>(pairs, H, K, sorted_pair,
                                                                  static_cast<const T*>(dy.raw()), rows);
  Q3VL_CUDA_LAUNCHED("gather_rows");
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = host[e], ne = host[e + 1] - r0;
    if (ne == 0) continue;
    gemm(false, true, ne, I, H, 1.0f, rows + r0 * H, H, at(w.down.raw(), e * I * H, dt), H, 0.0f, act + r0 * I, I,
         dt, dt);
  }
  // Eight warps per block, one warp per row.
  swiglu_dweight<T><<<blocks_for(pairs, kThreads / 32), kThreads, 0, stream>>>(pairs, I, gate_up_out, act,
                                                                                sorted_pair, dweight);
  Q3VL_CUDA_LAUNCHED("swiglu_dweight");
  swiglu_backward<T><<<blocks_for(pairs * I), kThreads, 0, stream>>>(pairs, I, gate_up_out, sorted_pair,
                                                                      topk_weight, act, dh);
  Q3VL_CUDA_LAUNCHED("swiglu_backward");
  const DType gd_down = grads.down.dtype(), gd_gate_up = grads.gate_up.dtype();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = host[e], ne = host[e + 1] - r0;
    if (ne == 0) continue;
    gemm(true, false, I, H, ne, 1.0f, act + r0 * I, I, rows + r0 * H, H, 1.0f,
         at(grads.down.raw(), e * I * H, gd_down), H, dt, gd_down);
  }
  gather_rows<T><<<blocks_for(pairs * H), kThreads, 0, stream>>>(pairs, H, K, sorted_pair, xp, rows);
  Q3VL_CUDA_LAUNCHED("gather_rows");
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = host[e], ne = host[e + 1] - r0;
    if (ne == 0) continue;
    gemm(true, false, H, 2 * I, ne, 1.0f, rows + r0 * H, H, dh + r0 * 2 * I, 2 * I, 1.0f,
         at(grads.gate_up.raw(), e * H * 2 * I, gd_gate_up), 2 * I, dt, gd_gate_up);
    if (want_dx)
      gemm(false, true, ne, H, 2 * I, 1.0f, dh + r0 * 2 * I, 2 * I, at(w.gate_up.raw(), e * H * 2 * I, dt), 2 * I,
           0.0f, rows + r0 * H, H, dt, dt);
  }

  const Mask mask = mask_of(valid);
  auto launch_router = [&](const auto* aux) {
    router_backward<<<blocks_for(n), kThreads, 0, stream>>>(n, E, K, probs, topk_expert, topk_weight, dweight, aux,
                                                            mask, dprobs);
    Q3VL_CUDA_LAUNCHED("router_backward");
  };
  if (!aux_dprob.defined()) launch_router(static_cast<const float*>(nullptr));
  else if (aux_dprob.dtype() == DType::f32) launch_router(static_cast<const float*>(aux_dprob.raw()));
  else launch_router(static_cast<const T*>(aux_dprob.raw()));

  gemm(true, false, E, H, n, 1.0f, dprobs, E, xp, H, 1.0f, grads.router.raw(), H, dt, grads.router.dtype());
  if (want_dx) {
    gemm(false, false, n, H, E, 1.0f, dprobs, E, w.router.raw(), H, 0.0f, dx.raw(), H, dt, dt);
    combine<T><<<blocks_for(n * H), kThreads, 0, stream>>>(n, H, K, static_cast<const int64_t*>(saved.pair_row.raw()),
                                                            rows, nullptr, true, static_cast<T*>(dx.raw()));
    Q3VL_CUDA_LAUNCHED("combine");
  }
  arena.release(mark);
}

}  // namespace

void CudaLayersImpl::moe_forward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                                 Arena& saved_arena, MoeSaved& saved, const Tensor& y, MoeStats& stats) const {
  const char* L = "moe_forward";
  Q3VL_CHECK(!w.score_bias.defined(), L, ": a router score bias (moe.balance: bias or aux+bias) is not supported "
             "on the CUDA device yet; use moe.balance: aux there");
  check_config(L, cfg);
  require_float_dtype(L, "x", x);
  const DType dt = x.dtype();
  require_device(L, "x", x, dt, {-1, cfg.hidden});
  const int64_t n = x.size(0);
  check_weights(L, cfg, w, dt);
  require_device(L, "y", y, dt, {n, cfg.hidden});
  require_device(L, "stats.counts", stats.counts, DType::i64, {cfg.num_experts});
  require_device(L, "stats.prob_sum", stats.prob_sum, DType::f64, {cfg.num_experts});
  check_valid(L, valid, n);
  check_arena(L, "saved_arena", saved_arena, moe_forward_arena_bytes(cfg, n, dt, false, Device::cuda));
  dispatch_float_dtype(L, dt, [&](auto tag) {
    forward<decltype(tag)>(cfg, w, x, valid, saved_arena, saved, y, stats);
  });
}

void CudaLayersImpl::moe_backward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                                  const MoeSaved& saved, const Tensor& dy, const Tensor& aux_dprob, const Tensor& dx,
                                  const MoeGradients& grads, Arena& scratch) const {
  const char* L = "moe_backward";
  check_config(L, cfg);
  require_float_dtype(L, "x", x);
  const DType dt = x.dtype();
  const int64_t E = cfg.num_experts, H = cfg.hidden, K = cfg.top_k, I = cfg.expert_ffn;
  require_device(L, "x", x, dt, {-1, H});
  const int64_t n = x.size(0);
  check_weights(L, cfg, w, dt);
  require_grad_dtype(L, "grads.router", grads.router, dt);
  require_device(L, "grads.router", grads.router, grads.router.dtype(), {E, H});
  require_grad_dtype(L, "grads.gate_up", grads.gate_up, dt);
  require_device(L, "grads.gate_up", grads.gate_up, grads.gate_up.dtype(), {E, H, 2 * I});
  require_grad_dtype(L, "grads.down", grads.down, dt);
  require_device(L, "grads.down", grads.down, grads.down.dtype(), {E, I, H});
  require_device(L, "dy", dy, dt, {n, H});
  if (dx.defined()) require_device(L, "dx", dx, dt, {n, H});
  require_grad(L, "aux_dprob", aux_dprob, dt, {E});
  require_device(L, "saved.probs", saved.probs, DType::f32, {n, E});
  require_device(L, "saved.topk_expert", saved.topk_expert, DType::i64, {n, K});
  require_device(L, "saved.topk_weight", saved.topk_weight, DType::f32, {n, K});
  require_device(L, "saved.expert_offsets", saved.expert_offsets, DType::i64, {E + 1});
  require_device(L, "saved.sorted_pair", saved.sorted_pair, DType::i64, {n * K});
  require_device(L, "saved.pair_row", saved.pair_row, DType::i64, {n * K});
  require_device(L, "saved.gate_up_out", saved.gate_up_out, dt, {n * K, 2 * I});
  check_valid(L, valid, n);
  check_arena(L, "scratch", scratch, moe_backward_scratch_bytes(cfg, n, dt, false, Device::cuda));
  dispatch_float_dtype(L, dt, [&](auto tag) {
    backward<decltype(tag)>(cfg, w, x, valid, saved, dy, aux_dprob, dx, grads, scratch);
  });
}

}  // namespace q3vl::cuda
