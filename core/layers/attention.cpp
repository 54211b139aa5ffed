// Flash-style varlen GQA attention on the CPU. Work is cut into square tiles of kTile tokens aligned at
// each document start; the tile products go through cpu::gemm with row strides that step over the other
// heads, so q/k/v are never repacked. Softmax exponentials use Eigen's vectorised exp.
//
// Parallelism and determinism: the forward runs one task per (document, q head, query tile), each the
// only writer of its out rows and lse entries. The backward runs one task per (document, kv head): it
// owns dk/dv of that kv head and dq of the q heads that share it, and accumulates them in a fixed tile
// order, so results do not depend on the thread count or scheduling.
#include "core/layers/attention.h"

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/kernels/cpu/gemm.h"
#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"

namespace q3vl {

namespace {

// 128 x 128 score tiles keep the per-tile GEMMs (128 x 128 x head_dim) large enough to run near GEMM
// speed, while the masked half of each causal diagonal tile adds only 1/(tiles per document) to the
// useful work (6% at 2048 tokens).
constexpr int64_t kTile = 128;

template <class T>
using RowArray = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;

struct Geometry {
  int64_t n, hq, hkv, d, group;
};

Geometry check_qkv(const char* layer, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                   double scale) {
  const DType dt = q.dtype();
  require(layer, "q", q, dt, {-1, -1, -1});
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  require(layer, "k", k, dt, {n, -1, d});
  const int64_t hkv = k.size(1);
  require(layer, "v", v, dt, {n, hkv, d});
  Q3VL_CHECK(hq > 0 && hkv > 0 && d > 0, layer, ": heads and head_dim must be positive, got q ", q.str(), ", k ",
             k.str());
  Q3VL_CHECK(hq % hkv == 0, layer, ": q heads (", hq, ") must be a multiple of kv heads (", hkv, ")");
  Q3VL_CHECK(std::isfinite(scale) && scale > 0, layer, ": scale must be positive and finite, got ", scale);
  check_cu_seqlens(layer, cu_seqlens, n);
  return {n, hq, hkv, d, hq / hkv};
}

int64_t tiles(int64_t len) { return (len + kTile - 1) / kTile; }

// Number of keys of the tile starting at k0 that query row q_pos (block-local) may see.
int64_t visible_keys(bool causal, int64_t q_pos, int64_t k0, int64_t bk) {
  return causal ? std::min(bk, q_pos - k0 + 1) : bk;
}

template <class T>
void forward_tile(const Geometry& g, const T* q, const T* k, const T* v, T* out, T* lse, int64_t start, int64_t len,
                  int64_t h, int64_t tile, bool causal, T scale, T* s, T* row_max, T* row_sum) {
  const int64_t q0 = tile * kTile, bq = std::min(kTile, len - q0);
  const int64_t ldq = g.hq * g.d, ldk = g.hkv * g.d, kv_head = h / g.group;
  const T* qt = q + ((start + q0) * g.hq + h) * g.d;
  T* ot = out + ((start + q0) * g.hq + h) * g.d;
  for (int64_t r = 0; r < bq; ++r) {
    std::fill_n(ot + r * ldq, g.d, T(0));
    row_max[r] = -std::numeric_limits<T>::infinity();
    row_sum[r] = 0;
  }
  const int64_t kv_end = causal ? q0 + bq : len;
  for (int64_t k0 = 0; k0 < kv_end; k0 += kTile) {
    const int64_t bk = std::min(kTile, kv_end - k0);
    const T* kt = k + ((start + k0) * g.hkv + kv_head) * g.d;
    const T* vt = v + ((start + k0) * g.hkv + kv_head) * g.d;
    cpu::gemm<T>(false, true, bq, bk, g.d, scale, qt, ldq, kt, ldk, T(0), s, kTile);
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t valid = visible_keys(causal, q0 + r, k0, bk);
      RowArray<T> row(s + r * kTile, valid);
      const T m = std::max(row_max[r], row.maxCoeff());
      const T correction = std::exp(row_max[r] - m);  // exp(-inf) = 0 on the first tile
      row = (row - m).exp();
      std::fill(s + r * kTile + valid, s + r * kTile + bk, T(0));
      row_sum[r] = row_sum[r] * correction + row.sum();
      row_max[r] = m;
      if (correction != T(1)) {
        T* o = ot + r * ldq;
        for (int64_t c = 0; c < g.d; ++c) o[c] *= correction;
      }
    }
    cpu::gemm<T>(false, false, bq, g.d, bk, T(1), s, kTile, vt, ldk, T(1), ot, ldq);
  }
  for (int64_t r = 0; r < bq; ++r) {
    T* o = ot + r * ldq;
    const T inv = T(1) / row_sum[r];
    for (int64_t c = 0; c < g.d; ++c) o[c] *= inv;
    lse[h * g.n + start + q0 + r] = row_max[r] + std::log(row_sum[r]);
  }
}

// Per-thread backward scratch: probabilities and their gradient for one tile pair, plus two row vectors.
constexpr size_t kThreadScratchElems = 2 * kTile * kTile + 2 * kTile;

template <class T>
void backward_kv_head(const Geometry& g, const T* q, const T* k, const T* v, const T* out, const T* lse,
                      const T* dout, T* dq, T* dk, T* dv, int64_t start, int64_t len, int64_t kv_head, bool causal,
                      T scale, T* scratch) {
  T* p = scratch;
  T* dp = p + kTile * kTile;
  T* delta = dp + kTile * kTile;
  T* row_lse = delta + kTile;
  const int64_t ldq = g.hq * g.d, ldk = g.hkv * g.d;
  for (int64_t i = start; i < start + len; ++i) {
    std::fill_n(dk + (i * g.hkv + kv_head) * g.d, g.d, T(0));
    std::fill_n(dv + (i * g.hkv + kv_head) * g.d, g.d, T(0));
    std::fill_n(dq + (i * g.hq + kv_head * g.group) * g.d, g.group * g.d, T(0));
  }
  for (int64_t h = kv_head * g.group; h < (kv_head + 1) * g.group; ++h) {
    for (int64_t tile = 0; tile < tiles(len); ++tile) {
      const int64_t q0 = tile * kTile, bq = std::min(kTile, len - q0);
      const int64_t row0 = (start + q0) * g.hq + h;
      const T *qt = q + row0 * g.d, *ot = out + row0 * g.d, *dot = dout + row0 * g.d;
      T* dqt = dq + row0 * g.d;
      for (int64_t r = 0; r < bq; ++r) {
        // delta = rowsum(dout * out) = rowsum(dP * P), the softmax-gradient shift of each query row.
        T acc = 0;
        for (int64_t c = 0; c < g.d; ++c) acc += dot[r * ldq + c] * ot[r * ldq + c];
        delta[r] = acc;
        row_lse[r] = lse[h * g.n + start + q0 + r];
      }
      const int64_t kv_end = causal ? q0 + bq : len;
      for (int64_t k0 = 0; k0 < kv_end; k0 += kTile) {
        const int64_t bk = std::min(kTile, kv_end - k0);
        const int64_t krow0 = (start + k0) * g.hkv + kv_head;
        const T *kt = k + krow0 * g.d, *vt = v + krow0 * g.d;
        T *dkt = dk + krow0 * g.d, *dvt = dv + krow0 * g.d;
        cpu::gemm<T>(false, true, bq, bk, g.d, scale, qt, ldq, kt, ldk, T(0), p, kTile);
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t valid = visible_keys(causal, q0 + r, k0, bk);
          RowArray<T> row(p + r * kTile, valid);
          row = (row - row_lse[r]).exp();
          std::fill(p + r * kTile + valid, p + r * kTile + bk, T(0));
        }
        cpu::gemm<T>(true, false, bk, g.d, bq, T(1), p, kTile, dot, ldq, T(1), dvt, ldk);
        cpu::gemm<T>(false, true, bq, bk, g.d, T(1), dot, ldq, vt, ldk, T(0), dp, kTile);
        for (int64_t r = 0; r < bq; ++r) {
          // dS = P * (dP - delta) * scale; masked entries have P = 0 and so dS = 0.
          RowArray<T> ds(dp + r * kTile, bk);
          ds = RowArray<T>(p + r * kTile, bk) * (ds - delta[r]) * scale;
        }
        cpu::gemm<T>(false, false, bq, g.d, bk, T(1), dp, kTile, kt, ldk, T(1), dqt, ldq);
        cpu::gemm<T>(true, false, bk, g.d, bq, T(1), dp, kTile, qt, ldq, T(1), dkt, ldk);
      }
    }
  }
}

}  // namespace

void check_cu_seqlens(const char* layer, const Tensor& cu_seqlens, int64_t n) {
  require(layer, "cu_seqlens", cu_seqlens, DType::i64, {-1});
  const int64_t count = cu_seqlens.size(0);
  Q3VL_CHECK(count >= 2, layer, ": cu_seqlens needs at least 2 entries, got ", count);
  const int64_t* cu = cu_seqlens.data<int64_t>();
  Q3VL_CHECK(cu[0] == 0, layer, ": cu_seqlens must start at 0, got ", cu[0]);
  for (int64_t b = 1; b < count; ++b)
    Q3VL_CHECK(cu[b] > cu[b - 1], layer, ": cu_seqlens must be strictly increasing, got ", cu[b - 1], " then ",
               cu[b], " at index ", b);
  Q3VL_CHECK(cu[count - 1] == n, layer, ": cu_seqlens must end at the token count ", n, ", got ", cu[count - 1]);
}

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens, bool causal,
                       double scale, const Tensor& out, const Tensor& lse) {
  if (on_cuda({&q, &k, &v, &cu_seqlens, &out, &lse}))
    return cuda_layers().attention_forward(q, k, v, cu_seqlens, causal, scale, out, lse);
  const char* L = "attention_forward";
  const Geometry g = check_qkv(L, q, k, v, cu_seqlens, scale);
  const DType dt = q.dtype();
  require(L, "out", out, dt, {g.n, g.hq, g.d});
  require(L, "lse", lse, dt, {g.hq, g.n});
  const int64_t* cu = cu_seqlens.data<int64_t>();
  const int64_t blocks = cu_seqlens.size(0) - 1;
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    T *op = out.data<T>(), *lp = lse.data<T>();
#pragma omp parallel
    {
      alignas(64) T s[kTile * kTile];
      T row_max[kTile], row_sum[kTile];
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = cu[b], len = cu[b + 1] - cu[b], nt = tiles(len);
        // Last tiles first: under causal masking they are the most expensive.
#pragma omp for collapse(2) schedule(dynamic) nowait
        for (int64_t h = 0; h < g.hq; ++h)
          for (int64_t t = 0; t < nt; ++t)
            forward_tile<T>(g, qp, kp, vp, op, lp, start, len, h, nt - 1 - t, causal, static_cast<T>(scale), s,
                            row_max, row_sum);
      }
    }
  });
}

size_t attention_backward_device_scratch_bytes(int64_t tokens, int64_t q_heads) {
  return Arena::aligned(static_cast<size_t>(tokens * q_heads) * sizeof(float));
}

size_t attention_backward_scratch_bytes(DType dtype) {
  const size_t per_thread = dispatch_float("attention_backward_scratch_bytes", dtype, [](auto tag) {
    using T = decltype(tag);
    return kThreadScratchElems * sizeof(T);
  });
  return static_cast<size_t>(omp_get_max_threads()) * Arena::aligned(per_thread);
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, const Tensor& cu_seqlens, bool causal, double scale, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv, Arena& scratch) {
  if (on_cuda({&q, &k, &v, &out, &lse, &dout, &cu_seqlens, &dq, &dk, &dv}))
    return cuda_layers().attention_backward(q, k, v, out, lse, dout, cu_seqlens, causal, scale, dq, dk, dv, scratch);
  const char* L = "attention_backward";
  const Geometry g = check_qkv(L, q, k, v, cu_seqlens, scale);
  const DType dt = q.dtype();
  require(L, "out", out, dt, {g.n, g.hq, g.d});
  require(L, "lse", lse, dt, {g.hq, g.n});
  require(L, "dout", dout, dt, {g.n, g.hq, g.d});
  require(L, "dq", dq, dt, {g.n, g.hq, g.d});
  require(L, "dk", dk, dt, {g.n, g.hkv, g.d});
  require(L, "dv", dv, dt, {g.n, g.hkv, g.d});
  const int64_t* cu = cu_seqlens.data<int64_t>();
  const int64_t blocks = cu_seqlens.size(0) - 1;
  const int threads = omp_get_max_threads();
  const size_t mark = scratch.mark();
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const size_t per_thread = Arena::aligned(kThreadScratchElems * sizeof(T));
    char* base = static_cast<char*>(scratch.allocate(per_thread * static_cast<size_t>(threads)));
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>(), *op = out.data<T>(), *lp = lse.data<T>();
    const T* dop = dout.data<T>();
    T *dqp = dq.data<T>(), *dkp = dk.data<T>(), *dvp = dv.data<T>();
#pragma omp parallel num_threads(threads)
    {
      T* mine = reinterpret_cast<T*>(base + per_thread * static_cast<size_t>(omp_get_thread_num()));
      for (int64_t b = 0; b < blocks; ++b) {
#pragma omp for schedule(dynamic) nowait
        for (int64_t kv_head = 0; kv_head < g.hkv; ++kv_head)
          backward_kv_head<T>(g, qp, kp, vp, op, lp, dop, dqp, dkp, dvp, cu[b], cu[b + 1] - cu[b], kv_head, causal,
                              static_cast<T>(scale), mine);
      }
    }
  });
  scratch.release(mark);
}

}  // namespace q3vl
