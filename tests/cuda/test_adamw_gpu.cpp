// AdamW on the CUDA device against the CPU optimizer: several steps with changing gradients, learning rates and
// clipping scales, decay on and off, lr_scale, a frozen tensor, both branches of torch's lerp; parameters and
// moments equal bit for bit (both sides use the same fp32 operations, correctly rounded sqrt and division, and
// fma only where the CPU has one), and the bf16 compute copy equals round_to_bf16(param). Bad input named.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/kernels/cuda_layers.h"
#include "core/optim/adamw.h"
#include "tests/cuda/gpu_test_support.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

struct Spec {
  const char* name;
  Shape shape;
  bool decay;
  double lr_scale;
  bool frozen;
  bool bf16_copy;
};

const Spec kSpecs[] = {
    {"one", {1}, true, 1.0, false, true},           {"odd", {7, 13}, false, 0.5, false, true},
    {"frozen", {3, 5, 7}, true, 1.0, true, false},  {"no_copy", {1000}, true, 2.0, false, false},
    {"large", {70001}, true, 1.0, false, true},     {"zero_scale", {33}, true, 0.0, false, true},
};

template <class V>
std::vector<V> host_values(const Tensor& d) {
  std::vector<V> out(static_cast<size_t>(d.numel()));
  copy(Tensor(out.data(), d.dtype(), d.shape()), d);
  return out;
}

template <class V>
bool same_bits(const std::vector<V>& a, const V* b) {
  return std::memcmp(a.data(), b, a.size() * sizeof(V)) == 0;
}

void check_adamw(const AdamWOptions& options) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " beta1 " + std::to_string(options.beta1));
  std::vector<OptimTensor> host, dev;
  std::vector<Tensor> initial;
  for (size_t i = 0; i < std::size(kSpecs); ++i) {
    const Spec& s = kSpecs[i];
    OptimTensor h{s.name, host_random(s.shape, seed + i, 1.0), host_random(s.shape, seed + 50 + i, 1.0), s.decay,
                  s.lr_scale, s.frozen};
    OptimTensor d{s.name, to_device(h.param, DType::f32), to_device(h.grad, DType::f32), s.decay, s.lr_scale, s.frozen};
    if (s.bf16_copy) {
      h.param_bf16 = Tensor::zeros(host_arena(), s.shape, DType::bf16);
      d.param_bf16 = poisoned(s.shape, DType::bf16);
    }
    initial.push_back(to_device(h.param, DType::f32));
    host.push_back(h);
    dev.push_back(d);
  }
  AdamW cpu(host, options);
  AdamW gpu(dev, options, Device::cuda);
  const double lrs[] = {1e-3, 3e-3, 1e-2, 2e-2, 5e-4};
  const double grad_scales[] = {1.0, 0.37, 1.0, 2.5, 0.81};
  for (int step = 0; step < 5; ++step) {
    for (size_t i = 0; i < host.size(); ++i) {
      const Tensor g = host_random(host[i].param.shape(), seed + 1000 * (step + 1) + i, step == 3 ? 1e-6 : 1.0);
      copy(host[i].grad, g);
      copy(dev[i].grad, g);
    }
    cpu.step(lrs[step], grad_scales[step]);
    gpu.step(lrs[step], grad_scales[step]);
    for (size_t i = 0; i < host.size(); ++i) {
      SCOPED_TRACE("step " + std::to_string(step + 1) + " tensor " + host[i].name);
      const int64_t n = host[i].param.numel();
      const std::vector<float> p = host_values<float>(dev[i].param);
      EXPECT_TRUE(same_bits(p, host[i].param.data<float>())) << "param";
      EXPECT_TRUE(same_bits(host_values<float>(gpu.exp_avg(i)), cpu.exp_avg(i).data<float>())) << "exp_avg";
      EXPECT_TRUE(same_bits(host_values<float>(gpu.exp_avg_sq(i)), cpu.exp_avg_sq(i).data<float>())) << "exp_avg_sq";
      if (kSpecs[i].frozen) {
        EXPECT_TRUE(same_bits(p, host_values<float>(initial[i]).data())) << "a frozen tensor changed";
        const std::vector<float> m = host_values<float>(gpu.exp_avg(i));
        EXPECT_TRUE(std::all_of(m.begin(), m.end(), [](float v) { return v == 0.0f; })) << "frozen moments";
      } else {
        EXPECT_FALSE(same_bits(p, host_values<float>(initial[i]).data()) && kSpecs[i].lr_scale > 0)
            << "the tensor did not move";
      }
      if (kSpecs[i].bf16_copy) {
        const std::vector<uint16_t> b = host_values<uint16_t>(dev[i].param_bf16);
        std::vector<uint16_t> want(static_cast<size_t>(n));
        for (int64_t j = 0; j < n; ++j) want[j] = f32_to_bf16(p[j]);
        EXPECT_TRUE(b == want) << "bf16 copy != round_to_bf16(param)";
        EXPECT_TRUE(same_bits(b, static_cast<const uint16_t*>(host[i].param_bf16.raw()))) << "bf16 copy != CPU's";
      }
    }
  }
}

TEST(GpuAdamW, EqualsCpuBitForBit) {
  Q3VL_REQUIRE_GPU();
  check_adamw(AdamWOptions{});
}

// beta1 = 0.3: torch's lerp takes its other branch (weight 0.7 >= 0.5).
TEST(GpuAdamW, EqualsCpuBitForBitOtherLerpBranch) {
  Q3VL_REQUIRE_GPU();
  check_adamw(AdamWOptions{0.3, 0.999, 1e-6, 0.01});
}

TEST(GpuAdamW, BadInputIsNamed) {
  Q3VL_REQUIRE_GPU();
  const Tensor p = to_device(host_random({4}, 1), DType::f32), g = to_device(host_random({4}, 2), DType::f32);
  expect_error([&] { AdamW({{"w", host_random({4}, 1), g}}, AdamWOptions{}, Device::cuda); },
               "AdamW: tensor 'w' param f32[4] is in host memory, but the optimizer's moments are on the CUDA device");
  expect_error([&] { AdamW({{"w", p, g}}, AdamWOptions{}); }, "AdamW: tensor 'w' param f32[4]@cuda is not in host memory");
  AdamWTensorUpdate u{p, g, to_device(host_random({4}, 3), DType::f32), to_device(host_random({4}, 4), DType::f32),
                      poisoned({5}, DType::bf16)};
  u.lr = 1e-3;
  expect_error([&] { adamw_update(u, AdamWOptions{}, 1); }, "adamw_update: param_bf16 has shape [5], expected [4]");
  u.param_bf16 = Tensor();
  u.grad = host_random({4}, 2);
  expect_error([&] { adamw_update(u, AdamWOptions{}, 1); }, "adamw_update: grad f32[4] is in host memory");
}

}  // namespace
}  // namespace q3vl::test
