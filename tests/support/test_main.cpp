// gtest main for q3vl test binaries: resets the test arena before each test and prints (and writes to
// $Q3VL_GRADCHECK_REPORT when set) which layers and tensors had their gradients checked.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <iostream>

#include "tests/support/gradcheck.h"

namespace {
class ArenaReset : public testing::EmptyTestEventListener {
  void OnTestStart(const testing::TestInfo&) override { q3vl::test::test_arena().reset(); }
};
}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  testing::UnitTest::GetInstance()->listeners().Append(new ArenaReset);
  const int rc = RUN_ALL_TESTS();
  const std::string report = q3vl::test::gradcheck_report();
  std::cout << report;
  if (const char* path = std::getenv("Q3VL_GRADCHECK_REPORT")) std::ofstream(path) << report;
  return rc;
}
