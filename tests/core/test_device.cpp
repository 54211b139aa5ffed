// Device awareness of core without a GPU: CUDA arenas and copies are refused with the reason named (no CUDA
// backend in this binary, or no usable device), tensors name their device, and bf16 rounds to nearest even.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/arena.h"
#include "core/bf16.h"
#include "core/device.h"
#include "core/tensor.h"
#include "tests/support/gradcheck.h"

namespace q3vl {
namespace {

TEST(Device, CudaArenaWithoutAUsableDeviceIsRefusedWithTheReason) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is usable here";
  const std::string reason = cuda_built() ? "no usable CUDA device" : "built without the CUDA backend";
  test::expect_error([] { Arena a("activations", 1024, Device::cuda); }, "arena 'activations'");
  test::expect_error([] { Arena a("activations", 1024, Device::cuda); }, reason);
  test::expect_error([] { require_cuda("--device cuda"); }, "--device cuda: ");
  test::expect_error([] { require_cuda("--device cuda"); }, reason);
}

TEST(Device, TensorNamesItsDeviceOnlyWhenNotTheHost) {
  float x[6] = {};
  EXPECT_EQ(Tensor(x, DType::f32, {2, 3}).str(), "f32[2,3]");
  EXPECT_EQ(Tensor(x, DType::f32, {2, 3}, Device::cuda).str(), "f32[2,3]@cuda");
}

TEST(Device, HostAccessToADeviceTensorIsAnError) {
  float x[2] = {};
  const Tensor t(x, DType::f32, {2}, Device::cuda);
  test::expect_error([&] { (void)t.data<float>(); }, "is not in host memory");
  test::expect_error([&] { fill(t, 1.0); }, "is not in host memory");
  const Tensor h(x, DType::f32, {2});
  test::expect_error([&] { (void)h.device_data<float>(DType::f32); }, "is not in device memory");
}

TEST(Bf16, RoundsToNearestEvenAndKeepsSpecials) {
  // 1 + 2^-8 lies halfway between the bf16 neighbours 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(static_cast<float>(bf16(1.0f + 0x1p-8f)), 1.0f);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up to the even one.
  EXPECT_EQ(static_cast<float>(bf16(1.0f + 3 * 0x1p-8f)), 1.0f + 0x1p-6f);
  EXPECT_EQ(static_cast<float>(bf16(1.0f + 0x1p-8f + 0x1p-20f)), 1.0f + 0x1p-7f);  // above the tie: up
  EXPECT_TRUE(std::isinf(static_cast<float>(bf16(std::numeric_limits<float>::max()))));
  EXPECT_TRUE(std::isnan(static_cast<float>(bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(bf16(-0.0f).bits, 0x8000);
  EXPECT_EQ(dtype_of<bf16>(), DType::bf16);
}

}  // namespace
}  // namespace q3vl
