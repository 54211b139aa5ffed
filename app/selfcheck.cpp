// q3vl selfcheck: a tiny Qwen3-VL-MoE-shaped text stack (embedding; per layer RMSNorm, GQA attention with
// q/k-norm and interleaved MRoPE over packed documents, RMSNorm, MoE with the aux loss; final RMSNorm,
// lm_head, cross-entropy) trained for a few SGD steps on a learnable token pattern. It exercises every
// core layer forward and backward with arenas sized up front, prints per-step loss and timings, and a
// JSON line per step. It is the main job until `q3vl train` exists.
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "app/cli.h"
#include "app/commands.h"
#include "core/arena.h"
#include "core/check.h"
#include "core/layers/attention_block.h"
#include "core/layers/cross_entropy.h"
#include "core/layers/embedding.h"
#include "core/layers/linear.h"
#include "core/layers/moe.h"
#include "core/layers/norms.h"
#include "core/layers/rotary.h"
#include "core/rng.h"

namespace q3vl::app {

namespace {

struct TinyConfig {
  int64_t vocab = 512, hidden = 64, layers = 2, heads = 4, kv_heads = 2, head_dim = 16;
  int64_t experts = 8, top_k = 2, expert_ffn = 32;
  double eps = 1e-6, rope_theta = 5e6, aux_coef = 1e-3, lr = 0.5;
  std::array<int64_t, 3> mrope_sections{4, 2, 2};
};

struct Param {
  std::string name;
  Tensor value, grad;
};

struct LayerWeights {
  Tensor input_norm, post_norm;
  AttentionWeights attn;
  MoeWeights moe;
};

struct LayerActs {
  Tensor h_in, normed1, rstd1, h_mid, normed2, rstd2;
  AttentionSaved attn;
  MoeSaved moe;
  MoeStats stats;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void add_into(const Tensor& dst, const Tensor& src) {
  float* d = dst.data<float>();
  const float* s = src.data<float>();
  for (int64_t i = 0; i < dst.numel(); ++i) d[i] += s[i];
}

}  // namespace

int run_selfcheck(const std::vector<std::string>& args) {
  int64_t steps = 20, tokens = 256;
  auto cli = make_command("selfcheck", "Trains a tiny Qwen3-VL-MoE-shaped text stack for a few SGD steps on a "
                                      "learnable pattern, with per-step loss and timings; fails unless the loss falls.");
  add_int_option(*cli, "--steps", steps, 1, "SGD steps");
  add_int_option(*cli, "--tokens", tokens, 4, "tokens per step");
  if (const auto done = parse_command(*cli, args)) return *done;
  const TinyConfig c;
  const DType f32 = DType::f32;
  const int64_t n = tokens, h = c.hidden;
  const AttentionConfig acfg{h, c.heads, c.kv_heads, c.head_dim, false, false, true, true, c.eps};
  const MoeConfig mcfg{h, c.experts, c.top_k, c.expert_ffn};

  // Parameter shapes first, so the weight and gradient arenas are sized exactly.
  struct Spec { std::string name; Shape shape; bool is_norm; };
  std::vector<Spec> specs = {{"embed", {c.vocab, h}, false}};
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    specs.push_back({p + "input_norm", {h}, true});
    specs.push_back({p + "wq", {c.heads * c.head_dim, h}, false});
    specs.push_back({p + "wk", {c.kv_heads * c.head_dim, h}, false});
    specs.push_back({p + "wv", {c.kv_heads * c.head_dim, h}, false});
    specs.push_back({p + "wo", {h, c.heads * c.head_dim}, false});
    specs.push_back({p + "q_norm", {c.head_dim}, true});
    specs.push_back({p + "k_norm", {c.head_dim}, true});
    specs.push_back({p + "post_norm", {h}, true});
    specs.push_back({p + "router", {c.experts, h}, false});
    specs.push_back({p + "gate_up", {c.experts, h, 2 * c.expert_ffn}, false});
    specs.push_back({p + "down", {c.experts, c.expert_ffn, h}, false});
  }
  specs.push_back({"final_norm", {h}, true});
  specs.push_back({"lm_head", {c.vocab, h}, false});
  size_t param_bytes = 0;
  for (const Spec& s : specs) param_bytes += Arena::aligned(s.shape.numel() * sizeof(float));

  Arena weights("weights", param_bytes), grads("grads", param_bytes);
  std::vector<Param> params;
  Philox init(1234);
  uint64_t offset = 0;
  for (const Spec& s : specs) {
    Param p{s.name, Tensor::empty(weights, s.shape, f32), Tensor::zeros(grads, s.shape, f32)};
    if (s.is_norm) fill(p.value, 1.0);
    else fill_normal(p.value, init, 0.0, 0.1, offset);  // wider than HF's 0.02 so a tiny model learns in few steps
    offset += s.shape.numel();
    params.push_back(p);
  }
  size_t k = 0;
  const Param& embed = params[k++];
  std::vector<LayerWeights> lw(c.layers), lg(c.layers);
  for (int64_t l = 0; l < c.layers; ++l) {
    auto next = [&](LayerWeights& w, bool grad) {
      auto t = [&](size_t i) { return grad ? params[i].grad : params[i].value; };
      w.input_norm = t(k);
      w.attn.wq = t(k + 1); w.attn.wk = t(k + 2); w.attn.wv = t(k + 3); w.attn.wo = t(k + 4);
      w.attn.q_norm = t(k + 5); w.attn.k_norm = t(k + 6);
      w.post_norm = t(k + 7);
      w.moe = {t(k + 8), t(k + 9), t(k + 10)};
    };
    next(lw[l], false);
    next(lg[l], true);
    k += 11;
  }
  const Param& final_norm = params[k++];
  const Param& lm_head = params[k++];

  // Inputs: two packed documents with a learnable next-token rule, MRoPE positions restarting per doc.
  Arena inputs("inputs", Arena::aligned(n * 8) * 5 + Arena::aligned(3 * n * 8) + Arena::aligned(3 * 8) +
                             2 * Arena::aligned(n * c.head_dim * 4));
  Tensor ids = Tensor::empty(inputs, {n}, DType::i64), labels = Tensor::empty(inputs, {n}, DType::i64);
  Tensor pos = Tensor::empty(inputs, {3, n}, DType::i64), cu = Tensor::empty(inputs, {3}, DType::i64);
  const int64_t doc0 = n / 2;
  int64_t* cup = cu.data<int64_t>();
  cup[0] = 0; cup[1] = doc0; cup[2] = n;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t start = i < doc0 ? 0 : doc0;
    ids.data<int64_t>()[i] = ((i - start) * 37 + (start ? 11 : 3)) % c.vocab;
    for (int r = 0; r < 3; ++r) pos.data<int64_t>()[r * n + i] = i - start;
  }
  for (int64_t i = 0; i < n; ++i) {
    const bool last = i + 1 == n || i + 1 == doc0;
    labels.data<int64_t>()[i] = last ? kIgnoreIndex : ids.data<int64_t>()[i + 1];
  }
  Tensor cos = Tensor::empty(inputs, {n, c.head_dim}, f32), sin = Tensor::empty(inputs, {n, c.head_dim}, f32);
  mrope_cos_sin(pos, c.head_dim, c.rope_theta, c.mrope_sections, cos, sin);

  // Activations and scratch, sized up front from the layers' own byte counts.
  const size_t nh = Arena::aligned(n * h * 4), nv = Arena::aligned(n * c.vocab * 4), n4 = Arena::aligned(n * 4);
  const size_t per_layer = 4 * nh + 2 * n4 + attention_block_saved_bytes(acfg, n, f32) +
                           moe_forward_arena_bytes(mcfg, n, f32) + Arena::aligned(c.experts * 8) * 2;
  Arena acts("activations", c.layers * per_layer + 2 * nh + n4 + nv + n4);
  const size_t scratch_bytes = 4 * nh + std::max(attention_block_scratch_bytes(acfg, n, f32),
                                                 moe_backward_scratch_bytes(mcfg, n, f32)) +
                               Arena::aligned(c.experts * 4);
  Arena scratch("scratch", scratch_bytes);

  std::printf("q3vl selfcheck: %lld layers, hidden %lld, %lld/%lld heads, %lld experts top-%lld, vocab %lld, %lld tokens\n",
              (long long)c.layers, (long long)h, (long long)c.heads, (long long)c.kv_heads, (long long)c.experts,
              (long long)c.top_k, (long long)c.vocab, (long long)n);
  std::printf("arenas: weights %zu B, grads %zu B, activations %zu B, scratch %zu B\n", weights.capacity(),
              grads.capacity(), acts.capacity(), scratch.capacity());

  double first_loss = 0, last_loss = 0;
  for (int64_t step = 1; step <= steps; ++step) {
    acts.reset();
    for (Param& p : params) fill(p.grad, 0.0);
    const auto t0 = std::chrono::steady_clock::now();

    std::vector<LayerActs> la(c.layers);
    Tensor h_cur = Tensor::empty(acts, {n, h}, f32);
    embedding_forward(ids, embed.value, h_cur);
    for (int64_t l = 0; l < c.layers; ++l) {
      LayerActs& a = la[l];
      a.h_in = h_cur;
      a.normed1 = Tensor::empty(acts, {n, h}, f32);
      a.rstd1 = Tensor::empty(acts, {n}, f32);
      rmsnorm_forward(a.h_in, lw[l].input_norm, c.eps, a.normed1, a.rstd1);
      a.h_mid = Tensor::empty(acts, {n, h}, f32);
      a.attn = attention_block_forward(acfg, lw[l].attn, a.normed1, cos, sin, cu, acts, a.h_mid);
      add_into(a.h_mid, a.h_in);
      a.normed2 = Tensor::empty(acts, {n, h}, f32);
      a.rstd2 = Tensor::empty(acts, {n}, f32);
      rmsnorm_forward(a.h_mid, lw[l].post_norm, c.eps, a.normed2, a.rstd2);
      Tensor h_out = Tensor::empty(acts, {n, h}, f32);
      a.stats.counts = Tensor::empty(acts, {c.experts}, DType::i64);
      a.stats.prob_sum = Tensor::empty(acts, {c.experts}, DType::f64);
      moe_forward(mcfg, lw[l].moe, a.normed2, Tensor{}, acts, a.moe, h_out, a.stats);
      add_into(h_out, a.h_mid);
      h_cur = h_out;
    }
    Tensor final_normed = Tensor::empty(acts, {n, h}, f32), final_rstd = Tensor::empty(acts, {n}, f32);
    rmsnorm_forward(h_cur, final_norm.value, c.eps, final_normed, final_rstd);
    Tensor logits = Tensor::empty(acts, {n, c.vocab}, f32), lse = Tensor::empty(acts, {n}, f32);
    linear_forward(final_normed, lm_head.value, Tensor{}, logits);
    const CrossEntropySum ce = cross_entropy_forward(logits, labels, lse);
    std::vector<MoeStats> stats;
    for (const LayerActs& a : la) stats.push_back(a.stats);
    Tensor aux_dprob = Tensor::empty(scratch, {c.experts}, f32);
    const double aux = moe_aux_loss(c.experts, stats, c.aux_coef, aux_dprob);
    const double loss = ce.mean() + c.aux_coef * aux;
    const double t_fwd = seconds_since(t0);

    const auto t1 = std::chrono::steady_clock::now();
    const size_t base = scratch.mark();
    Tensor dh = Tensor::empty(scratch, {n, h}, f32), dnormed = Tensor::empty(scratch, {n, h}, f32);
    Tensor dtmp = Tensor::empty(scratch, {n, h}, f32);
    cross_entropy_backward(logits, labels, lse, 1.0 / static_cast<double>(ce.count), logits);
    linear_backward(final_normed, lm_head.value, logits, dnormed, lm_head.grad, Tensor{});
    rmsnorm_backward(h_cur, final_norm.value, final_rstd, dnormed, dh, final_norm.grad);
    for (int64_t l = c.layers - 1; l >= 0; --l) {
      const LayerActs& a = la[l];
      const size_t m = scratch.mark();
      moe_backward(mcfg, lw[l].moe, a.normed2, Tensor{}, a.moe, dh, aux_dprob, dnormed,
                   {lg[l].moe.router, lg[l].moe.gate_up, lg[l].moe.down}, scratch);
      scratch.release(m);
      rmsnorm_backward(a.h_mid, lw[l].post_norm, a.rstd2, dnormed, dtmp, lg[l].post_norm);
      add_into(dh, dtmp);
      attention_block_backward(acfg, lw[l].attn, a.normed1, cos, sin, cu, a.attn, dh, dnormed, lg[l].attn, scratch);
      scratch.release(m);
      rmsnorm_backward(a.h_in, lw[l].input_norm, a.rstd1, dnormed, dtmp, lg[l].input_norm);
      add_into(dh, dtmp);
    }
    embedding_backward(ids, dh, embed.grad);
    scratch.release(base);
    const double t_bwd = seconds_since(t1);

    double gsq = 0;
    for (const Param& p : params) {
      const float* g = p.grad.data<float>();
      for (int64_t i = 0; i < p.grad.numel(); ++i) gsq += double(g[i]) * g[i];
    }
    Q3VL_CHECK(std::isfinite(loss) && std::isfinite(gsq), "selfcheck: non-finite loss ", loss, " or gradient norm at step ", step);
    for (Param& p : params) {
      float* v = p.value.data<float>();
      const float* g = p.grad.data<float>();
      for (int64_t i = 0; i < p.value.numel(); ++i) v[i] -= static_cast<float>(c.lr) * g[i];
    }
    if (step == 1) first_loss = loss;
    last_loss = loss;
    const double tps = static_cast<double>(n) / (t_fwd + t_bwd);
    std::printf("step %lld/%lld  loss %.4f  ce %.4f  aux %.4f  grad_norm %.4f  fwd %.1f ms  bwd %.1f ms  %.0f tokens/s\n",
                (long long)step, (long long)steps, loss, ce.mean(), aux, std::sqrt(gsq), t_fwd * 1e3, t_bwd * 1e3, tps);
    std::printf("{\"event\":\"selfcheck_step\",\"step\":%lld,\"loss\":%.6f,\"ce\":%.6f,\"aux\":%.6f,\"grad_norm\":%.6f,"
                "\"fwd_ms\":%.3f,\"bwd_ms\":%.3f,\"tokens_per_s\":%.1f}\n",
                (long long)step, loss, ce.mean(), aux, std::sqrt(gsq), t_fwd * 1e3, t_bwd * 1e3, tps);
  }
  std::printf("activation arena high water %zu of %zu B, scratch %zu of %zu B\n", acts.high_water(), acts.capacity(),
              scratch.high_water(), scratch.capacity());
  if (steps > 1) {
    Q3VL_CHECK(last_loss < first_loss, "selfcheck: loss did not fall (", first_loss, " -> ", last_loss, ")");
    std::printf("selfcheck ok: loss %.4f -> %.4f over %lld SGD steps\n", first_loss, last_loss, (long long)steps);
  } else {
    std::printf("selfcheck ok: forward and backward ran\n");
  }
  return 0;
}

}  // namespace q3vl::app
