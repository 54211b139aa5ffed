// The self-attention sub-layer shared by the text decoder and the vision tower:
//   q = x Wq^T (+bq), k = x Wk^T (+bk), v = x Wv^T (+bv), viewed per head [N, H, D];
//   optional per-head RMSNorm of q and k over head_dim (Qwen3 text), then rotary from given cos/sin;
//   varlen GQA attention (core/layers/attention.h); y = attn Wo^T (+bo).
// The vision tower's fused qkv weight [3D, D] (rows q; k; v) is used by passing its row ranges
// (Tensor::narrow on dim 0) as wq, wk, wv, and the matching ranges of its gradient as the gradients.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl {

struct AttentionConfig {
  int64_t hidden = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  bool qkv_bias = false;
  bool o_bias = false;
  bool qk_norm = false;
  bool causal = false;
  double norm_eps = 1e-6;

  double scale() const { return 1.0 / std::sqrt(static_cast<double>(head_dim)); }
};

// Parameters, and with the same type their gradients. wq [Hq*D, hidden], wk and wv [Hkv*D, hidden],
// wo [hidden, Hq*D]; bq, bk, bv present iff qkv_bias; bo iff o_bias; q_norm, k_norm [D] iff qk_norm.
// Absent members are undefined tensors.
struct AttentionWeights {
  Tensor wq, wk, wv, wo;
  Tensor bq, bk, bv, bo;
  Tensor q_norm, k_norm;
};

// What the forward keeps for the backward (the caller also keeps x, cos, sin, cu_seqlens). q_pre/k_pre
// (projections before the norm) and their rstd exist only with qk_norm.
struct AttentionSaved {
  Tensor q_pre, k_pre;    // [N, Hq*D], [N, Hkv*D]
  Tensor q_rstd, k_rstd;  // [N*Hq], [N*Hkv]
  Tensor q, k, v;         // [N, H, D] as fed to attention (after norm and rotary)
  Tensor attn;            // [N, Hq, D] attention output, the input of the output projection
  Tensor lse;             // [Hq, N]
};

// Bytes attention_block_forward carves from its `saved` arena for n tokens.
size_t attention_block_saved_bytes(const AttentionConfig& cfg, int64_t n, DType dtype);
// Bytes attention_block_backward takes from its scratch arena for n tokens (released before it returns).
size_t attention_block_scratch_bytes(const AttentionConfig& cfg, int64_t n, DType dtype);

// x [N, hidden]; cos, sin [N, head_dim]; cu_seqlens i64 [B + 1]; y [N, hidden] written. Activations for
// the backward are carved from `saved`.
AttentionSaved attention_block_forward(const AttentionConfig& cfg, const AttentionWeights& w, const Tensor& x,
                                       const Tensor& cos, const Tensor& sin, const Tensor& cu_seqlens, Arena& saved,
                                       const Tensor& y);

// dx [N, hidden] written when defined; every defined gradient in `grads` accumulated (+=). Gradients of
// parameters the config uses must be defined.
void attention_block_backward(const AttentionConfig& cfg, const AttentionWeights& w, const Tensor& x,
                              const Tensor& cos, const Tensor& sin, const Tensor& cu_seqlens,
                              const AttentionSaved& saved, const Tensor& dy, const Tensor& dx,
                              const AttentionWeights& grads, Arena& scratch);

}  // namespace q3vl
