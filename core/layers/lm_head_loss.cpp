// Fused lm_head + cross-entropy on the CPU: the logits of one vocabulary chunk at a time through cpu::gemm into
// a scratch buffer, then the same per-row arithmetic as cross_entropy_forward / _backward (online max and sum
// of exponentials in f64 across chunks, the vectorised f32 exp within a chunk), so the two paths agree to
// fp32 rounding. Rows are independent inside a chunk, so the parallel loops have one writer per row; the loss
// is summed in token order.
#include "core/layers/lm_head_loss.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "core/kernels/cpu/gemm.h"
#include "core/kernels/cpu/vector_exp.h"
#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"
#include "core/layers/cross_entropy.h"

namespace q3vl {

namespace {

struct Dims {
  int64_t n, hidden, vocab;
};

Dims check_common(const char* layer, const Tensor& x, const Tensor& w, const Tensor& labels, const Tensor& lse) {
  const DType dt = x.dtype();
  require(layer, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), hidden = x.size(1);
  require(layer, "w", w, dt, {-1, hidden});
  const int64_t vocab = w.size(0);
  Q3VL_CHECK(vocab > 0, layer, ": w ", w.str(), " has an empty vocabulary dimension");
  require(layer, "labels", labels, DType::i64, {n});
  require(layer, "lse", lse, dt, {n});
  const int64_t* lab = labels.data<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    Q3VL_CHECK(lab[i] == kIgnoreIndex || (lab[i] >= 0 && lab[i] < vocab), layer, ": labels[", i, "] = ", lab[i],
               " is neither ", kIgnoreIndex, " nor in [0, ", vocab, ")");
  return {n, hidden, vocab};
}

}  // namespace

size_t lm_head_cross_entropy_scratch_bytes(int64_t n, int64_t hidden, int64_t vocab, DType dtype) {
  const auto un = static_cast<size_t>(n), uh = static_cast<size_t>(hidden);
  const size_t chunk = static_cast<size_t>(std::min(vocab, kVocabChunk));
  const size_t elem = std::max<size_t>(4, dtype_size(dtype));
  // The logits chunk (f32 at least), the device's bf16 gradient chunk and f32 dx accumulator, and the
  // per-row statistics (at most four f64 vectors) plus the device's result record.
  return Arena::aligned(un * chunk * elem) + Arena::aligned(un * chunk * 2) + Arena::aligned(un * uh * 4) +
         4 * Arena::aligned(un * 8) + Arena::aligned(64);
}

double lm_head_cross_entropy_forward(const Tensor& x, const Tensor& w, const Tensor& labels, const Tensor& lse,
                                     int64_t& count, Arena& scratch) {
  if (on_cuda({&x, &w, &labels, &lse}))
    return cuda_layers().lm_head_cross_entropy_forward(x, w, labels, lse, count, scratch);
  const char* L = "lm_head_cross_entropy_forward";
  const Dims g = check_common(L, x, w, labels, lse);
  const size_t mark = scratch.mark();
  const double sum = dispatch_float(L, x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t width = std::min(g.vocab, kVocabChunk);
    T* logits = static_cast<T*>(scratch.allocate(static_cast<size_t>(g.n * width) * sizeof(T)));
    auto* row_max = static_cast<double*>(scratch.allocate(static_cast<size_t>(g.n) * sizeof(double)));
    auto* row_sum = static_cast<double*>(scratch.allocate(static_cast<size_t>(g.n) * sizeof(double)));
    auto* target = static_cast<T*>(scratch.allocate(static_cast<size_t>(g.n) * sizeof(T)));
    const T *xp = x.data<T>(), *wp = w.data<T>();
    const int64_t* lab = labels.data<int64_t>();
    std::fill_n(row_max, g.n, -std::numeric_limits<double>::infinity());
    std::fill_n(row_sum, g.n, 0.0);
    for (int64_t c0 = 0; c0 < g.vocab; c0 += kVocabChunk) {
      const int64_t cw = std::min(kVocabChunk, g.vocab - c0);
      cpu::gemm<T>(false, true, g.n, cw, g.hidden, T(1), xp, g.hidden, wp + c0 * g.hidden, g.hidden, T(0), logits,
                   cw);
      // The chunk step of row_max_and_sum_exp (cross_entropy.cpp), row by row.
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < g.n; ++i) {
        if (lab[i] == kIgnoreIndex) continue;
        const T* row = logits + i * cw;
        double cm = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < cw; ++j) cm = std::max(cm, static_cast<double>(row[j]));
        if (cm > row_max[i]) {
          row_sum[i] *= std::exp(row_max[i] - cm);
          row_max[i] = cm;
        }
        if constexpr (std::is_same_v<T, float>) {
          row_sum[i] += cpu::sum_exp_shifted(row, cw, static_cast<float>(row_max[i]));
        } else {
          for (int64_t j = 0; j < cw; ++j) row_sum[i] += std::exp(static_cast<double>(row[j]) - row_max[i]);
        }
        if (lab[i] >= c0 && lab[i] < c0 + cw) target[i] = row[lab[i] - c0];
      }
    }
    T* lsep = lse.data<T>();
    double s = 0;
    count = 0;
    for (int64_t i = 0; i < g.n; ++i) {
      if (lab[i] == kIgnoreIndex) {
        lsep[i] = T(0);
        continue;
      }
      lsep[i] = static_cast<T>(row_max[i] + std::log(row_sum[i]));
      s += static_cast<double>(lsep[i]) - static_cast<double>(target[i]);
      ++count;
    }
    return s;
  });
  scratch.release(mark);
  return sum;
}

void lm_head_cross_entropy_backward(const Tensor& x, const Tensor& w, const Tensor& labels, const Tensor& lse,
                                    double scale, const Tensor& dx, const Tensor& dw, Arena& scratch) {
  if (on_cuda({&x, &w, &labels, &lse, &dx, &dw}))
    return cuda_layers().lm_head_cross_entropy_backward(x, w, labels, lse, scale, dx, dw, scratch);
  const char* L = "lm_head_cross_entropy_backward";
  const Dims g = check_common(L, x, w, labels, lse);
  const DType dt = x.dtype();
  require(L, "dx", dx, dt, {g.n, g.hidden});
  require(L, "dw", dw, dt, {g.vocab, g.hidden});
  const size_t mark = scratch.mark();
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t width = std::min(g.vocab, kVocabChunk);
    T* dlogits = static_cast<T*>(scratch.allocate(static_cast<size_t>(g.n * width) * sizeof(T)));
    const T *xp = x.data<T>(), *wp = w.data<T>(), *lsep = lse.data<T>();
    const int64_t* lab = labels.data<int64_t>();
    T *dxp = dx.data<T>(), *dwp = dw.data<T>();
    for (int64_t c0 = 0; c0 < g.vocab; c0 += kVocabChunk) {
      const int64_t cw = std::min(kVocabChunk, g.vocab - c0);
      const T* wc = wp + c0 * g.hidden;
      cpu::gemm<T>(false, true, g.n, cw, g.hidden, T(1), xp, g.hidden, wc, g.hidden, T(0), dlogits, cw);
      // dlogits = scale * (softmax - onehot) in place, as cross_entropy_backward computes it.
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < g.n; ++i) {
        T* row = dlogits + i * cw;
        if (lab[i] == kIgnoreIndex) {
          std::fill_n(row, cw, T(0));
          continue;
        }
        if constexpr (std::is_same_v<T, float>) {
          cpu::exp_shifted_scaled(row, cw, lsep[i], static_cast<float>(scale), row);
        } else {
          const double l = lsep[i];
          for (int64_t j = 0; j < cw; ++j) row[j] = static_cast<T>(scale * std::exp(static_cast<double>(row[j]) - l));
        }
        if (lab[i] >= c0 && lab[i] < c0 + cw) row[lab[i] - c0] -= static_cast<T>(scale);
      }
      cpu::gemm<T>(false, false, g.n, g.hidden, cw, T(1), dlogits, cw, wc, g.hidden, c0 == 0 ? T(0) : T(1), dxp,
                   g.hidden);
      cpu::gemm<T>(true, false, cw, g.hidden, g.n, T(1), dlogits, cw, xp, g.hidden, T(1), dwp + c0 * g.hidden,
                   g.hidden);
    }
  });
  scratch.release(mark);
}

}  // namespace q3vl
