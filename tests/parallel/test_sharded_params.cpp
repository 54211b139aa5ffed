// Resident sharding (parallel/sharded_params.h), the data-parallel layout of the one sharding mechanism, on every
// rank of the mpiexec run and on one rank (SelfComm): this rank's pieces and the other ranks' cover every element
// of the tiny MoE test model (units of unequal sizes, experts included) exactly once; reduce_gradients leaves
// each piece the sum over ranks of the whole gradients; parameters_updated gives every rank the elements their
// owners wrote; gather_whole assembles per-piece values into whole tensors; on one rank the pieces are the
// model's tensors themselves; the per-unit hooks refuse to run.
//
// The values are small integers (a few bits), so every sum over ranks is exact in fp32: results are compared for
// equality.
#include <gtest/gtest.h>

#include <cstdint>
#include <span>
#include <vector>

#include "core/check.h"
#include "core/model/model.h"
#include "parallel/comm.h"
#include "parallel/process_grid.h"
#include "parallel/self_comm.h"
#include "parallel/sharded_params.h"
#include "tests/model/test_model_tiny.h"
#include "tests/parallel/mpi_world.h"

namespace q3vl::test {
namespace {

using parallel::Residency;
using parallel::ShardedParams;

// A small integer for element k of parameter `spec`, distinct enough that a misplaced element shows.
float value_of(size_t spec, int64_t k, int salt) { return static_cast<float>((k * 7 + static_cast<int64_t>(spec) * 3 + salt) % 23 - 11); }

void expect_resident_collectives(parallel::Comm& world) {
  const int ranks = world.size(), me = world.rank();
  parallel::ProcessGrid grid(world, parallel::GridShape{ranks, 1, 1, 1});
  Model model(tiny_config(true), DType::f32);
  model.init_weights(5);
  ShardedParams sharded(model, grid, Residency::resident);
  ASSERT_TRUE(sharded.resident());
  const ParamStore& w = model.weights();
  const ParamStore& g = model.grads();

  // Every element is some rank's exactly once.
  std::vector<int64_t> owners(static_cast<size_t>(w.numel()), 0);
  std::vector<int64_t> base(w.size() + 1, 0);
  for (size_t i = 0; i < w.size(); ++i) base[i + 1] = base[i] + w.tensor(i).numel();
  for (const ShardedParams::Piece& p : sharded.pieces()) {
    EXPECT_EQ(p.param, w.tensor(p.spec).data<float>() + p.offset) << "resident pieces live in the weight store";
    EXPECT_EQ(p.grad, g.tensor(p.spec).data<float>() + p.offset);
    for (int64_t k = 0; k < p.numel; ++k) ++owners[static_cast<size_t>(base[p.spec] + p.offset + k)];
  }
  world.all_reduce_sum(std::span<int64_t>(owners));
  for (size_t e = 0; e < owners.size(); ++e) ASSERT_EQ(owners[e], 1) << "element " << e << " on " << ranks << " ranks";

  // Gradients: rank r holds (r + 1) x value; each piece then holds the sum, value x ranks (ranks + 1) / 2.
  sharded.zero_grads();
  for (size_t i = 0; i < g.size(); ++i) {
    float* d = g.tensor(i).data<float>();
    for (int64_t k = 0; k < g.tensor(i).numel(); ++k) d[k] = static_cast<float>(me + 1) * value_of(i, k, 0);
  }
  sharded.reduce_gradients();
  const float sum_factor = static_cast<float>(ranks * (ranks + 1) / 2);
  for (const ShardedParams::Piece& p : sharded.pieces())
    for (int64_t k = 0; k < p.numel; ++k) ASSERT_EQ(p.grad[k], sum_factor * value_of(p.spec, p.offset + k, 0));

  // Parameters: each owner writes its pieces; afterwards every rank holds every element's new value.
  for (const ShardedParams::Piece& p : sharded.pieces())
    for (int64_t k = 0; k < p.numel; ++k) p.param[k] = value_of(p.spec, p.offset + k, 1);
  sharded.parameters_updated();
  for (size_t i = 0; i < w.size(); ++i) {
    const float* d = w.tensor(i).data<float>();
    for (int64_t k = 0; k < w.tensor(i).numel(); ++k) ASSERT_EQ(d[k], value_of(i, k, 1)) << w.specs()[i].hf_key << "[" << k << "]";
  }

  // Per-piece values (an AdamW moment) into whole tensors.
  std::vector<std::vector<float>> values;
  std::vector<const float*> pointers;
  for (const ShardedParams::Piece& p : sharded.pieces()) {
    values.emplace_back(static_cast<size_t>(p.numel));
    for (int64_t k = 0; k < p.numel; ++k) values.back()[static_cast<size_t>(k)] = value_of(p.spec, p.offset + k, 2);
  }
  for (const auto& v : values) pointers.push_back(v.data());
  std::vector<float> whole(static_cast<size_t>(w.numel()), 99.0f);
  sharded.gather_whole(pointers, [&](size_t spec) { return whole.data() + base[spec]; });
  for (size_t i = 0; i < w.size(); ++i)
    for (int64_t k = 0; k < w.tensor(i).numel(); ++k)
      ASSERT_EQ(whole[static_cast<size_t>(base[i] + k)], value_of(i, k, 2)) << w.specs()[i].hf_key << "[" << k << "]";

  EXPECT_THROW(sharded.acquire(0), Error);
  EXPECT_THROW(sharded.gradients_ready(0), Error);
}

TEST(ShardedParams, ResidentShardingOverTheMpiRanks) { expect_resident_collectives(mpi_world()); }

TEST(ShardedParams, ResidentShardingOnOneRankStepsTheModelsOwnTensors) {
  parallel::SelfComm self;
  expect_resident_collectives(self);
  // One rank: one piece per parameter, the whole tensor, in parameter order (what the optimizer steps).
  parallel::ProcessGrid grid(self, parallel::GridShape{});
  Model model(tiny_config(true), DType::f32);
  ShardedParams sharded(model, grid, Residency::resident);
  ASSERT_EQ(sharded.pieces().size(), model.weights().size());
  for (size_t i = 0; i < sharded.pieces().size(); ++i) {
    EXPECT_EQ(sharded.pieces()[i].spec, i);
    EXPECT_EQ(sharded.pieces()[i].numel, model.weights().tensor(i).numel());
  }
  EXPECT_EQ(sharded.memory().staging, 0) << "one rank stages nothing";
}

}  // namespace
}  // namespace q3vl::test
