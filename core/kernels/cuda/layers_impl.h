// The CUDA backend's implementation of CudaLayers (core/kernels/cuda_layers.h). Its methods are defined in the
// .cu file of their layer (linear.cu, norms.cu, ...), so each layer's kernels sit beside its host code.
#pragma once

#include "core/kernels/cuda_layers.h"

namespace q3vl::cuda {

class CudaLayersImpl final : public CudaLayers {
 public:
  void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y) const override;
  void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
      const Tensor& dw, const Tensor& db) const override;
  void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& y) const override;
  void embedding_backward_rows(const Tensor& ids, const Tensor& dy, int64_t row_begin,
      const Tensor& dtable) const override;
  void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
      const Tensor& rstd) const override;
  void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
      const Tensor& dx, const Tensor& dw) const override;
  void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, const Tensor& y,
      const Tensor& mean, const Tensor& rstd) const override;
  void layernorm_backward(const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
      const Tensor& dy, const Tensor& dx, const Tensor& dw, const Tensor& db) const override;
  void gelu_forward(Gelu kind, const Tensor& x, const Tensor& y) const override;
  void gelu_backward(Gelu kind, const Tensor& x, const Tensor& dy, const Tensor& dx) const override;
  void swiglu_forward(const Tensor& gate_up, const Tensor& y) const override;
  void swiglu_backward(const Tensor& gate_up, const Tensor& dy, const Tensor& dgate_up) const override;
  void rotary_forward(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& y) const override;
  void rotary_backward(const Tensor& dy, const Tensor& cos, const Tensor& sin, const Tensor& dx) const override;
  void vision_pos_embed_forward(const Tensor& table, const Tensor& idx, const Tensor& weight,
      const Tensor& y) const override;
  void vision_pos_embed_backward(const Tensor& idx, const Tensor& weight, const Tensor& dy,
      const Tensor& dtable) const override;
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
      bool causal, double scale, const Tensor& out, const Tensor& lse) const override;
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
      const Tensor& lse, const Tensor& dout, const Tensor& cu_seqlens, bool causal,
      double scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
      Arena& scratch) const override;
  double lm_head_cross_entropy_forward(const Tensor& x, const Tensor& w, const Tensor& labels,
      const Tensor& lse, int64_t& count, Arena& scratch) const override;
  void lm_head_cross_entropy_backward(const Tensor& x, const Tensor& w, const Tensor& labels,
      const Tensor& lse, double scale, const Tensor& dx, const Tensor& dw,
      Arena& scratch) const override;
  void moe_forward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                           Arena& saved_arena, MoeSaved& saved, const Tensor& y, MoeStats& stats) const override;
  void moe_backward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                            const MoeSaved& saved, const Tensor& dy, const Tensor& aux_dprob, const Tensor& dx,
                            const MoeGradients& grads, Arena& scratch) const override;
  void adamw_update(const AdamWTensorUpdate& u, const AdamWOptions& options, int64_t step) const override;
};

}  // namespace q3vl::cuda
