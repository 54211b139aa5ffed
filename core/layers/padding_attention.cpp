// Padding-query attention on the CPU: one job per (padding query, head), a max-subtracted softmax over the
// document's real keys; the output projection through linear_forward.
#include "core/layers/padding_attention.h"

#include <algorithm>
#include <cmath>

#include "core/arena_layout.h"
#include "core/layer_checks.h"
#include "core/layers/attention.h"
#include "core/layers/linear.h"

namespace q3vl {

void padding_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t doc_begin, int64_t real,
                       double scale, const Tensor& out) {
  const char* L = "padding_attention";
  const DType dt = q.dtype();
  require(L, "q", q, dt, {-1, -1, -1});
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  require(L, "k", k, dt, {n, -1, d});
  const int64_t hkv = k.size(1);
  require(L, "v", v, dt, {n, hkv, d});
  Q3VL_CHECK(hkv > 0 && hq % hkv == 0, L, ": ", hq, " query heads are not a multiple of ", hkv, " kv heads");
  require(L, "out", out, dt, {-1, hq, d});
  const int64_t pads = out.size(0);
  Q3VL_CHECK(real >= 1 && doc_begin >= 0 && doc_begin + real + pads <= n, L, ": document at ", doc_begin, " with ",
             real, " real and ", pads, " padding tokens exceeds ", n, " tokens");
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    T* op = out.data<T>();
    const int64_t group = hq / hkv;
    const T sc = static_cast<T>(scale);
#pragma omp parallel for schedule(static)
    for (int64_t job = 0; job < pads * hq; ++job) {
      const int64_t p = job / hq, head = job % hq, kvh = head / group;
      const T* qrow = qp + ((doc_begin + real + p) * hq + head) * d;
      auto score = [&](int64_t j) {
        const T* krow = kp + ((doc_begin + j) * hkv + kvh) * d;
        T s = 0;
        for (int64_t e = 0; e < d; ++e) s += qrow[e] * krow[e];
        return s * sc;
      };
      T mx = score(0);
      for (int64_t j = 1; j < real; ++j) mx = std::max(mx, score(j));
      T* o = op + (p * hq + head) * d;
      std::fill(o, o + d, T(0));
      T sum = 0;
      for (int64_t j = 0; j < real; ++j) {
        const T e = std::exp(score(j) - mx);
        sum += e;
        const T* vrow = vp + ((doc_begin + j) * hkv + kvh) * d;
        for (int64_t x = 0; x < d; ++x) o[x] += e * vrow[x];
      }
      for (int64_t x = 0; x < d; ++x) o[x] /= sum;
    }
  });
}

void padding_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                               const Tensor& doc_real, double scale, const Tensor& wo, const Tensor& y,
                               Arena& scratch) {
  const char* L = "padding_attention_forward";
  const DType dt = q.dtype();
  require(L, "q", q, dt, {-1, -1, -1});
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  check_cu_seqlens(L, cu_seqlens, n);
  const int64_t docs = cu_seqlens.size(0) - 1;
  require(L, "doc_real", doc_real, DType::i64, {docs});
  require(L, "wo", wo, dt, {-1, hq * d});
  require(L, "y", y, dt, {n, wo.size(0)});
  const int64_t* cu = cu_seqlens.data<int64_t>();
  const int64_t* real = doc_real.data<int64_t>();
  for (int64_t doc = 0; doc < docs; ++doc) {
    const int64_t len = cu[doc + 1] - cu[doc];
    Q3VL_CHECK(real[doc] >= 1 && real[doc] <= len, L, ": document ", doc, " has ", real[doc],
               " real tokens of ", len, " (expected 1 to ", len, ")");
    const int64_t pads = len - real[doc];
    if (pads == 0) continue;
    const size_t mark = scratch.mark();
    const Tensor out = Tensor::empty(scratch, {pads, hq, d}, dt);
    padding_attention(q, k, v, cu[doc], real[doc], scale, out);
    linear_forward(out.view({pads, hq * d}), wo, Tensor{}, y.narrow(0, cu[doc] + real[doc], pads));
    scratch.release(mark);
  }
}

size_t padding_attention_scratch_bytes(int64_t max_padding, int64_t q_heads, int64_t head_dim, DType dtype) {
  return arena_bytes(max_padding * q_heads * head_dim, dtype);
}

}  // namespace q3vl
