// The CUDA twins of the layers, behind one interface: a layer's free function in core/layers/ checks where its
// tensors live and, when they are in device memory, hands the call to cuda_layers() with the same arguments and
// the same contract (what is written, what is saved, what is accumulated with +=). The CUDA backend
// (core/kernels/cuda/) implements it; a build without the backend links core/kernels/no_cuda.cpp, whose
// cuda_layers() throws an error saying so. So core builds, links and runs its CPU tests with or without CUDA,
// and the model composes the same functions on either device.
//
// Dtypes on the device: f32 (the checking mode, no TF32: equal to the CPU within fp32 rounding) or bf16
// activations and weights with fp32 accumulation; per-row statistics (rstd, mean, log-sum-exp) are f32 and
// parameter gradients may be f32 under bf16 weights (fp32 accumulation across micro-batches).
#pragma once

#include <cstdint>

#include "core/arena.h"
#include "core/layers/activations.h"
#include "core/tensor.h"

namespace q3vl {

struct MoeConfig;
struct MoeWeights;
struct MoeGradients;
struct MoeSaved;
struct MoeStats;
struct AdamWOptions;

// One AdamW update of one tensor (see core/optim/adamw.h for the formula and torch's operation order):
// param, exp_avg, exp_avg_sq f32 (the master copy and moments), grad f32; when param_bf16 is defined it
// receives the updated parameter rounded to bf16 (the compute copy), in the same pass.
struct AdamWTensorUpdate {
  Tensor param, grad, exp_avg, exp_avg_sq, param_bf16;
  bool decay = true;
  double lr = 0;          // lr_t = base lr * the tensor's lr_scale
  double grad_scale = 1;  // clipping coefficient
};

class CudaLayers {
 public:
  virtual ~CudaLayers() = default;

  // core/layers/linear.h
  virtual void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y) const = 0;
  virtual void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                               const Tensor& dw, const Tensor& db) const = 0;

  // core/layers/embedding.h (embedding_backward is the rows variant with row_begin 0)
  virtual void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& y) const = 0;
  virtual void embedding_backward_rows(const Tensor& ids, const Tensor& dy, int64_t row_begin,
                                       const Tensor& dtable) const = 0;

  // core/layers/norms.h
  virtual void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                               const Tensor& rstd) const = 0;
  virtual void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                                const Tensor& dx, const Tensor& dw) const = 0;
  virtual void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, const Tensor& y,
                                 const Tensor& mean, const Tensor& rstd) const = 0;
  virtual void layernorm_backward(const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                                  const Tensor& dy, const Tensor& dx, const Tensor& dw, const Tensor& db) const = 0;

  // core/layers/activations.h
  virtual void gelu_forward(Gelu kind, const Tensor& x, const Tensor& y) const = 0;
  virtual void gelu_backward(Gelu kind, const Tensor& x, const Tensor& dy, const Tensor& dx) const = 0;
  virtual void swiglu_forward(const Tensor& gate_up, const Tensor& y) const = 0;
  virtual void swiglu_backward(const Tensor& gate_up, const Tensor& dy, const Tensor& dgate_up) const = 0;

  // core/layers/rotary.h (cos/sin tables are prepared on the host per batch and uploaded)
  virtual void rotary_forward(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& y) const = 0;
  virtual void rotary_backward(const Tensor& dy, const Tensor& cos, const Tensor& sin, const Tensor& dx) const = 0;

  // core/layers/vision.h (the patch embedding is a linear layer and needs no kernel of its own)
  virtual void vision_pos_embed_forward(const Tensor& table, const Tensor& idx, const Tensor& weight,
                                        const Tensor& y) const = 0;
  virtual void vision_pos_embed_backward(const Tensor& idx, const Tensor& weight, const Tensor& dy,
                                         const Tensor& dtable) const = 0;

  // core/layers/attention.h
  virtual void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                 bool causal, double scale, const Tensor& out, const Tensor& lse) const = 0;
  virtual void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                  const Tensor& lse, const Tensor& dout, const Tensor& cu_seqlens, bool causal,
                                  double scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                  Arena& scratch) const = 0;

  // core/layers/lm_head_loss.h: lm_head GEMM fused with the cross-entropy, in vocabulary chunks.
  virtual double lm_head_cross_entropy_forward(const Tensor& x, const Tensor& w, const Tensor& labels,
                                               const Tensor& lse, int64_t& count, Arena& scratch) const = 0;
  virtual void lm_head_cross_entropy_backward(const Tensor& x, const Tensor& w, const Tensor& labels,
                                              const Tensor& lse, double scale, const Tensor& dx, const Tensor& dw,
                                              Arena& scratch) const = 0;

  // core/layers/moe.h (the reference expert path: right, not yet fast; no expert parallelism)
  virtual void moe_forward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                           Arena& saved_arena, MoeSaved& saved, const Tensor& y, MoeStats& stats) const = 0;
  virtual void moe_backward(const MoeConfig& cfg, const MoeWeights& w, const Tensor& x, const Tensor& valid,
                            const MoeSaved& saved, const Tensor& dy, const Tensor& aux_dprob, const Tensor& dx,
                            const MoeGradients& grads, Arena& scratch) const = 0;

  // core/optim/adamw.h
  virtual void adamw_update(const AdamWTensorUpdate& u, const AdamWOptions& options, int64_t step) const = 0;
};

// The backend's implementation; throws a q3vl::Error when this binary has no CUDA backend.
const CudaLayers& cuda_layers();

// True when any of the tensors is in device memory: the layer then runs on the device (and checks there that
// all of its tensors are).
inline bool on_cuda(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    if (t->device() == Device::cuda) return true;
  return false;
}

}  // namespace q3vl
