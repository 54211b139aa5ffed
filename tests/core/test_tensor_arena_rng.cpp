// Core pieces: tensor views, arena accounting and errors, Philox known-answer vectors, Q3VL_CHECK.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>

#include "core/arena.h"
#include "core/check.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace q3vl {
namespace {

TEST(Check, MessageCarriesContextAndLocationApart) {
  try {
    Q3VL_CHECK(1 + 1 == 3, "layer x: got ", 2, " expected ", 3);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "layer x: got 2 expected 3");
    EXPECT_NE(e.location().find("test_tensor_arena_rng.cpp:"), std::string::npos) << e.location();
  }
}

TEST(Arena, AlignsTracksAndReleases) {
  Arena a("acts", 1000);
  EXPECT_EQ(a.capacity(), 1024u);
  void* p = a.allocate(10);
  const size_t m = a.mark();
  void* q = a.allocate(100);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % Arena::kAlign, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(q) % Arena::kAlign, 0u);
  EXPECT_EQ(a.used(), 64u + 128u);
  a.release(m);
  EXPECT_EQ(a.used(), 64u);
  EXPECT_EQ(a.high_water(), 192u);
  a.reset();
  EXPECT_EQ(a.used(), 0u);
}

TEST(Arena, ExhaustionIsAnErrorNamingTheArena) {
  Arena a("weights", 128);
  a.allocate(100);
  try {
    a.allocate(64);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("arena 'weights' exhausted: need 64 bytes, 0 of 128 free"), std::string::npos) << e.what();
  }
}

TEST(Tensor, ShapesStridesAndViews) {
  Arena a("t", 4096);
  Tensor t = Tensor::zeros(a, {2, 3, 4}, DType::f32);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.stride(0), 12);
  EXPECT_EQ(t.stride(-1), 1);
  EXPECT_EQ(t.size(-2), 3);
  EXPECT_EQ(t.str(), "f32[2,3,4]");
  EXPECT_TRUE(t.is_contiguous());
  float* p = t.data<float>();
  for (int i = 0; i < 24; ++i) p[i] = static_cast<float>(i);
  Tensor row = t[1];
  EXPECT_EQ(row.str(), "f32[3,4]");
  EXPECT_EQ(row.data<float>()[0], 12.f);
  Tensor mid = t.narrow(1, 1, 2);  // [2,2,4], not contiguous across the first dim
  EXPECT_FALSE(mid.is_contiguous());
  EXPECT_EQ(mid.data<float>()[0], 4.f);
  Tensor rows = t.view({6, 4}).narrow(0, 2, 3);  // contiguous row range
  EXPECT_TRUE(rows.is_contiguous());
  EXPECT_EQ(rows.data<float>()[0], 8.f);
  EXPECT_THROW(t.view({5, 5}), Error);
  EXPECT_THROW(mid.view({16}), Error);
  EXPECT_THROW(t.narrow(2, 3, 2), Error);
  EXPECT_THROW(t.data<double>(), Error);
}

TEST(Philox, MatchesRandom123KnownAnswers) {
  // Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors):
  // counter (c0..c3) = 0, key = 0; and counter = all ones, key = all ones.
  const auto zero = Philox(0, 0).block(0);
  EXPECT_EQ(zero[0], 0x6627e8d5u);
  EXPECT_EQ(zero[1], 0xe169c58du);
  EXPECT_EQ(zero[2], 0xbc57ac4cu);
  EXPECT_EQ(zero[3], 0x9b00dbd8u);
  const auto ones = Philox(~uint64_t{0}, ~uint64_t{0}).block(~uint64_t{0});
  EXPECT_EQ(ones[0], 0x408f276du);
  EXPECT_EQ(ones[1], 0x41c83b0eu);
  EXPECT_EQ(ones[2], 0xa20bc7c6u);
  EXPECT_EQ(ones[3], 0x6d5451fdu);
}

TEST(Philox, FillsAreDeterministicAndOffsetable) {
  Arena a("r", 1 << 16);
  Tensor x = Tensor::empty(a, {1000}, DType::f64), y = Tensor::empty(a, {500}, DType::f64);
  Philox rng(42, 7);
  fill_normal(x, rng, 0, 1);
  fill_normal(y, rng, 0, 1, 500);  // the second half of the same stream
  for (int i = 0; i < 500; ++i) EXPECT_EQ(x.data<double>()[500 + i], y.data<double>()[i]);
  double mean = 0, var = 0;
  for (int i = 0; i < 1000; ++i) mean += x.data<double>()[i] / 1000;
  for (int i = 0; i < 1000; ++i) var += (x.data<double>()[i] - mean) * (x.data<double>()[i] - mean) / 1000;
  // 1000 standard normals: the sample mean has std 0.032 and the variance std 0.045; 5 sigma bounds.
  EXPECT_LT(std::abs(mean), 0.16);
  EXPECT_LT(std::abs(var - 1), 0.23);
  Tensor u = Tensor::empty(a, {1000}, DType::f32);
  fill_uniform(u, Philox(1), 2, 3);
  for (int i = 0; i < 1000; ++i) {
    EXPECT_GE(u.data<float>()[i], 2.f);
    EXPECT_LT(u.data<float>()[i], 3.f);
  }
}

}  // namespace
}  // namespace q3vl
