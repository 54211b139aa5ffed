// Human-readable durations and byte counts of progress lines.
#include <gtest/gtest.h>

#include "core/human_units.h"

namespace q3vl {
namespace {

TEST(HumanUnits, Durations) {
  EXPECT_EQ(human_duration(0.4), "0s");
  EXPECT_EQ(human_duration(42), "42s");
  EXPECT_EQ(human_duration(187), "3m07s");
  EXPECT_EQ(human_duration(3900), "1h05m");
  EXPECT_EQ(human_duration(-5), "0s");
}

TEST(HumanUnits, BinaryByteCounts) {
  EXPECT_EQ(human_bytes(512), "512 B");
  EXPECT_EQ(human_bytes(1536), "1.50 KiB");
  EXPECT_EQ(human_bytes(3.0 * (1 << 30)), "3.00 GiB");
}

}  // namespace
}  // namespace q3vl
