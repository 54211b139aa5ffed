// Chunked softmax cross-entropy forward/backward, parallel over tokens.
#include "core/layers/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "core/kernels/cpu/vector_exp.h"
#include "core/layer_checks.h"

namespace q3vl {

namespace {
void require_labels(const char* layer, const Tensor& labels, int64_t n, int64_t vocab) {
  require(layer, "labels", labels, DType::i64, {n});
  const int64_t* p = labels.data<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    Q3VL_CHECK(p[i] == kIgnoreIndex || (p[i] >= 0 && p[i] < vocab), layer, ": labels[", i, "] = ", p[i],
               " is neither ", kIgnoreIndex, " nor in [0, ", vocab, ")");
}
}  // namespace

template <class T>
void row_max_and_sum_exp(const T* row, int64_t width, double& max_out, double& sum_out) {
  double m = -std::numeric_limits<double>::infinity(), s = 0;
  for (int64_t c0 = 0; c0 < width; c0 += kVocabChunk) {
    const int64_t c1 = std::min(width, c0 + kVocabChunk);
    double cm = -std::numeric_limits<double>::infinity();
    for (int64_t j = c0; j < c1; ++j) cm = std::max(cm, static_cast<double>(row[j]));
    if (cm > m) {
      s *= std::exp(m - cm);
      m = cm;
    }
    if constexpr (std::is_same_v<T, float>) {
      s += cpu::sum_exp_shifted(row + c0, c1 - c0, static_cast<float>(m));
    } else {
      for (int64_t j = c0; j < c1; ++j) s += std::exp(static_cast<double>(row[j]) - m);
    }
  }
  max_out = m;
  sum_out = s;
}
template void row_max_and_sum_exp<float>(const float*, int64_t, double&, double&);
template void row_max_and_sum_exp<double>(const double*, int64_t, double&, double&);

CrossEntropySum cross_entropy_forward(const Tensor& logits, const Tensor& labels, const Tensor& lse) {
  const char* L = "cross_entropy_forward";
  const DType dt = logits.dtype();
  require(L, "logits", logits, dt, {-1, -1});
  const int64_t n = logits.size(0), vocab = logits.size(1);
  Q3VL_CHECK(vocab > 0, L, ": logits have an empty vocabulary dimension");
  require_labels(L, labels, n, vocab);
  require(L, "lse", lse, dt, {n});
  return dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T* lp = logits.data<T>();
    const int64_t* lab = labels.data<int64_t>();
    T* lsep = lse.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      // Ignored rows need no log-sum-exp (the backward writes zeros there): skipping them halves the work on
      // typical multimodal batches, where prompts and vision tokens are ignored.
      if (lab[i] == kIgnoreIndex) {
        lsep[i] = T(0);
        continue;
      }
      const T* row = lp + i * vocab;
      double m = 0, s = 0;
      row_max_and_sum_exp(row, vocab, m, s);
      const double l = m + std::log(s);
      lsep[i] = static_cast<T>(l);
    }
    // Serial sum in token order: the loss is bitwise independent of the thread count.
    CrossEntropySum r;
    for (int64_t i = 0; i < n; ++i) {
      if (lab[i] == kIgnoreIndex) continue;
      r.sum += static_cast<double>(lsep[i]) - static_cast<double>(lp[i * vocab + lab[i]]);
      ++r.count;
    }
    return r;
  });
}

void cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse, double scale,
                            const Tensor& dlogits) {
  const char* L = "cross_entropy_backward";
  const DType dt = logits.dtype();
  require(L, "logits", logits, dt, {-1, -1});
  const int64_t n = logits.size(0), vocab = logits.size(1);
  require_labels(L, labels, n, vocab);
  require(L, "lse", lse, dt, {n});
  require(L, "dlogits", dlogits, dt, {n, vocab});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T* lp = logits.data<T>();
    const T* lsep = lse.data<T>();
    const int64_t* lab = labels.data<int64_t>();
    T* dp = dlogits.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* row = lp + i * vocab;
      T* drow = dp + i * vocab;
      if (lab[i] == kIgnoreIndex) {
        for (int64_t j = 0; j < vocab; ++j) drow[j] = T(0);
        continue;
      }
      const double l = lsep[i];
      if constexpr (std::is_same_v<T, float>) {
        cpu::exp_shifted_scaled(row, vocab, static_cast<float>(l), static_cast<float>(scale), drow);
      } else {
        for (int64_t j = 0; j < vocab; ++j) drow[j] = static_cast<T>(scale * std::exp(static_cast<double>(row[j]) - l));
      }
      drow[lab[i]] -= static_cast<T>(scale);
    }
  });
}

}  // namespace q3vl
