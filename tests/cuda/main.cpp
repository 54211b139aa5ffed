// gtest main of q3vl_cuda_tests: resets the host and device test arenas before each test.
#include <gtest/gtest.h>

#include "tests/cuda/gpu_test_support.h"

namespace {
class ArenaReset : public testing::EmptyTestEventListener {
  void OnTestStart(const testing::TestInfo&) override { q3vl::test::reset_test_arenas(); }
};
}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  testing::UnitTest::GetInstance()->listeners().Append(new ArenaReset);
  return RUN_ALL_TESTS();
}
