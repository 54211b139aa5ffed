// Comm under MPI (every rank of the mpiexec run) and SelfComm: each operation against values computed here
// from the rank-dependent inputs, argument errors named by operation, MPI errors as q3vl::Error. Inputs of
// the exact-value tests are small integers, so fp32/fp64 sums are exact in any reduction order and compare
// with ==. Every rank calls the same collectives in the same order; value checks are EXPECTs so that a
// failure on one rank never leaves the others waiting in a collective.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "core/check.h"
#include "parallel/comm.h"
#include "parallel/mpi_comm.h"
#include "parallel/self_comm.h"
#include "tests/parallel/mpi_world.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

using parallel::Comm;

std::byte byte_of(int64_t v) { return static_cast<std::byte>(v & 0xff); }

// Lengths that cover empty, one element, odd sizes and a buffer big enough for MPI's segmented algorithms.
const std::vector<size_t> kLengths = {0, 1, 7, 1000, 100003};

TEST(MpiComm, LaunchedByMpirunAndRanksAreDistinct) {
  Comm& world = mpi_world();
  EXPECT_TRUE(parallel::MpiSession::launched_by_mpirun());
  ASSERT_GE(world.size(), 1);
  std::vector<int64_t> mine = {world.rank()}, all(world.size());
  world.all_gather(std::span<const int64_t>(mine), std::span<int64_t>(all));
  for (int r = 0; r < world.size(); ++r) EXPECT_EQ(all[r], r);
  world.barrier();
}

// Rank 0 enters the barrier 100 ms late: no rank may leave before rank 0 entered. steady_clock is the
// system-wide monotonic clock on Linux, so the ranks' readings compare.
TEST(MpiComm, BarrierWaitsForTheLastRank) {
  Comm& world = mpi_world();
  using clock = std::chrono::steady_clock;
  int64_t entered = 0;
  if (world.rank() == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    entered = clock::now().time_since_epoch().count();
  }
  world.barrier();
  const int64_t left = clock::now().time_since_epoch().count();
  world.broadcast(&entered, sizeof(entered), 0);
  EXPECT_GE(left, entered);
}

TEST(MpiComm, BroadcastFromEveryRoot) {
  Comm& world = mpi_world();
  for (int root = 0; root < world.size(); ++root) {
    std::vector<uint8_t> buf(37, 0xEE);
    if (world.rank() == root)
      for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(root * 31 + i);
    world.broadcast(buf.data(), buf.size(), root);
    for (size_t i = 0; i < buf.size(); ++i) EXPECT_EQ(buf[i], static_cast<uint8_t>(root * 31 + i)) << "root " << root;
  }
}

TEST(MpiComm, AllReduceSumIsExactForEveryType) {
  Comm& world = mpi_world();
  const int64_t p = world.size(), me = world.rank();
  const int64_t rank_sum = p * (p - 1) / 2;
  for (size_t n : kLengths) {
    std::vector<float> f(n);
    std::vector<double> d(n);
    std::vector<int64_t> q(n);
    // f32 values stay below 2^24 (exact); i64 values need more than 32 bits.
    for (size_t i = 0; i < n; ++i) {
      f[i] = static_cast<float>(me * 1000 + static_cast<int64_t>(i % 4096));
      d[i] = 0.5 * static_cast<double>(me) - static_cast<double>(i);
      q[i] = (me + 1) * (int64_t{1} << 40) + static_cast<int64_t>(i);
    }
    world.all_reduce_sum(std::span(f));
    world.all_reduce_sum(std::span(d));
    world.all_reduce_sum(std::span(q));
    for (size_t i = 0; i < n; ++i) {
      const int64_t ii = static_cast<int64_t>(i);
      ASSERT_EQ(f[i], static_cast<float>(rank_sum * 1000 + p * (ii % 4096))) << "n " << n << " i " << i;
      ASSERT_EQ(d[i], 0.5 * static_cast<double>(rank_sum) - static_cast<double>(p * ii)) << "n " << n << " i " << i;
      ASSERT_EQ(q[i], (rank_sum + p) * (int64_t{1} << 40) + p * ii) << "n " << n << " i " << i;
    }
  }
}

TEST(MpiComm, AllReduceMax) {
  Comm& world = mpi_world();
  const int64_t p = world.size(), me = world.rank();
  for (size_t n : kLengths) {
    std::vector<double> d(n);
    std::vector<int64_t> q(n);
    const auto value = [](int64_t rank, int64_t i) { return (i * 7 + rank * 13) % 101 - 50; };
    for (size_t i = 0; i < n; ++i) {
      d[i] = static_cast<double>(value(me, i)) + 0.25;
      q[i] = value(me, i) * (int64_t{1} << 35);
    }
    world.all_reduce_max(std::span(d));
    world.all_reduce_max(std::span(q));
    for (size_t i = 0; i < n; ++i) {
      int64_t expected = value(0, i);
      for (int64_t r = 1; r < p; ++r) expected = std::max(expected, value(r, i));
      ASSERT_EQ(d[i], static_cast<double>(expected) + 0.25) << "n " << n << " i " << i;
      ASSERT_EQ(q[i], expected * (int64_t{1} << 35)) << "n " << n << " i " << i;
    }
  }
}

// Inexact fp32 sums: every rank must hold the same bits, the same bits again when the reduction is repeated,
// and values within rounding of the f64 sum. Tolerance: p terms of magnitude <= 1 summed in fp32 in any order
// err by at most (p - 1) * 2^-24 * p, below 1e-5 for p <= 8.
TEST(MpiComm, AllReduceSumIsBitwiseIdenticalOnEveryRankAndRepeatable) {
  Comm& world = mpi_world();
  const int p = world.size(), me = world.rank();
  const size_t n = 4099;
  std::vector<float> input(n);
  for (size_t i = 0; i < n; ++i) input[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i) + 1.3 * me));
  std::vector<float> first = input, second = input;
  world.all_reduce_sum(std::span(first));
  world.all_reduce_sum(std::span(second));
  EXPECT_EQ(std::memcmp(first.data(), second.data(), n * sizeof(float)), 0);
  std::vector<float> everyone(n * p);
  world.all_gather(std::span<const float>(first), std::span<float>(everyone));
  for (int r = 0; r < p; ++r)
    EXPECT_EQ(std::memcmp(everyone.data() + r * n, first.data(), n * sizeof(float)), 0) << "rank " << r << " differs";
  for (size_t i = 0; i < n; ++i) {
    double exact = 0;
    for (int r = 0; r < p; ++r) exact += static_cast<float>(std::sin(0.37 * static_cast<double>(i) + 1.3 * r));
    ASSERT_NEAR(first[i], exact, 1e-5) << "i " << i;
  }
}

TEST(MpiComm, AllGatherBytesAndTyped) {
  Comm& world = mpi_world();
  const int p = world.size(), me = world.rank();
  for (size_t n : {size_t{0}, size_t{5}, size_t{4096}}) {
    std::vector<std::byte> send(n), recv(n * p, std::byte{0xEE});
    for (size_t i = 0; i < n; ++i) send[i] = byte_of(me * 17 + static_cast<int64_t>(i));
    world.all_gather(send, recv);
    for (int r = 0; r < p; ++r)
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(recv[r * n + i], byte_of(r * 17 + static_cast<int64_t>(i)));
  }
  std::vector<double> mine = {me + 0.5, -me * 2.0, 3.0}, all(3 * p);
  world.all_gather(std::span<const double>(mine), std::span<double>(all));
  for (int r = 0; r < p; ++r) {
    EXPECT_EQ(all[3 * r], r + 0.5);
    EXPECT_EQ(all[3 * r + 1], -r * 2.0);
    EXPECT_EQ(all[3 * r + 2], 3.0);
  }
}

TEST(MpiComm, ReduceScatterSum) {
  Comm& world = mpi_world();
  const int64_t p = world.size(), me = world.rank();
  const int64_t rank_sum = p * (p - 1) / 2;
  for (size_t block : {size_t{0}, size_t{1}, size_t{7}, size_t{10000}}) {
    std::vector<float> sf(block * p), rf(block, -1.0f);
    std::vector<double> sd(block * p), rd(block, -1.0);
    // Element i of the block meant for rank b: rank * 100 + b * 10 + i on this rank (exact in fp32).
    for (int64_t b = 0; b < p; ++b)
      for (size_t i = 0; i < block; ++i) {
        sf[b * block + i] = static_cast<float>(me * 100 + b * 10 + static_cast<int64_t>(i % 1000));
        sd[b * block + i] = static_cast<double>(me * 100 + b * 10) + 0.125 * static_cast<double>(i);
      }
    world.reduce_scatter_sum(std::span<const float>(sf), std::span<float>(rf));
    world.reduce_scatter_sum(std::span<const double>(sd), std::span<double>(rd));
    for (size_t i = 0; i < block; ++i) {
      const int64_t ii = static_cast<int64_t>(i);
      ASSERT_EQ(rf[i], static_cast<float>(rank_sum * 100 + p * (me * 10 + ii % 1000))) << "block " << block;
      ASSERT_EQ(rd[i], static_cast<double>(rank_sum * 100 + p * me * 10) + 0.125 * static_cast<double>(p * ii))
          << "block " << block;
    }
  }
}

// Rank s sends (s + 2d + 1) % 5 bytes to rank d (some blocks empty), valued s * 37 + d * 11 + k. Blocks sit
// three bytes apart in both buffers so that displacements matter; the gaps must stay untouched.
int64_t block_bytes(int64_t from, int64_t to) { return (from + 2 * to + 1) % 5; }
std::byte block_value(int64_t from, int64_t to, int64_t k) { return byte_of(from * 37 + to * 11 + k); }

TEST(MpiComm, AllToAllVWithDisplacements) {
  Comm& world = mpi_world();
  const int p = world.size(), me = world.rank();
  std::vector<int64_t> sc(p), sd(p), rc(p), rd(p);
  int64_t send_end = 0, recv_end = 0;
  for (int r = 0; r < p; ++r) {
    sc[r] = block_bytes(me, r);
    sd[r] = send_end + 3;
    send_end = sd[r] + sc[r];
    rc[r] = block_bytes(r, me);
    rd[r] = recv_end + 3;
    recv_end = rd[r] + rc[r];
  }
  std::vector<std::byte> send(send_end, std::byte{0x55}), recv(recv_end, std::byte{0xAA});
  for (int r = 0; r < p; ++r)
    for (int64_t k = 0; k < sc[r]; ++k) send[sd[r] + k] = block_value(me, r, k);
  world.all_to_all_v(send, sc, sd, recv, rc, rd);
  std::vector<std::byte> expected(recv_end, std::byte{0xAA});
  for (int r = 0; r < p; ++r)
    for (int64_t k = 0; k < rc[r]; ++k) expected[rd[r] + k] = block_value(r, me, k);
  EXPECT_EQ(recv, expected);
}

TEST(MpiComm, ExchangeCountsThenData) {
  Comm& world = mpi_world();
  const int p = world.size(), me = world.rank();
  std::vector<int64_t> counts(p);
  for (int r = 0; r < p; ++r) counts[r] = block_bytes(me, r) * 1000;
  const std::vector<int64_t> received = parallel::exchange_counts(world, counts);
  for (int r = 0; r < p; ++r) EXPECT_EQ(received[r], block_bytes(r, me) * 1000);

  std::vector<std::byte> send;
  for (int r = 0; r < p; ++r)
    for (int64_t k = 0; k < counts[r]; ++k) send.push_back(block_value(me, r, k));
  const parallel::AllToAllResult got = parallel::all_to_all_v_with_counts(world, send, counts);
  ASSERT_EQ(got.counts, received);
  int64_t offset = 0;
  for (int r = 0; r < p; ++r) {
    EXPECT_EQ(got.displs[r], offset);
    for (int64_t k = 0; k < got.counts[r]; ++k) ASSERT_EQ(got.data[offset + k], block_value(r, me, k)) << "from " << r;
    offset += got.counts[r];
  }
  EXPECT_EQ(static_cast<int64_t>(got.data.size()), offset);
}

TEST(MpiComm, GatherStringsToEveryRoot) {
  Comm& world = mpi_world();
  const int p = world.size(), me = world.rank();
  // Rank 1 sends an empty string, rank 2 a long one.
  const auto text = [](int r) {
    return r == 1 ? std::string() : std::string(r == 2 ? 100000 : 3 * r + 1, static_cast<char>('a' + r));
  };
  for (int root = 0; root < p; ++root) {
    const std::vector<std::string> got = world.gather_strings(text(me), root);
    if (me == root) {
      ASSERT_EQ(static_cast<int>(got.size()), p);
      for (int r = 0; r < p; ++r) EXPECT_EQ(got[r], text(r)) << "root " << root << " from " << r;
    } else {
      EXPECT_TRUE(got.empty());
    }
  }
}

TEST(MpiComm, SplitByParityOrdersByKey) {
  Comm& world = mpi_world();
  const int p = world.size(), me = world.rank();
  // Key -rank: the new ranks run in reverse world order within each parity.
  std::unique_ptr<Comm> half = world.split(me % 2, -me);
  std::vector<int> members;
  for (int r = p - 1; r >= 0; --r)
    if (r % 2 == me % 2) members.push_back(r);
  ASSERT_EQ(half->size(), static_cast<int>(members.size()));
  EXPECT_EQ(members[half->rank()], me);
  std::vector<int64_t> sum = {me};
  half->all_reduce_sum(std::span(sum));
  int64_t expected = 0;
  for (int r : members) expected += r;
  EXPECT_EQ(sum[0], expected);
  std::vector<std::byte> ranks(half->size());
  const std::byte mine = byte_of(me);
  half->all_gather(std::span(&mine, 1), ranks);
  for (size_t i = 0; i < members.size(); ++i) EXPECT_EQ(ranks[i], byte_of(members[i]));

  // A further split of the sub-communicator, and one rank per communicator.
  std::unique_ptr<Comm> alone = half->split(half->rank(), 0);
  EXPECT_EQ(alone->size(), 1);
  EXPECT_EQ(alone->rank(), 0);
  std::vector<double> v = {1.5};
  alone->all_reduce_sum(std::span(v));
  EXPECT_EQ(v[0], 1.5);
}

// The same bad arguments on every rank: each rank throws before any communication, so none is left waiting.
TEST(MpiComm, ArgumentErrorsNameTheOperation) {
  Comm& world = mpi_world();
  const int p = world.size();
  std::vector<float> f(3), g(3 * p + 1);
  std::vector<std::byte> b(4), big(4 * p + 2);
  expect_error([&] { world.reduce_scatter_sum(std::span<const float>(g), std::span<float>(f)); },
               "reduce_scatter_sum: send holds " + std::to_string(3 * p + 1) + " elements");
  expect_error([&] { world.all_gather(b, big); }, "all_gather: recv holds");
  expect_error([&] { world.broadcast(b.data(), b.size(), p); }, "broadcast: root " + std::to_string(p));
  expect_error([&] { world.gather_strings("x", -1); }, "gather_strings: root -1");
  expect_error([&] { world.split(-1, 0); }, "split: color must be non-negative");
  std::vector<int64_t> counts(p, 1), displs(p, 0), short_counts(p + 1, 0);
  expect_error([&] { world.all_to_all_v(b, short_counts, displs, b, counts, displs); },
               "all_to_all_v: send has " + std::to_string(p + 1) + " counts");
  displs.back() = 4;
  expect_error([&] { world.all_to_all_v(b, counts, displs, b, counts, displs); }, "all_to_all_v: send block for rank");
  std::vector<int64_t> wrong(p, 0);
  wrong[0] = 1;
  expect_error([&] { parallel::all_to_all_v_with_counts(world, b, wrong); }, "counts add up to 1 bytes but send holds 4");
  // Beyond MPI's int counts: refused before MPI reads the (small) buffer.
  expect_error([&] { world.broadcast(b.data(), size_t{3} << 30, 0); },
               "broadcast: byte count 3221225472 exceeds MPI's int count limit");
}

TEST(MpiComm, MpiErrorsBecomeQ3vlErrors) {
  expect_error([] { parallel::check_mpi(MPI_ERR_COUNT, "all_gather"); }, "parallel: all_gather: MPI error");
  // MpiSession made MPI return errors instead of aborting: an invalid communicator is reported, not fatal.
  int rank = -1;
  const int code = MPI_Comm_rank(MPI_COMM_NULL, &rank);
  EXPECT_NE(code, MPI_SUCCESS);
  expect_error([&] { parallel::check_mpi(code, "rank"); }, "parallel: rank: MPI error");
}

// Run only by the CTest entry parallel_abort_all (ranks >= 2): rank 1 fails alone while the others wait in a
// barrier it never reaches; abort_all must end them all, printing the rank and reason.
TEST(MpiComm, DISABLED_AbortAllEndsEveryRank) {
  Comm& world = mpi_world();
  if (world.rank() == 1) parallel::abort_all("deliberate failure for the abort test");
  world.barrier();
  ADD_FAILURE() << "abort_all did not end rank " << world.rank();
}

TEST(SelfComm, EveryOperationOnOneRank) {
  parallel::SelfComm self;
  EXPECT_EQ(self.rank(), 0);
  EXPECT_EQ(self.size(), 1);
  self.barrier();
  std::vector<uint8_t> buf = {1, 2, 3};
  self.broadcast(buf.data(), buf.size(), 0);
  EXPECT_EQ(buf, (std::vector<uint8_t>{1, 2, 3}));
  std::vector<float> f = {1.5f, -2.0f};
  std::vector<double> d = {0.25};
  std::vector<int64_t> q = {int64_t{1} << 50};
  self.all_reduce_sum(std::span(f));
  self.all_reduce_sum(std::span(d));
  self.all_reduce_sum(std::span(q));
  self.all_reduce_max(std::span(d));
  self.all_reduce_max(std::span(q));
  EXPECT_EQ(f, (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(d, (std::vector<double>{0.25}));
  EXPECT_EQ(q, (std::vector<int64_t>{int64_t{1} << 50}));
  std::vector<float> gathered(2);
  self.all_gather(std::span<const float>(f), std::span<float>(gathered));
  EXPECT_EQ(gathered, f);
  std::vector<double> rs(3);
  const std::vector<double> sd = {1, 2, 3};
  self.reduce_scatter_sum(std::span<const double>(sd), std::span<double>(rs));
  EXPECT_EQ(rs, sd);
  const std::vector<std::byte> send = {std::byte{9}, std::byte{8}, std::byte{7}};
  std::vector<std::byte> recv(4, std::byte{0});
  const std::vector<int64_t> count = {2}, send_displ = {1}, recv_displ = {2};
  self.all_to_all_v(send, count, send_displ, recv, count, recv_displ);
  EXPECT_EQ(recv, (std::vector<std::byte>{std::byte{0}, std::byte{0}, std::byte{8}, std::byte{7}}));
  const parallel::AllToAllResult all = parallel::all_to_all_v_with_counts(self, send, std::vector<int64_t>{3});
  EXPECT_EQ(all.data, send);
  EXPECT_EQ(all.counts, (std::vector<int64_t>{3}));
  EXPECT_EQ(self.gather_strings("only", 0), (std::vector<std::string>{"only"}));
  std::unique_ptr<Comm> sub = self.split(5, 2);
  EXPECT_EQ(sub->size(), 1);
}

TEST(SelfComm, ArgumentErrors) {
  parallel::SelfComm self;
  std::vector<float> f(2), g(3);
  expect_error([&] { self.reduce_scatter_sum(std::span<const float>(g), std::span<float>(f)); },
               "reduce_scatter_sum: send holds 3 elements, expected 1 ranks x 2");
  expect_error([&] { self.broadcast(f.data(), 8, 1); }, "broadcast: root 1 is outside ranks 0..0");
  std::vector<std::byte> b(4);
  const std::vector<int64_t> two = {2}, three = {3}, zero = {0};
  expect_error([&] { self.all_to_all_v(b, two, zero, b, three, zero); },
               "all_to_all_v: rank 0 sends 2 bytes to itself but expects to receive 3");
  expect_error([&] { self.all_to_all_v(b, three, two, b, three, zero); },
               "all_to_all_v: send block for rank 0 spans bytes [2, 5) of a 4-byte buffer");
}

}  // namespace
}  // namespace q3vl::test
