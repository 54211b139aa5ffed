// Token embedding on the CUDA device against the CPU reference: the gather, and the scatter-add backward with
// repeated ids in both of its owner searches (more tokens than table rows, and fewer), a vocabulary slice, more
// columns than one block covers, bitwise repeatability, and ids outside the table (NaN rows, skipped in the
// backward) — f32 and bf16, gradients accumulated into random starting values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/layers/embedding.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct EmbeddingCase {
  int64_t vocab, n, h;
};

// {5, 37, 19} and {97, 4096, 1100}: more tokens than rows; {1000, 37, 129} and {50000, 300, 64}: fewer.
const EmbeddingCase kCases[] = {{1, 1, 1}, {5, 37, 19}, {1000, 37, 129}, {97, 4096, 1100}, {50000, 300, 64}};

// Ids in [0, vocab) with many repeats: every other token draws from the first 7 ids.
Tensor random_ids(int64_t n, int64_t vocab, uint64_t seed) {
  Tensor ids = Tensor::empty(host_arena(), {n}, DType::i64);
  int64_t* p = ids.data<int64_t>();
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const int64_t r = static_cast<int64_t>(s >> 33);
    p[i] = i % 2 ? r % std::min<int64_t>(vocab, 7) : r % vocab;
  }
  return ids;
}

void check_embedding(const EmbeddingCase& c, DType dt, DType gdt) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " vocab=" + std::to_string(c.vocab) + " n=" + std::to_string(c.n) +
               " h=" + std::to_string(c.h) + " " + std::string(dtype_name(dt)) + " grads " +
               std::string(dtype_name(gdt)));
  const bool bf = dt == DType::bf16;
  auto in_values = [&](Tensor t) { return bf ? rounded_to_bf16(t) : t; };
  auto grad_values = [&](Tensor t) { return gdt == DType::bf16 ? rounded_to_bf16(t) : t; };
  const Tensor ids = random_ids(c.n, c.vocab, seed);
  const Tensor table = in_values(host_random({c.vocab, c.h}, seed + 1, 1.0));
  const Tensor dy = in_values(host_random({c.n, c.h}, seed + 2, 1.0));
  Tensor y = Tensor::empty(host_arena(), {c.n, c.h}, DType::f32);
  embedding_forward(ids, table, y);
  Tensor dtable = grad_values(host_random({c.vocab, c.h}, seed + 3, 0.5));
  const Tensor dtable_d = to_device(dtable, gdt);
  embedding_backward(ids, dy, dtable);
  // A vocabulary slice of the middle third: ids outside it are skipped.
  const int64_t begin = c.vocab / 3, rows = std::max<int64_t>(1, c.vocab / 3);
  Tensor dslice = grad_values(host_random({rows, c.h}, seed + 4, 0.5));
  const Tensor dslice_d = to_device(dslice, gdt);
  embedding_backward_rows(ids, dy, begin, dslice);
  const double tol = bf ? kTolBf16 : kTolF32;

  const Tensor idsd = to_device_raw(ids), dyd = to_device(dy, dt);
  const Tensor yd = poisoned({c.n, c.h}, dt);
  embedding_forward(idsd, to_device(table, dt), yd);
  expect_rel("y", yd, y, 0.0);  // a gather is exact
  const Tensor start = to_host_f32(dtable_d);
  embedding_backward(idsd, dyd, dtable_d);
  expect_rel("dtable", dtable_d, dtable, tol);
  embedding_backward_rows(idsd, dyd, begin, dslice_d);
  expect_rel("dtable slice", dslice_d, dslice, tol);
  // Repeatable to the bit: the same sums from the same start.
  const Tensor again = to_device(start, gdt);
  embedding_backward(idsd, dyd, again);
  const Tensor a = to_host_f32(dtable_d), b = to_host_f32(again);
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << "embedding_backward is not bitwise repeatable";
}

TEST(GpuEmbedding, MatchesCpuInF32) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) check_embedding(c, DType::f32, DType::f32);
}

TEST(GpuEmbedding, MatchesCpuInBf16) {
  Q3VL_REQUIRE_GPU();
  for (const auto& c : kCases) {
    check_embedding(c, DType::bf16, DType::f32);
    check_embedding(c, DType::bf16, DType::bf16);
  }
}

TEST(GpuEmbedding, IdsOutsideTheTableGiveNanRowsAndAreSkippedInTheBackward) {
  Q3VL_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int64_t vocab = 6, h = 5;
  Tensor ids = Tensor::empty(host_arena(), {4}, DType::i64);
  const int64_t values[4] = {2, -1, 6, 2};
  std::memcpy(ids.raw(), values, sizeof values);
  const Tensor table = host_random({vocab, h}, seed);
  const Tensor yd = poisoned({4, h}, DType::f32);
  embedding_forward(to_device_raw(ids), to_device(table, DType::f32), yd);
  const Tensor y = to_host_f32(yd);
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < h; ++j) {
      const float v = y.data<float>()[i * h + j];
      if (i == 1 || i == 2) EXPECT_TRUE(std::isnan(v)) << "row " << i;
      else EXPECT_EQ(v, table.data<float>()[2 * h + j]) << "row " << i;
    }
  // The CPU's slice backward skips ids outside the slice: the whole table as a slice is the reference.
  const Tensor dy = host_random({4, h}, seed + 1);
  Tensor dtable = host_random({vocab, h}, seed + 2);
  const Tensor dtable_d = to_device(dtable, DType::f32);
  embedding_backward_rows(ids, dy, 0, dtable);
  embedding_backward(to_device_raw(ids), to_device(dy, DType::f32), dtable_d);
  expect_rel("dtable", dtable_d, dtable, kTolF32);
}

TEST(GpuEmbedding, BadInputIsNamed) {
  Q3VL_REQUIRE_GPU();
  Tensor ids32 = Tensor::empty(device_arena(), {3}, DType::i32);
  const Tensor table = to_device(host_random({10, 4}, 1), DType::f32);
  expect_error([&] { embedding_forward(ids32, table, poisoned({3, 4}, DType::f32)); },
               "embedding_forward: ids has dtype i32, expected i64");
  Tensor ids = Tensor::empty(host_arena(), {3}, DType::i64);
  std::memset(ids.raw(), 0, ids.nbytes());
  expect_error([&] { embedding_forward(ids, table, poisoned({3, 4}, DType::f32)); },
               "embedding_forward: ids i64[3] is in host memory");
  expect_error([&] { embedding_backward(to_device_raw(ids), poisoned({3, 4}, DType::f32), poisoned({10, 4}, DType::f64)); },
               "embedding_backward_rows: dtable has dtype f64");
}

}  // namespace
}  // namespace q3vl::test
