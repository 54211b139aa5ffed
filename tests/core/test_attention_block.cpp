// Attention block: the forward equals the composition of its layers, finite-difference gradients for x and
// every weight, bias and norm weight in the text style (GQA, qk_norm, causal, no bias) and the vision style
// (MHA, fused qkv with bias, no qk_norm, bidirectional, several documents), parameter-gradient
// accumulation, arena sizing, and argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "core/layers/attention.h"
#include "core/layers/attention_block.h"
#include "core/layers/linear.h"
#include "core/layers/norms.h"
#include "core/layers/rotary.h"
#include "tests/support/gradcheck.h"

namespace q3vl::test {
namespace {

Tensor i64_tensor(const std::vector<int64_t>& values, Shape shape) {
  Tensor t = Tensor::empty(test_arena(), shape, DType::i64);
  std::copy(values.begin(), values.end(), t.data<int64_t>());
  return t;
}

// A block's inputs: config, weights, zeroed gradients of the same layout, x, rotary tables, documents.
struct BlockCase {
  AttentionConfig cfg;
  AttentionWeights w, g;
  Tensor x, cos, sin, cu;
  Tensor qkv, qkv_b, d_qkv, d_qkv_b;  // vision style: fused parameters the q/k/v views point into
  int64_t n = 0;
};

// Text style: GQA 4/2, head_dim 4, per-head RMSNorm on q and k, causal, no biases, MRoPE tables with
// positions restarting per document.
BlockCase text_setup() {
  BlockCase s;
  s.cfg = AttentionConfig{6, 4, 2, 4, false, false, true, true, 1e-6};
  s.n = 7;
  const int64_t qd = 16, kvd = 8;
  s.w.wq = random_tensor({qd, 6}, 101, 0.5);
  s.w.wk = random_tensor({kvd, 6}, 102, 0.5);
  s.w.wv = random_tensor({kvd, 6}, 103, 0.5);
  s.w.wo = random_tensor({6, qd}, 104, 0.5);
  s.w.q_norm = random_tensor({4}, 105, 1.0);
  s.w.k_norm = random_tensor({4}, 106, 1.0);
  s.g.wq = zeros_tensor({qd, 6});
  s.g.wk = zeros_tensor({kvd, 6});
  s.g.wv = zeros_tensor({kvd, 6});
  s.g.wo = zeros_tensor({6, qd});
  s.g.q_norm = zeros_tensor({4});
  s.g.k_norm = zeros_tensor({4});
  s.x = random_tensor({s.n, 6}, 107);
  // Documents [0, 4) and [4, 7); rows T, H, W differ so every section matters.
  Tensor pos = i64_tensor({0, 1, 2, 3, 0, 1, 2, /*H*/ 0, 1, 1, 3, 0, 2, 2, /*W*/ 0, 2, 1, 3, 0, 1, 4}, {3, 7});
  s.cos = zeros_tensor({s.n, 4});
  s.sin = zeros_tensor({s.n, 4});
  mrope_cos_sin(pos, 4, 10.0, {1, 1, 0}, s.cos, s.sin);
  s.cu = i64_tensor({0, 4, 7}, {3});
  return s;
}

// Vision style: MHA with 2 heads of dim 4 over hidden 8, fused qkv [24, 8] with bias passed as row views,
// output bias, bidirectional, documents of 2, 1 and 4 patches, 2-D rotary tables.
BlockCase vision_setup() {
  BlockCase s;
  s.cfg = AttentionConfig{8, 2, 2, 4, true, true, false, false, 1e-6};
  s.n = 7;
  s.qkv = random_tensor({24, 8}, 201, 0.5);
  s.qkv_b = random_tensor({24}, 202, 0.5);
  s.d_qkv = zeros_tensor({24, 8});
  s.d_qkv_b = zeros_tensor({24});
  s.w.wq = s.qkv.narrow(0, 0, 8);
  s.w.wk = s.qkv.narrow(0, 8, 8);
  s.w.wv = s.qkv.narrow(0, 16, 8);
  s.w.bq = s.qkv_b.narrow(0, 0, 8);
  s.w.bk = s.qkv_b.narrow(0, 8, 8);
  s.w.bv = s.qkv_b.narrow(0, 16, 8);
  s.w.wo = random_tensor({8, 8}, 203, 0.5);
  s.w.bo = random_tensor({8}, 204, 0.5);
  s.g.wq = s.d_qkv.narrow(0, 0, 8);
  s.g.wk = s.d_qkv.narrow(0, 8, 8);
  s.g.wv = s.d_qkv.narrow(0, 16, 8);
  s.g.bq = s.d_qkv_b.narrow(0, 0, 8);
  s.g.bk = s.d_qkv_b.narrow(0, 8, 8);
  s.g.bv = s.d_qkv_b.narrow(0, 16, 8);
  s.g.wo = zeros_tensor({8, 8});
  s.g.bo = zeros_tensor({8});
  s.x = random_tensor({s.n, 8}, 205);
  Tensor rows = i64_tensor({0, 0, 0, 0, 0, 1, 1}, {7}), cols = i64_tensor({0, 1, 0, 0, 1, 0, 1}, {7});
  s.cos = zeros_tensor({s.n, 4});
  s.sin = zeros_tensor({s.n, 4});
  vision_rope_cos_sin(rows, cols, 4, 1e4, s.cos, s.sin);
  s.cu = i64_tensor({0, 2, 3, 7}, {4});
  return s;
}

TEST(AttentionBlock, ForwardIsTheCompositionOfItsLayers) {
  BlockCase s = text_setup();
  const int64_t n = s.n, hq = 4, hkv = 2, d = 4;
  Tensor y = zeros_tensor({n, 6});
  attention_block_forward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, test_arena(), y);

  Tensor q_lin = zeros_tensor({n, hq * d}), k_lin = zeros_tensor({n, hkv * d}), v = zeros_tensor({n, hkv, d});
  linear_forward(s.x, s.w.wq, Tensor{}, q_lin);
  linear_forward(s.x, s.w.wk, Tensor{}, k_lin);
  linear_forward(s.x, s.w.wv, Tensor{}, v.view({n, hkv * d}));
  Tensor q = zeros_tensor({n, hq, d}), k = zeros_tensor({n, hkv, d});
  rmsnorm_forward(q_lin.view({n * hq, d}), s.w.q_norm, 1e-6, q.view({n * hq, d}), zeros_tensor({n * hq}));
  rmsnorm_forward(k_lin.view({n * hkv, d}), s.w.k_norm, 1e-6, k.view({n * hkv, d}), zeros_tensor({n * hkv}));
  rotary_forward(q, s.cos, s.sin, q);
  rotary_forward(k, s.cos, s.sin, k);
  Tensor attn = zeros_tensor({n, hq, d}), lse = zeros_tensor({hq, n});
  attention_forward(q, k, v, s.cu, true, 0.5, attn, lse);
  Tensor expected = zeros_tensor({n, 6});
  linear_forward(attn.view({n, hq * d}), s.w.wo, Tensor{}, expected);
  EXPECT_EQ(max_abs_diff(y, expected), 0.0);
}

// Runs the FD check of x and every parameter of a setup.
void check_gradients(BlockCase& s, const std::string& layer, std::vector<GradTarget> params) {
  Arena& arena = test_arena();
  const int64_t hidden = s.cfg.hidden;
  Tensor r = random_tensor({s.n, hidden}, 300);
  Tensor y = zeros_tensor({s.n, hidden});
  auto loss = [&] {
    const size_t mark = arena.mark();
    attention_block_forward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, arena, y);
    arena.release(mark);
    return dot(y, r);
  };
  const AttentionSaved saved = attention_block_forward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, arena, y);
  Tensor dx = zeros_tensor({s.n, hidden});
  attention_block_backward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, saved, r, dx, s.g, arena);
  params.insert(params.begin(), GradTarget{"x", s.x, dx});
  expect_gradients(layer, loss, params);
}

TEST(AttentionBlock, TextStyleGradients) {
  BlockCase s = text_setup();
  check_gradients(s, "attention_block(text)",
                  {{"wq", s.w.wq, s.g.wq}, {"wk", s.w.wk, s.g.wk}, {"wv", s.w.wv, s.g.wv}, {"wo", s.w.wo, s.g.wo},
                   {"q_norm", s.w.q_norm, s.g.q_norm}, {"k_norm", s.w.k_norm, s.g.k_norm}});
}

TEST(AttentionBlock, VisionStyleGradientsThroughFusedQkv) {
  BlockCase s = vision_setup();
  check_gradients(s, "attention_block(vision)",
                  {{"qkv", s.qkv, s.d_qkv}, {"qkv_bias", s.qkv_b, s.d_qkv_b}, {"wo", s.w.wo, s.g.wo},
                   {"bo", s.w.bo, s.g.bo}});
}

TEST(AttentionBlock, TextStyleWithBiasesAndMha) {
  // Remaining combinations: qk_norm together with biases, MHA, bidirectional.
  BlockCase s = text_setup();
  s.cfg.num_kv_heads = 4;
  s.cfg.qkv_bias = s.cfg.o_bias = true;
  s.cfg.causal = false;
  s.w.wk = random_tensor({16, 6}, 111, 0.5);
  s.w.wv = random_tensor({16, 6}, 112, 0.5);
  s.w.bq = random_tensor({16}, 113, 0.5);
  s.w.bk = random_tensor({16}, 114, 0.5);
  s.w.bv = random_tensor({16}, 115, 0.5);
  s.w.bo = random_tensor({6}, 116, 0.5);
  s.g.wk = zeros_tensor({16, 6});
  s.g.wv = zeros_tensor({16, 6});
  s.g.bq = zeros_tensor({16});
  s.g.bk = zeros_tensor({16});
  s.g.bv = zeros_tensor({16});
  s.g.bo = zeros_tensor({6});
  check_gradients(s, "attention_block(norm+bias)",
                  {{"wq", s.w.wq, s.g.wq}, {"wk", s.w.wk, s.g.wk}, {"wv", s.w.wv, s.g.wv}, {"wo", s.w.wo, s.g.wo},
                   {"bq", s.w.bq, s.g.bq}, {"bk", s.w.bk, s.g.bk}, {"bv", s.w.bv, s.g.bv}, {"bo", s.w.bo, s.g.bo},
                   {"q_norm", s.w.q_norm, s.g.q_norm}, {"k_norm", s.w.k_norm, s.g.k_norm}});
}

TEST(AttentionBlock, AccumulatesParameterGradients) {
  BlockCase s = text_setup();
  Tensor y = zeros_tensor({s.n, 6}), dy = random_tensor({s.n, 6}, 400);
  const AttentionSaved saved = attention_block_forward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, test_arena(), y);
  attention_block_backward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, saved, dy, Tensor{}, s.g, test_arena());
  Tensor once[6] = {zeros_tensor({16, 6}), zeros_tensor({8, 6}), zeros_tensor({8, 6}),
                    zeros_tensor({6, 16}), zeros_tensor({4}),    zeros_tensor({4})};
  const Tensor grads[6] = {s.g.wq, s.g.wk, s.g.wv, s.g.wo, s.g.q_norm, s.g.k_norm};
  for (int i = 0; i < 6; ++i) copy(once[i], grads[i]);
  attention_block_backward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, saved, dy, Tensor{}, s.g, test_arena());
  for (int i = 0; i < 6; ++i)
    for (int64_t j = 0; j < once[i].numel(); ++j)
      EXPECT_NEAR(grads[i].data<double>()[j], 2 * once[i].data<double>()[j], 1e-12) << "gradient " << i;
}

TEST(AttentionBlock, ArenaSizesAreExact) {
  for (bool text : {true, false}) {
    BlockCase s = text ? text_setup() : vision_setup();
    Arena saved_arena("saved", attention_block_saved_bytes(s.cfg, s.n, DType::f64));
    Tensor y = zeros_tensor({s.n, s.cfg.hidden});
    const AttentionSaved saved = attention_block_forward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, saved_arena, y);
    EXPECT_EQ(saved_arena.used(), saved_arena.capacity());
    Arena scratch("scratch", attention_block_scratch_bytes(s.cfg, s.n, DType::f64));
    Tensor dx = zeros_tensor({s.n, s.cfg.hidden});
    attention_block_backward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, saved, y, dx, s.g, scratch);
    EXPECT_EQ(scratch.used(), 0u);
    EXPECT_EQ(scratch.high_water(), scratch.capacity());
  }
}


TEST(AttentionBlock, RejectsBadArguments) {
  BlockCase s = text_setup();
  Tensor y = zeros_tensor({s.n, 6});
  auto fwd = [&] { attention_block_forward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, test_arena(), y); };
  AttentionWeights good = s.w;
  s.w.bq = zeros_tensor({16});
  expect_error(fwd, "attention_block_forward: bq is given but the config does not use it");
  s.w = good;
  s.w.k_norm = Tensor{};
  expect_error(fwd, "attention_block_forward: k_norm is missing");
  s.w = good;
  s.w.wo = zeros_tensor({6, 8});
  expect_error(fwd, "attention_block_forward: wo has shape [6,8], expected [6,16]");
  s.w = good;
  s.cfg.num_heads = 3;
  expect_error(fwd, "attention_block_forward: num_heads (3) must be a multiple of num_kv_heads (2)");
  s.cfg.num_heads = 4;
  Tensor bad_cu = i64_tensor({0, 4, 8}, {3});
  expect_error([&] { attention_block_forward(s.cfg, s.w, s.x, s.cos, s.sin, bad_cu, test_arena(), y); },
               "attention_block_forward: cu_seqlens must end at the token count 7, got 8");
  Tensor short_cos = zeros_tensor({6, 4});
  expect_error([&] { attention_block_forward(s.cfg, s.w, s.x, short_cos, s.sin, s.cu, test_arena(), y); },
               "attention_block_forward: cos has shape [6,4], expected [7,4]");

  const AttentionSaved saved = attention_block_forward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, test_arena(), y);
  AttentionWeights bad_grads = s.g;
  bad_grads.wo = zeros_tensor({16, 6});
  expect_error([&] {
    attention_block_backward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, saved, y, Tensor{}, bad_grads, test_arena());
  }, "attention_block_backward: grad wo has shape [16,6], expected [6,16]");
  AttentionSaved no_norm = saved;
  no_norm.q_pre = Tensor{};
  expect_error([&] {
    attention_block_backward(s.cfg, s.w, s.x, s.cos, s.sin, s.cu, no_norm, y, Tensor{}, s.g, test_arena());
  }, "attention_block_backward: saved.q_pre is missing");
}

}  // namespace
}  // namespace q3vl::test
