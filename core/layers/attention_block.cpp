// Attention sub-layer forward/backward composed from linear, rmsnorm, rotary and attention.
#include "core/layers/attention_block.h"

#include <initializer_list>
#include <string>

#include "core/arena_layout.h"
#include "core/kernels/cpu/gemm.h"
#include "core/layer_checks.h"
#include "core/layers/attention.h"
#include "core/layers/linear.h"
#include "core/layers/norms.h"
#include "core/layers/rotary.h"

namespace q3vl {

namespace {

void check_config(const char* layer, const AttentionConfig& cfg) {
  Q3VL_CHECK(cfg.hidden > 0 && cfg.num_heads > 0 && cfg.num_kv_heads > 0 && cfg.head_dim > 0, layer,
             ": hidden, num_heads, num_kv_heads and head_dim must be positive, got ", cfg.hidden, ", ",
             cfg.num_heads, ", ", cfg.num_kv_heads, ", ", cfg.head_dim);
  Q3VL_CHECK(cfg.num_heads % cfg.num_kv_heads == 0, layer, ": num_heads (", cfg.num_heads,
             ") must be a multiple of num_kv_heads (", cfg.num_kv_heads, ")");
  Q3VL_CHECK(cfg.head_dim % 2 == 0, layer, ": head_dim must be even for rotary, got ", cfg.head_dim);
  Q3VL_CHECK(!cfg.qk_norm || cfg.norm_eps > 0, layer, ": norm_eps must be positive, got ", cfg.norm_eps);
}

// A parameter the config uses must be present with its shape; one it does not use must be absent, so a
// config/weights mismatch is an error rather than a silently ignored tensor.
void require_param(const char* layer, const char* name, const Tensor& t, bool used, DType dt,
                   std::initializer_list<int64_t> shape) {
  if (used) {
    require(layer, name, t, dt, shape);
  } else {
    Q3VL_CHECK(!t.defined(), layer, ": ", name, " is given but the config does not use it");
  }
}

void check_weights(const char* layer, const AttentionConfig& cfg, const AttentionWeights& w, DType dt,
                   const char* prefix) {
  const int64_t qd = cfg.num_heads * cfg.head_dim, kvd = cfg.num_kv_heads * cfg.head_dim;
  const std::string p(prefix);
  require_param(layer, (p + "wq").c_str(), w.wq, true, dt, {qd, cfg.hidden});
  require_param(layer, (p + "wk").c_str(), w.wk, true, dt, {kvd, cfg.hidden});
  require_param(layer, (p + "wv").c_str(), w.wv, true, dt, {kvd, cfg.hidden});
  require_param(layer, (p + "wo").c_str(), w.wo, true, dt, {cfg.hidden, qd});
  require_param(layer, (p + "bq").c_str(), w.bq, cfg.qkv_bias, dt, {qd});
  require_param(layer, (p + "bk").c_str(), w.bk, cfg.qkv_bias, dt, {kvd});
  require_param(layer, (p + "bv").c_str(), w.bv, cfg.qkv_bias, dt, {kvd});
  require_param(layer, (p + "bo").c_str(), w.bo, cfg.o_bias, dt, {cfg.hidden});
  require_param(layer, (p + "q_norm").c_str(), w.q_norm, cfg.qk_norm, dt, {cfg.head_dim});
  require_param(layer, (p + "k_norm").c_str(), w.k_norm, cfg.qk_norm, dt, {cfg.head_dim});
}

// Checks shared by forward and backward: config, weights, x, rotary tables and document boundaries.
int64_t check_inputs(const char* layer, const AttentionConfig& cfg, const AttentionWeights& w, const Tensor& x,
                     const Tensor& cos, const Tensor& sin, const Tensor& cu_seqlens) {
  check_config(layer, cfg);
  const DType dt = x.dtype();
  require(layer, "x", x, dt, {-1, cfg.hidden});
  const int64_t n = x.size(0);
  check_weights(layer, cfg, w, dt, "");
  require(layer, "cos", cos, dt, {n, cfg.head_dim});
  require(layer, "sin", sin, dt, {n, cfg.head_dim});
  check_cu_seqlens(layer, cu_seqlens, n);
  return n;
}

// The saved tensors, in carving order (q_pre, k_pre and their rstd only with qk_norm).
template <class Carve>
AttentionSaved saved_tensors(const AttentionConfig& cfg, int64_t n, DType dt, Carve&& carve) {
  const int64_t hq = cfg.num_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
  AttentionSaved s;
  if (cfg.qk_norm) {
    s.q_pre = carve({n, hq * d}, dt);
    s.k_pre = carve({n, hkv * d}, dt);
    s.q_rstd = carve({n * hq}, dt);
    s.k_rstd = carve({n * hkv}, dt);
  }
  s.q = carve({n, hq, d}, dt);
  s.k = carve({n, hkv, d}, dt);
  s.v = carve({n, hkv, d}, dt);
  s.attn = carve({n, hq, d}, dt);
  s.lse = carve({hq, n}, dt);
  return s;
}

// The backward's scratch before the attention backward's own tiles: d_attn (reused as dq_pre), dq, dk, dv, and
// dk_pre when normed.
struct ScratchTensors {
  Tensor d_attn, dq, dk, dv, dk_pre;
};
template <class Carve>
ScratchTensors scratch_tensors(const AttentionConfig& cfg, int64_t n, DType dt, Carve&& carve) {
  const int64_t hq = cfg.num_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
  ScratchTensors s;
  s.d_attn = carve({n, hq * d}, dt);
  s.dq = carve({n, hq, d}, dt);
  s.dk = carve({n, hkv, d}, dt);
  s.dv = carve({n, hkv, d}, dt);
  if (cfg.qk_norm) s.dk_pre = carve({n, hkv * d}, dt);
  return s;
}

// q or k up to the attention input: projection, optional per-head RMSNorm, rotary (in place).
void project_heads(const AttentionConfig& cfg, int64_t heads, const Tensor& x, const Tensor& w, const Tensor& b,
                   const Tensor& norm_w, const Tensor& cos, const Tensor& sin, const Tensor& pre, const Tensor& rstd,
                   const Tensor& out) {
  const int64_t n = x.size(0), d = cfg.head_dim;
  if (cfg.qk_norm) {
    linear_forward(x, w, b, pre);
    rmsnorm_forward(pre.view({n * heads, d}), norm_w, cfg.norm_eps, out.view({n * heads, d}), rstd);
  } else {
    linear_forward(x, w, b, out.view({n, heads * d}));
  }
  rotary_forward(out, cos, sin, out);
}

// Gradient of project_heads up to the projection output: rotary transpose in place on `d_out`, then the
// RMSNorm backward into `d_pre` when normed. Returns the gradient of the projection output [N, heads*D].
Tensor unproject_heads(const AttentionConfig& cfg, int64_t heads, const Tensor& pre, const Tensor& rstd,
                       const Tensor& norm_w, const Tensor& d_norm_w, const Tensor& cos, const Tensor& sin,
                       const Tensor& d_out, const Tensor& d_pre) {
  const int64_t n = d_out.size(0), d = cfg.head_dim;
  rotary_backward(d_out, cos, sin, d_out);
  if (!cfg.qk_norm) return d_out.view({n, heads * d});
  rmsnorm_backward(pre.view({n * heads, d}), norm_w, rstd, d_out.view({n * heads, d}), d_pre.view({n * heads, d}),
                   d_norm_w);
  return d_pre;
}

}  // namespace

size_t attention_block_saved_bytes(const AttentionConfig& cfg, int64_t n, DType dtype) {
  ArenaSizer sizer;
  saved_tensors(cfg, n, dtype, sizer);
  return sizer.bytes();
}

size_t attention_block_scratch_bytes(const AttentionConfig& cfg, int64_t n, DType dtype) {
  ArenaSizer sizer;
  scratch_tensors(cfg, n, dtype, sizer);
  return sizer.bytes() + attention_backward_scratch_bytes(dtype);
}

AttentionSaved attention_block_forward(const AttentionConfig& cfg, const AttentionWeights& w, const Tensor& x,
                                       const Tensor& cos, const Tensor& sin, const Tensor& cu_seqlens, Arena& saved,
                                       const Tensor& y) {
  const char* L = "attention_block_forward";
  const int64_t n = check_inputs(L, cfg, w, x, cos, sin, cu_seqlens);
  const DType dt = x.dtype();
  require(L, "y", y, dt, {n, cfg.hidden});
  const int64_t hq = cfg.num_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
  AttentionSaved s = saved_tensors(cfg, n, dt, ArenaCarver(saved));

  project_heads(cfg, hq, x, w.wq, w.bq, w.q_norm, cos, sin, s.q_pre, s.q_rstd, s.q);
  project_heads(cfg, hkv, x, w.wk, w.bk, w.k_norm, cos, sin, s.k_pre, s.k_rstd, s.k);
  linear_forward(x, w.wv, w.bv, s.v.view({n, hkv * d}));
  attention_forward(s.q, s.k, s.v, cu_seqlens, cfg.causal, cfg.scale(), s.attn, s.lse);
  linear_forward(s.attn.view({n, hq * d}), w.wo, w.bo, y);
  return s;
}

void attention_block_backward(const AttentionConfig& cfg, const AttentionWeights& w, const Tensor& x,
                              const Tensor& cos, const Tensor& sin, const Tensor& cu_seqlens,
                              const AttentionSaved& saved, const Tensor& dy, const Tensor& dx,
                              const AttentionWeights& grads, Arena& scratch) {
  const char* L = "attention_block_backward";
  const int64_t n = check_inputs(L, cfg, w, x, cos, sin, cu_seqlens);
  const DType dt = x.dtype();
  const int64_t hq = cfg.num_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
  check_weights(L, cfg, grads, dt, "grad ");
  require(L, "dy", dy, dt, {n, cfg.hidden});
  if (dx.defined()) require(L, "dx", dx, dt, {n, cfg.hidden});
  require(L, "saved.q", saved.q, dt, {n, hq, d});
  require(L, "saved.k", saved.k, dt, {n, hkv, d});
  require(L, "saved.v", saved.v, dt, {n, hkv, d});
  require(L, "saved.attn", saved.attn, dt, {n, hq, d});
  require(L, "saved.lse", saved.lse, dt, {hq, n});
  require_param(L, "saved.q_pre", saved.q_pre, cfg.qk_norm, dt, {n, hq * d});
  require_param(L, "saved.k_pre", saved.k_pre, cfg.qk_norm, dt, {n, hkv * d});
  require_param(L, "saved.q_rstd", saved.q_rstd, cfg.qk_norm, dt, {n * hq});
  require_param(L, "saved.k_rstd", saved.k_rstd, cfg.qk_norm, dt, {n * hkv});

  const size_t mark = scratch.mark();
  const ScratchTensors t = scratch_tensors(cfg, n, dt, ArenaCarver(scratch));
  const Tensor &d_attn = t.d_attn, &dq = t.dq, &dk = t.dk, &dv = t.dv, &dk_pre = t.dk_pre;

  linear_backward(saved.attn.view({n, hq * d}), w.wo, dy, d_attn, grads.wo, grads.bo);
  attention_backward(saved.q, saved.k, saved.v, saved.attn, saved.lse, d_attn.view({n, hq, d}), cu_seqlens,
                     cfg.causal, cfg.scale(), dq, dk, dv, scratch);
  // d_attn is consumed: its memory takes the gradient of the q projection.
  const Tensor dq_proj = unproject_heads(cfg, hq, saved.q_pre, saved.q_rstd, w.q_norm, grads.q_norm, cos, sin, dq,
                                         cfg.qk_norm ? d_attn : Tensor{});
  const Tensor dk_proj = unproject_heads(cfg, hkv, saved.k_pre, saved.k_rstd, w.k_norm, grads.k_norm, cos, sin, dk,
                                         dk_pre);
  const Tensor dv_proj = dv.view({n, hkv * d});
  linear_backward(x, w.wq, dq_proj, Tensor{}, grads.wq, grads.bq);
  linear_backward(x, w.wk, dk_proj, Tensor{}, grads.wk, grads.bk);
  linear_backward(x, w.wv, dv_proj, Tensor{}, grads.wv, grads.bv);
  if (dx.defined()) {
    // dx = dq Wq + dk Wk + dv Wv, accumulated by the GEMM (beta = 1) instead of through temporaries.
    dispatch_float(L, dt, [&](auto tag) {
      using T = decltype(tag);
      T* dxp = dx.data<T>();
      cpu::gemm<T>(false, false, n, cfg.hidden, hq * d, T(1), dq_proj.data<T>(), hq * d, w.wq.data<T>(), cfg.hidden,
                   T(0), dxp, cfg.hidden);
      cpu::gemm<T>(false, false, n, cfg.hidden, hkv * d, T(1), dk_proj.data<T>(), hkv * d, w.wk.data<T>(),
                   cfg.hidden, T(1), dxp, cfg.hidden);
      cpu::gemm<T>(false, false, n, cfg.hidden, hkv * d, T(1), dv_proj.data<T>(), hkv * d, w.wv.data<T>(),
                   cfg.hidden, T(1), dxp, cfg.hidden);
    });
  }
  scratch.release(mark);
}

}  // namespace q3vl
