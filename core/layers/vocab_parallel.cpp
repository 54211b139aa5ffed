// Vocabulary-parallel embedding gather/scatter-add and cross-entropy: local kernels over this rank's vocabulary
// range plus the all-reduces that combine ranks.
#include "core/layers/vocab_parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "core/kernels/cpu/vector_exp.h"
#include "core/layers/embedding.h"
#include "core/layer_checks.h"

namespace q3vl {

namespace {

// The backward functions have no TensorParallel, so they cannot know V: they only refuse negative ids.
constexpr int64_t kUnknownVocab = std::numeric_limits<int64_t>::max();

// ids (labels when ignore_allowed) i64 [n]; each a global id in [0, vocab), or kIgnoreIndex where allowed.
void require_global_ids(const char* layer, const char* name, const Tensor& ids, int64_t n, int64_t vocab,
                        bool ignore_allowed) {
  require(layer, name, ids, DType::i64, {n});
  const std::string bound = vocab == kUnknownVocab ? std::string("V") : std::to_string(vocab);
  const int64_t* p = ids.data<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    Q3VL_CHECK((ignore_allowed && p[i] == kIgnoreIndex) || (p[i] >= 0 && p[i] < vocab), layer, ": ", name, "[", i,
               "] = ", p[i], " is ", ignore_allowed ? "neither " + std::to_string(kIgnoreIndex) + " nor" : "not",
               " in the vocabulary [0, ", bound, ")");
}

// The forward functions check the equal split against the group: a wrong vocab_begin would make a target
// owned by no rank or by two, a silently wrong loss.
void require_range_of_rank(const char* layer, int64_t vocab_begin, int64_t local_vocab, const TensorParallel& tp) {
  Q3VL_CHECK(local_vocab > 0, layer, ": this rank's vocabulary range is empty");
  const int64_t expected = static_cast<int64_t>(tp.rank()) * local_vocab;
  Q3VL_CHECK(vocab_begin == expected, layer, ": vocab_begin ", vocab_begin, " is not tp rank ", tp.rank(), " x ",
             local_vocab, " local vocabulary ids = ", expected, " (the vocabulary is split in ", tp.size(),
             " equal ranges)");
}

void require_range_start(const char* layer, int64_t vocab_begin, int64_t local_vocab) {
  Q3VL_CHECK(local_vocab > 0, layer, ": this rank's vocabulary range is empty");
  Q3VL_CHECK(vocab_begin >= 0 && vocab_begin % local_vocab == 0, layer, ": vocab_begin ", vocab_begin,
             " is not a non-negative multiple of the ", local_vocab, " local vocabulary ids");
}

// Max and sum of exp(x - max) over one row, in vocabulary chunks with an online rescale (as
// cross_entropy_forward does, so that a one-rank group gives its bits).
}  // namespace

void vocab_parallel_embedding_forward(const Tensor& ids, const Tensor& table_local, int64_t vocab_begin,
                                      const Tensor& y, TensorParallel& tp) {
  const char* L = "vocab_parallel_embedding_forward";
  const DType dt = table_local.dtype();
  require(L, "table_local", table_local, dt, {-1, -1});
  const int64_t rows = table_local.size(0), h = table_local.size(1);
  require_range_of_rank(L, vocab_begin, rows, tp);
  const int64_t n = ids.numel();
  require_global_ids(L, "ids", ids, n, rows * tp.size(), false);
  require(L, "y", y, dt, {n, h});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t* id = ids.data<int64_t>();
    const T* table_data = table_local.data<T>();
    T* yp = y.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = id[i] - vocab_begin;
      T* out = yp + i * h;
      if (r >= 0 && r < rows)
        std::copy(table_data + r * h, table_data + (r + 1) * h, out);
      else
        std::fill(out, out + h, T(0));
    }
    // Exactly one rank holds each row, the others add zeros: the sum is exact.
    tp.all_reduce_sum(std::span<T>(yp, static_cast<size_t>(n * h)));
  });
}

void vocab_parallel_embedding_backward(const Tensor& ids, const Tensor& dy, int64_t vocab_begin,
                                       const Tensor& dtable_local) {
  const char* L = "vocab_parallel_embedding_backward";
  const DType dt = dtable_local.dtype();
  require(L, "dtable_local", dtable_local, dt, {-1, -1});
  const int64_t rows = dtable_local.size(0), h = dtable_local.size(1);
  require_range_start(L, vocab_begin, rows);
  const int64_t n = ids.numel();
  require_global_ids(L, "ids", ids, n, kUnknownVocab, false);
  require(L, "dy", dy, dt, {n, h});
  embedding_backward_rows(ids, dy, vocab_begin, dtable_local);
}

CrossEntropySum vocab_parallel_cross_entropy_forward(const Tensor& logits_local, const Tensor& labels,
                                                     int64_t vocab_begin, const Tensor& lse, TensorParallel& tp) {
  const char* L = "vocab_parallel_cross_entropy_forward";
  const DType dt = logits_local.dtype();
  require(L, "logits_local", logits_local, dt, {-1, -1});
  const int64_t n = logits_local.size(0), width = logits_local.size(1);
  require_range_of_rank(L, vocab_begin, width, tp);
  require_global_ids(L, "labels", labels, n, width * tp.size(), true);
  require(L, "lse", lse, dt, {n});
  return dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T* lp = logits_local.data<T>();
    const int64_t* lab = labels.data<int64_t>();
    T* lsep = lse.data<T>();
    // Per row: this rank's max (reduced to the global max), then [sum of exp(x - global max) | target logit]
    // summed over ranks. Ignored rows take part with zeros so that every rank makes the same two calls.
    std::vector<double> local_max(n, 0.0);
    std::vector<float> global_max(n, 0.f);
    std::vector<double> sums(2 * n, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if (lab[i] == kIgnoreIndex) continue;
      const T* row = lp + i * width;
      row_max_and_sum_exp(row, width, local_max[i], sums[i]);
      // f64 logits: the float max is only the shift of the sums below, rounding it loses nothing.
      global_max[i] = static_cast<float>(local_max[i]);
      const int64_t target = lab[i] - vocab_begin;
      if (target >= 0 && target < width) sums[n + i] = static_cast<double>(row[target]);
    }
    tp.all_reduce_max(std::span<float>(global_max));
    for (int64_t i = 0; i < n; ++i)
      if (lab[i] != kIgnoreIndex) sums[i] *= std::exp(local_max[i] - static_cast<double>(global_max[i]));
    // The target logit is non-zero on one rank only: its sum is exact.
    tp.all_reduce_sum(std::span<double>(sums));
    // Serial in token order from values every rank holds bitwise alike: the same loss on every rank,
    // independent of the thread count.
    CrossEntropySum r;
    for (int64_t i = 0; i < n; ++i) {
      if (lab[i] == kIgnoreIndex) {
        lsep[i] = T(0);
        continue;
      }
      lsep[i] = static_cast<T>(static_cast<double>(global_max[i]) + std::log(sums[i]));
      r.sum += static_cast<double>(lsep[i]) - sums[n + i];
      ++r.count;
    }
    return r;
  });
}

void vocab_parallel_cross_entropy_backward(const Tensor& logits_local, const Tensor& labels, const Tensor& lse,
                                           int64_t vocab_begin, double scale, const Tensor& dlogits_local) {
  const char* L = "vocab_parallel_cross_entropy_backward";
  const DType dt = logits_local.dtype();
  require(L, "logits_local", logits_local, dt, {-1, -1});
  const int64_t n = logits_local.size(0), width = logits_local.size(1);
  require_range_start(L, vocab_begin, width);
  require_global_ids(L, "labels", labels, n, kUnknownVocab, true);
  require(L, "lse", lse, dt, {n});
  require(L, "dlogits_local", dlogits_local, dt, {n, width});
  dispatch_float(L, dt, [&](auto tag) {
    using T = decltype(tag);
    const T* lp = logits_local.data<T>();
    const T* lsep = lse.data<T>();
    const int64_t* lab = labels.data<int64_t>();
    T* dp = dlogits_local.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* row = lp + i * width;
      T* drow = dp + i * width;
      if (lab[i] == kIgnoreIndex) {
        std::fill(drow, drow + width, T(0));
        continue;
      }
      const double l = lsep[i];
      if constexpr (std::is_same_v<T, float>) {
        cpu::exp_shifted_scaled(row, width, static_cast<float>(l), static_cast<float>(scale), drow);
      } else {
        for (int64_t j = 0; j < width; ++j) drow[j] = static_cast<T>(scale * std::exp(static_cast<double>(row[j]) - l));
      }
      const int64_t target = lab[i] - vocab_begin;
      if (target >= 0 && target < width) drow[target] -= static_cast<T>(scale);
    }
  });
}

}  // namespace q3vl
