// Vocabulary-parallel embedding and cross-entropy (core/layers/vocab_parallel.h) with the vocabulary split over
// every rank of the mpiexec run, against embedding_* and cross_entropy_* on the whole table and logits: y, this
// rank's rows of dtable, loss sum/count and lse, this rank's columns of dlogits (out of place and in place);
// ids in every rank's range and repeated, ignored labels, targets all on rank 0 (the other ranks own no target
// of any row) and all ignored; the same loss bits on every rank; a constant number of collectives; a one-rank
// group (SelfComm); argument errors. V = 96 splits over 1, 2, 3 and 4 ranks; other world sizes skip.
//
// Tolerances. The embedding moves values without arithmetic (the all-reduce adds zeros): exact in both dtypes,
// and so is the f32 one-rank cross-entropy, which does the reference's operations in its order. Split over
// ranks, the cross-entropy sums each row's exponentials in another order:
//  - f32: logits reach ~92, where an f32 ulp is 7.6e-6; each lse is rounded once to f32 (<= 3.8e-6 each) and
//    each side's sum of <= 96 exps in (0, 1] carries a relative error <= 96 * 2^-24 = 5.7e-6 (plus 2 ulp of
//    expf), so |delta lse| <= 2e-5 and kF32.lse = 3e-5. dlogits = scale * exp(x - lse) inherit that relative
//    error and one more rounding: |delta| <= scale * 4e-5 -> kF32.grad = 5e-5 (times scale).
//  - f64: the same counts with 2^-53 give ~5e-14 (exp's argument, shifted by a max rounded to f32, is exact to
//    ulp(92) = 1.4e-14), so 1e-12 for lse and scale * 1e-12 for dlogits.
// The loss sum is compared to count x the lse tolerance (the target logits are exact). A rank's share of a
// row's probability mass missing or counted twice moves lse by >= 1e-2, far above these.
//
// Every rank calls the same collectives in the same order; value checks are EXPECTs so that a failure on one
// rank never leaves the others waiting in a collective.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "core/arena.h"
#include "core/layers/cross_entropy.h"
#include "core/layers/embedding.h"
#include "core/layers/tensor_parallel.h"
#include "core/layers/vocab_parallel.h"
#include "core/rng.h"
#include "parallel/comm.h"
#include "parallel/self_comm.h"
#include "tests/parallel/mpi_world.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

using parallel::Comm;

// TensorParallel over a Comm (the semantics of parallel/tensor_parallel_comm.h) that counts its collectives.
class CountingTensorParallel final : public TensorParallel {
 public:
  explicit CountingTensorParallel(Comm& comm) : comm_(comm) {}
  int size() const override { return comm_.size(); }
  int rank() const override { return comm_.rank(); }
  void all_reduce_sum(std::span<float> data) override {
    ++collectives;
    comm_.all_reduce_sum(data);
  }
  void all_reduce_sum(std::span<double> data) override {
    ++collectives;
    comm_.all_reduce_sum(data);
  }
  void all_reduce_max(std::span<float> data) override {
    ++collectives;
    comm_.all_reduce_max(data);
  }
  Comm& comm() { return comm_; }

  int collectives = 0;

 private:
  Comm& comm_;
};

constexpr int64_t kVocab = 96, kHidden = 72;  // H > 64: the backward's two column blocks
// Range boundaries of 2, 3 and 4 ranks (24, 32, 48, 64, 72) from both sides, the ends, repeats (5 and 95).
const std::vector<int64_t> kIds = {0, 95, 23, 24, 47, 48, 71, 72, 31, 32, 63, 64, 5, 5, 95, 50};
constexpr int64_t kTokens = 16;
constexpr int64_t kBigRow = 2, kMaxElsewhereRow = 3;  // see make_logits

struct Tolerance {
  double lse, grad;
};
constexpr Tolerance kF32{3e-5, 5e-5}, kF64{1e-12, 1e-12}, kExact{0, 0};  // see the header comment

struct TestMemory {
  Arena arena{"vocab parallel test", size_t{16} << 20};
  Tensor zeros(Shape s, DType dt) { return Tensor::zeros(arena, s, dt); }
  Tensor uniform(Shape s, DType dt, uint64_t seed, double scale) {
    Tensor t = Tensor::empty(arena, s, dt);
    fill_uniform(t, Philox(seed), -scale, scale);
    return t;
  }
  Tensor i64(const std::vector<int64_t>& v) {
    Tensor t = Tensor::empty(arena, {static_cast<int64_t>(v.size())}, DType::i64);
    std::memcpy(t.raw(), v.data(), v.size() * sizeof(int64_t));
    return t;
  }
};

// Columns [begin, begin + width) of a [N, V] tensor, as a new contiguous [N, width] tensor.
template <class T>
Tensor columns(TestMemory& m, const Tensor& src, int64_t begin, int64_t width) {
  const int64_t n = src.size(0), v = src.size(1);
  Tensor out = m.zeros({n, width}, dtype_of<T>());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < width; ++j) out.data<T>()[i * width + j] = src.data<T>()[i * v + begin + j];
  return out;
}

Tensor copy_of(TestMemory& m, const Tensor& src) {
  Tensor out = m.zeros(src.shape(), src.dtype());
  copy(out, src);
  return out;
}

// Logits in [-4, 4] (the same on every rank), with row kBigRow raised by 80 (exp overflows f32 without the
// max shift) and row kMaxElsewhereRow's max at id 90 (the last rank's range) while its label is elsewhere.
template <class T>
Tensor make_logits(TestMemory& m) {
  Tensor logits = m.uniform({kTokens, kVocab}, dtype_of<T>(), 7, 4.0);
  T* p = logits.data<T>();
  for (int64_t j = 0; j < kVocab; ++j) p[kBigRow * kVocab + j] += T(80);
  p[kMaxElsewhereRow * kVocab + 90] = T(12);
  return logits;
}

struct LabelCase {
  const char* name;
  std::vector<int64_t> labels;
};
// Mixed: every rank's range, ignored rows, row 3's label 0 far from its max. Rank 0: ids below 24, inside rank
// 0's range for every split. All ignored: nothing counted, the same collectives.
std::vector<LabelCase> label_cases() {
  const int64_t I = kIgnoreIndex;
  return {{"mixed", {17, I, 95, 0, 24, I, 47, 48, 31, 32, 63, 64, 71, 72, I, 5}},
          {"rank 0 owns every target", {0, 1, 23, 2, 3, I, 4, 5, 6, 7, 8, 9, 10, 11, 12, 22}},
          {"all ignored", std::vector<int64_t>(kTokens, I)}};
}

bool vocab_splits_over(int ranks) { return kVocab % ranks == 0; }

template <class T>
void check_embedding(CountingTensorParallel& tp) {
  const DType dt = dtype_of<T>();
  const int64_t rows = kVocab / tp.size(), begin = tp.rank() * rows;
  TestMemory m;
  const Tensor ids = m.i64(kIds);
  const Tensor table = m.uniform({kVocab, kHidden}, dt, 1, 1.0);
  const Tensor table_local = table.narrow(0, begin, rows);
  int64_t ids_here = 0;
  for (int64_t id : kIds) ids_here += id >= begin && id < begin + rows;
  EXPECT_GT(ids_here, 0) << "the test ids miss rank " << tp.rank() << "'s range";

  const Tensor y_ref = m.zeros({kTokens, kHidden}, dt), y = m.zeros({kTokens, kHidden}, dt);
  embedding_forward(ids, table, y_ref);
  tp.collectives = 0;
  vocab_parallel_embedding_forward(ids, table_local, begin, y, tp);
  EXPECT_EQ(tp.collectives, 1);
  EXPECT_EQ(max_abs_diff(y, y_ref), 0.0);

  // Non-zero starting gradients: the backward accumulates.
  const Tensor dy = m.uniform({kTokens, kHidden}, dt, 2, 1.0);
  const Tensor dtable_ref = m.uniform({kVocab, kHidden}, dt, 3, 1.0);
  const Tensor dtable_local = copy_of(m, dtable_ref.narrow(0, begin, rows));
  embedding_backward(ids, dy, dtable_ref);
  vocab_parallel_embedding_backward(ids, dy, begin, dtable_local);
  EXPECT_EQ(max_abs_diff(dtable_local, dtable_ref.narrow(0, begin, rows)), 0.0);
}

template <class T>
void check_cross_entropy(CountingTensorParallel& tp, Tolerance tol) {
  const DType dt = dtype_of<T>();
  const int64_t width = kVocab / tp.size(), begin = tp.rank() * width;
  for (const LabelCase& c : label_cases()) {
    SCOPED_TRACE(c.name);
    TestMemory m;
    const Tensor labels = m.i64(c.labels);
    const Tensor logits = make_logits<T>(m);
    const Tensor logits_local = columns<T>(m, logits, begin, width);
    const Tensor lse_ref = m.zeros({kTokens}, dt), lse = m.zeros({kTokens}, dt);
    const CrossEntropySum ref = cross_entropy_forward(logits, labels, lse_ref);
    tp.collectives = 0;
    const CrossEntropySum got = vocab_parallel_cross_entropy_forward(logits_local, labels, begin, lse, tp);
    EXPECT_EQ(tp.collectives, 2) << "the number of collectives must not depend on the labels";
    EXPECT_EQ(got.count, ref.count);
    EXPECT_NEAR(got.sum, ref.sum, tol.lse * static_cast<double>(ref.count));
    for (int64_t i = 0; i < kTokens; ++i) {
      if (c.labels[i] == kIgnoreIndex)
        EXPECT_EQ(lse.data<T>()[i], T(0)) << "row " << i;
      else
        EXPECT_NEAR(lse.data<T>()[i], lse_ref.data<T>()[i], tol.lse) << "row " << i;
    }

    // Every rank of the group holds the same loss bits.
    const int p = tp.comm().size();
    const std::vector<double> sum_mine = {got.sum};
    const std::vector<int64_t> count_mine = {got.count};
    std::vector<double> sums(p);
    std::vector<int64_t> counts(p);
    tp.comm().all_gather(std::span<const double>(sum_mine), std::span<double>(sums));
    tp.comm().all_gather(std::span<const int64_t>(count_mine), std::span<int64_t>(counts));
    for (int r = 0; r < p; ++r) {
      EXPECT_EQ(std::memcmp(&sums[r], &got.sum, sizeof(double)), 0) << "rank " << r << "'s loss sum differs";
      EXPECT_EQ(counts[r], got.count) << "rank " << r;
    }

    const double scale = ref.count > 0 ? 1.0 / static_cast<double>(ref.count) : 1.0;
    const Tensor dlogits_ref = m.zeros({kTokens, kVocab}, dt), dlogits_local = m.zeros({kTokens, width}, dt);
    cross_entropy_backward(logits, labels, lse_ref, scale, dlogits_ref);
    tp.collectives = 0;
    vocab_parallel_cross_entropy_backward(logits_local, labels, lse, begin, scale, dlogits_local);
    EXPECT_LE(max_abs_diff(dlogits_local, columns<T>(m, dlogits_ref, begin, width)), tol.grad * scale);
    // In place (dlogits aliasing the logits) gives the same bits.
    const Tensor in_place = copy_of(m, logits_local);
    vocab_parallel_cross_entropy_backward(in_place, labels, lse, begin, scale, in_place);
    EXPECT_EQ(max_abs_diff(in_place, dlogits_local), 0.0);
    EXPECT_EQ(tp.collectives, 0) << "the backward communicates nothing";
  }
}

TEST(VocabParallel, EmbeddingMatchesTheWholeTable) {
  if (!vocab_splits_over(mpi_world().size())) GTEST_SKIP() << "V = " << kVocab << " does not split over the world";
  CountingTensorParallel tp(mpi_world());
  check_embedding<float>(tp);
  check_embedding<double>(tp);
}

TEST(VocabParallel, CrossEntropyMatchesTheWholeLogitsF32) {
  if (!vocab_splits_over(mpi_world().size())) GTEST_SKIP() << "V = " << kVocab << " does not split over the world";
  CountingTensorParallel tp(mpi_world());
  check_cross_entropy<float>(tp, kF32);
}

TEST(VocabParallel, CrossEntropyMatchesTheWholeLogitsF64) {
  if (!vocab_splits_over(mpi_world().size())) GTEST_SKIP() << "V = " << kVocab << " does not split over the world";
  CountingTensorParallel tp(mpi_world());
  check_cross_entropy<double>(tp, kF64);
}

// A group of one holds the whole vocabulary: f32 gives the reference's bits; f64 rounds its max shift to f32.
TEST(VocabParallel, OneRankGroupIsTheWholeLayer) {
  parallel::SelfComm self;
  CountingTensorParallel tp(self);
  check_embedding<float>(tp);
  check_embedding<double>(tp);
  check_cross_entropy<float>(tp, kExact);
  check_cross_entropy<double>(tp, kF64);
}

// The same bad arguments on every rank: each throws before any communication, so none is left waiting.
TEST(VocabParallel, ArgumentErrorsNameTheFunctionAndArgument) {
  if (!vocab_splits_over(mpi_world().size())) GTEST_SKIP() << "V = " << kVocab << " does not split over the world";
  CountingTensorParallel tp(mpi_world());
  const int64_t width = kVocab / tp.size(), begin = tp.rank() * width;
  TestMemory m;
  const Tensor ids = m.i64(kIds), labels = m.i64(label_cases()[0].labels);
  const Tensor table_local = m.zeros({width, kHidden}, DType::f32), y = m.zeros({kTokens, kHidden}, DType::f32);
  const Tensor logits_local = m.zeros({kTokens, width}, DType::f32), lse = m.zeros({kTokens}, DType::f32);

  expect_error([&] { vocab_parallel_embedding_forward(ids, table_local, begin + 1, y, tp); },
               "vocab_parallel_embedding_forward: vocab_begin " + std::to_string(begin + 1) + " is not tp rank");
  std::vector<int64_t> bad_ids = kIds;
  bad_ids[3] = kVocab;
  expect_error([&] { vocab_parallel_embedding_forward(m.i64(bad_ids), table_local, begin, y, tp); },
               "vocab_parallel_embedding_forward: ids[3] = 96 is not in the vocabulary [0, 96)");
  const Tensor y_f64 = m.zeros({kTokens, kHidden}, DType::f64);
  expect_error([&] { vocab_parallel_embedding_forward(ids, table_local, begin, y_f64, tp); },
               "vocab_parallel_embedding_forward: y has dtype f64, expected f32");
  bad_ids[3] = -1;
  expect_error([&] { vocab_parallel_embedding_backward(m.i64(bad_ids), y, begin, table_local); },
               "vocab_parallel_embedding_backward: ids[3] = -1 is not in the vocabulary [0, V)");
  expect_error([&] { vocab_parallel_embedding_backward(ids, y, width + 1, table_local); },
               "vocab_parallel_embedding_backward: vocab_begin " + std::to_string(width + 1) +
                   " is not a non-negative multiple");

  expect_error([&] { vocab_parallel_cross_entropy_forward(logits_local, labels, begin + width * tp.size(), lse, tp); },
               "vocab_parallel_cross_entropy_forward: vocab_begin");
  std::vector<int64_t> bad_labels = label_cases()[0].labels;
  bad_labels[4] = kVocab;
  expect_error([&] { vocab_parallel_cross_entropy_forward(logits_local, m.i64(bad_labels), begin, lse, tp); },
               "vocab_parallel_cross_entropy_forward: labels[4] = 96 is neither -100 nor in the vocabulary [0, 96)");
  const Tensor long_lse = m.zeros({kTokens + 1}, DType::f32);
  expect_error([&] { vocab_parallel_cross_entropy_forward(logits_local, labels, begin, long_lse, tp); },
               "vocab_parallel_cross_entropy_forward: lse has shape [17], expected [16]");
  expect_error([&] { vocab_parallel_cross_entropy_backward(logits_local, labels, lse, begin, 1.0, y); },
               "vocab_parallel_cross_entropy_backward: dlogits_local has shape");
  bad_labels[4] = -2;
  const Tensor negative = m.i64(bad_labels);
  expect_error([&] { vocab_parallel_cross_entropy_backward(logits_local, negative, lse, begin, 1.0, logits_local); },
               "vocab_parallel_cross_entropy_backward: labels[4] = -2 is neither -100 nor in the vocabulary [0, V)");
  EXPECT_EQ(tp.collectives, 0) << "arguments are checked before any communication";
}

}  // namespace
}  // namespace q3vl::test
