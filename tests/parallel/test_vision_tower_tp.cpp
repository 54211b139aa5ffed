// Tensor parallelism of the vision tower: vision_tower_forward / vision_tower_backward with a TensorParallel over
// the mpiexec world (every rank one tp rank, weights and gradients in a ParamStore of its TpLayout) against the
// whole tower, which every rank also runs, on the same image and video. The outputs (final merger and DeepStack
// taps) must match the whole run and be bitwise equal on every rank; each split tensor's gradient must match
// its slice of the whole gradient (tp_global_runs), each replicated tensor's gradient the whole one, bitwise
// equal on every rank. A store of whole tensors under tp > 1 is refused.
//
// Tolerance (f64): the tp run does the whole run's arithmetic except that row-parallel outputs and column-
// parallel input gradients are summed in P partial sums plus an all-reduce instead of one GEMM k-loop. That
// reorders sums of at most a few hundred O(1) terms; through the three blocks and mergers the largest deviation
// measured is 7e-15 of the tensor's largest |value| (2, 3, 4 ranks). kRelTol = 1e-12 of it leaves a 100x margin,
// while a bias added on every rank or a missing all-reduce errs by 0.3 to 1 of it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/check.h"
#include "core/layers/tensor_parallel.h"
#include "core/model/config.h"
#include "core/model/param_store.h"
#include "core/model/tp_layout.h"
#include "core/model/vision_tower.h"
#include "core/rng.h"
#include "parallel/comm.h"
#include "parallel/tensor_parallel_comm.h"
#include "tests/parallel/mpi_world.h"

namespace q3vl::test {
namespace {

using parallel::Comm;
using parallel::CommTensorParallel;

constexpr double kRelTol = 1e-12;  // see the header comment
constexpr uint64_t kSeed = 11;
constexpr double kInitStd = 0.3;  // O(1) activations through the blocks (HF's 0.02 would make them tiny)


// Vision heads (12), FFN width (72) and merged width (192) split over 1, 2, 3 and 4 ranks, as do the text
// sizes check_tp_layout also asks for; head_dim 4 is the smallest the 2-D rotary allows.
ModelConfig tp_config() {
  ModelConfig c;
  c.model_type = "qwen3_vl";
  TextConfig& t = c.text;
  t.vocab_size = 48;
  t.hidden_size = 24;
  t.intermediate_size = 24;
  t.num_hidden_layers = 2;
  t.num_attention_heads = 12;
  t.num_key_value_heads = 12;
  t.head_dim = 4;
  t.mrope_section = {1, 1, 0};
  t.num_experts = 0;
  VisionConfig& v = c.vision;
  v.depth = 3;
  v.hidden_size = 48;
  v.intermediate_size = 72;
  v.num_heads = 12;
  v.patch_size = 2;
  v.temporal_patch_size = 2;
  v.spatial_merge_size = 2;
  v.in_channels = 3;
  v.out_hidden_size = 24;
  v.num_position_embeddings = 16;
  v.deepstack_visual_indexes = {2, 0};  // taps out of merger order
  c.image_token_id = 44;
  c.video_token_id = 45;
  c.vision_start_token_id = 46;
  c.vision_end_token_id = 47;
  c.validate();
  return c;
}

// init's norm weights (ones) and biases (zeros) replaced by 1 + normal(0, 0.2) and normal(0, 0.2), so that a bias
// counted on every rank or a misplaced slice shows. Global element k takes sequence value k, as in init, so a
// split store gets the slices of the whole one.
void perturb_vision_norms_and_biases(const ParamStore& store) {
  for (size_t i = 0; i < store.size(); ++i) {
    const ParamSpec& spec = store.specs()[i];
    if (spec.tower != ParamTower::vision || (spec.kind != ParamKind::norm && spec.kind != ParamKind::bias)) continue;
    const Tensor flat = store.tensor(i).view({store.tensor(i).numel()});
    for (const TpRun& r : tp_global_runs(spec, store.tp(), 0, flat.numel()))
      fill_normal(flat.narrow(0, r.local_offset, r.numel), Philox(kSeed + 1, i),
                  spec.kind == ParamKind::norm ? 1.0 : 0.0, 0.2, static_cast<uint64_t>(r.global_offset));
  }
}

// One image (t, h, w) = (1, 4, 6) and one video (2, 4, 4), and gradients for the outputs; the same on every rank.
struct Inputs {
  static constexpr int64_t kImagePatches = 24, kVideoPatches = 32, kTokens = (kImagePatches + kVideoPatches) / 4;
  std::vector<int64_t> grid{1, 4, 6, 2, 4, 4};
  std::vector<double> image, video, d_embeds;
  std::vector<std::vector<double>> d_deepstack;

  explicit Inputs(const VisionConfig& c) {
    const int64_t features = c.patch_features(), out = c.out_hidden_size;
    image = random(kImagePatches * features, 1);
    video = random(kVideoPatches * features, 2);
    d_embeds = random(kTokens * out, 3);
    for (size_t k = 0; k < c.deepstack_visual_indexes.size(); ++k) d_deepstack.push_back(random(kTokens * out, 4 + k));
  }
  static std::vector<double> random(int64_t n, uint64_t stream) {
    std::vector<double> v(static_cast<size_t>(n));
    fill_uniform(Tensor(v.data(), DType::f64, {n}), Philox(kSeed, stream), -1.0, 1.0);
    return v;
  }
};

Tensor view(std::vector<double>& v, Shape shape) { return Tensor(v.data(), DType::f64, shape); }
Tensor view(std::vector<int64_t>& v, Shape shape) { return Tensor(v.data(), DType::i64, shape); }

// Forward and backward of the tower with `weights` (whole, or this rank's slices with tp), the parameter
// gradients accumulated into `grads`. Returns the outputs: embeds, then the DeepStack taps in block order.
std::vector<std::vector<double>> run_tower(const VisionConfig& c, const ParamStore& weights, const ParamStore& grads,
                                           Inputs& in, TensorParallel* tp) {
  const VisionShape shape{Inputs::kImagePatches + Inputs::kVideoPatches, 2, 3};
  Arena plan_storage("vision tp test plan", vision_plan_bytes(shape, DType::f64));
  Arena acts("vision tp test activations", vision_tower_activation_bytes(c, shape, DType::f64));
  Arena scratch("vision tp test scratch", vision_tower_scratch_bytes(c, shape, DType::f64));
  const VisionTowerWeights w = vision_tower_weights(c, weights);
  const VisionTowerWeights g = vision_tower_weights(c, grads);
  const int64_t features = c.patch_features(), out = c.out_hidden_size;
  const VisionPlan plan = plan_vision(c, view(in.grid, {2, 3}), Tensor{}, DType::f64, plan_storage);
  VisionTowerState state(c);
  vision_tower_forward(c, w, view(in.image, {Inputs::kImagePatches, features}),
                       view(in.video, {Inputs::kVideoPatches, features}), plan, acts, state, {}, tp);
  std::vector<Tensor> d_deepstack;
  for (auto& d : in.d_deepstack) d_deepstack.push_back(view(d, {Inputs::kTokens, out}));
  vision_tower_backward(c, w, state, view(in.d_embeds, {Inputs::kTokens, out}), d_deepstack, g, scratch, {}, tp);

  std::vector<std::vector<double>> outputs;
  const auto keep = [&](const Tensor& t) {
    const double* p = t.data<double>();
    outputs.emplace_back(p, p + t.numel());
  };
  keep(state.embeds);
  for (const Tensor& t : state.deepstack) keep(t);
  return outputs;
}

double max_abs(std::span<const double> v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// Rank 0's copy of `mine` must equal every rank's bit for bit.
void expect_same_on_every_rank(Comm& comm, const std::string& what, std::span<const double> mine) {
  std::vector<double> root(mine.begin(), mine.end());
  comm.broadcast(root.data(), root.size() * sizeof(double), 0);
  int64_t differ = 0;
  for (size_t i = 0; i < root.size(); ++i) differ += root[i] != mine[i];
  EXPECT_EQ(differ, 0) << what << ": elements differing from rank 0 on rank " << comm.rank();
}

const double* doubles(const Tensor& t) { return t.data<double>(); }

TEST(VisionTowerTensorParallel, MatchesTheWholeTowerOnEveryRank) {
  Comm& world = mpi_world();
  const ModelConfig config = tp_config();
  if (config.vision.num_heads % world.size() != 0)
    GTEST_SKIP() << world.size() << " ranks do not divide the " << config.vision.num_heads << " vision heads";
  const TpLayout layout{world.size(), world.rank()};
  ParamStore whole(config, DType::f64, "whole weights"), whole_grads(config, DType::f64, "whole gradients");
  ParamStore split(config, DType::f64, "tp weights", layout), split_grads(config, DType::f64, "tp gradients", layout);
  whole.init(kSeed, kInitStd);
  split.init(kSeed, kInitStd);
  perturb_vision_norms_and_biases(whole);
  perturb_vision_norms_and_biases(split);

  Inputs in(config.vision);
  CommTensorParallel tp(world);
  const auto want = run_tower(config.vision, whole, whole_grads, in, nullptr);
  const auto got = run_tower(config.vision, split, split_grads, in, &tp);

  ASSERT_EQ(got.size(), want.size());
  for (size_t o = 0; o < want.size(); ++o) {
    const std::string name = o == 0 ? "embeds" : "deepstack " + std::to_string(o - 1);
    const double tol = kRelTol * max_abs(want[o]);
    ASSERT_GT(tol, 0) << name;
    double worst = 0;
    for (size_t i = 0; i < want[o].size(); ++i) worst = std::max(worst, std::fabs(got[o][i] - want[o][i]));
    EXPECT_LE(worst, tol) << name << " on rank " << world.rank();
    expect_same_on_every_rank(world, name, got[o]);
  }

  int checked = 0;
  for (size_t i = 0; i < whole.size(); ++i) {
    const ParamSpec& spec = whole.specs()[i];
    if (spec.tower != ParamTower::vision) continue;
    ++checked;
    const Tensor& local = split_grads.tensor(i);
    const double* lg = doubles(local);
    const double* wg = doubles(whole_grads.tensor(i));
    const double scale = max_abs({wg, static_cast<size_t>(spec.numel())});
    ASSERT_GT(scale, 0) << spec.hf_key << " has no gradient in the whole run";
    // The weights themselves: the split store must hold the whole store's slice (what the comparison assumes).
    const double* lw = doubles(split.tensor(i));
    const double* ww = doubles(whole.tensor(i));
    double worst = 0;
    int64_t weight_mismatches = 0;
    for (const TpRun& r : tp_global_runs(spec, layout, 0, local.numel()))
      for (int64_t j = 0; j < r.numel; ++j) {
        worst = std::max(worst, std::fabs(lg[r.local_offset + j] - wg[r.global_offset + j]));
        weight_mismatches += lw[r.local_offset + j] != ww[r.global_offset + j];
      }
    ASSERT_EQ(weight_mismatches, 0) << spec.hf_key << ": the tp store is not a slice of the whole one";
    EXPECT_LE(worst, kRelTol * scale) << spec.hf_key << " gradient on rank " << world.rank() << " (max |whole| "
                                      << scale << ")";
    if (tp_split_dim(spec, layout) < 0)
      expect_same_on_every_rank(world, spec.hf_key + " gradient", {lg, static_cast<size_t>(local.numel())});
  }
  EXPECT_GT(checked, 0);
}

TEST(VisionTowerTensorParallel, RefusesWholeWeightsUnderTensorParallelism) {
  Comm& world = mpi_world();
  if (world.size() == 1) GTEST_SKIP() << "whole and split weights are the same on one rank";
  const ModelConfig config = tp_config();
  ParamStore whole(config, DType::f64, "whole weights"), grads(config, DType::f64, "whole gradients");
  Inputs in(config.vision);
  CommTensorParallel tp(world);
  // The attention's q rows (all 12 heads) do not fit the rank's 12 / P heads; refused before any collective.
  try {
    run_tower(config.vision, whole, grads, in, &tp);
    ADD_FAILURE() << "whole weights were accepted under tp " << world.size();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("attention_block_forward: wq has shape [48,48]"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace q3vl::test
