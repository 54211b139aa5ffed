// gtest main for the MPI suite: starts MPI, runs the cases on every rank (rank 0 prints gtest's report,
// the other ranks print only their failures, prefixed with the rank) and fails the run on every rank when
// any rank failed, so mpiexec's exit status covers them all.
#include <gtest/gtest.h>

#include <cstdint>
#include <iostream>

#include "parallel/mpi_comm.h"
#include "tests/parallel/mpi_world.h"

namespace q3vl::test {

namespace {

parallel::Comm* world_comm = nullptr;

class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const testing::TestPartResult& result) override {
    if (result.failed())
      std::cerr << "rank " << rank_ << ": " << (result.file_name() ? result.file_name() : "?") << ":"
                << result.line_number() << ": " << result.summary() << std::endl;
  }

 private:
  int rank_;
};

}  // namespace

parallel::Comm& mpi_world() { return *world_comm; }

}  // namespace q3vl::test

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  q3vl::parallel::MpiSession session;
  q3vl::parallel::Comm& world = session.world();
  q3vl::test::world_comm = &world;
  testing::TestEventListeners& listeners = testing::UnitTest::GetInstance()->listeners();
  if (world.rank() != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new q3vl::test::RankFailurePrinter(world.rank()));
  }
  int64_t failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  const int64_t failed_here = failed;
  world.all_reduce_max(std::span(&failed, 1));
  if (failed && !failed_here && world.rank() == 0) std::cerr << "q3vl_parallel_tests: another rank failed\n";
  return static_cast<int>(failed);
}
