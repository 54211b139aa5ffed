// AdamW with decoupled weight decay (torch.optim.AdamW semantics, fp32 moments) over a list of parameter
// tensors, plus the global gradient norm the trainer clips with. Built on plain tensor spans so that a
// sharded (FSDP) run hands it the shards of its rank and nothing else changes.
//
// Update of one element at optimizer step t (1-based), learning rate lr_t = lr * tensor.lr_scale:
//   g  = grad * grad_scale                    (grad_scale: the clipping coefficient, 1 when not clipped)
//   p *= 1 - lr_t * weight_decay              (only when tensor.decay)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g^2
//   p -= (lr_t / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Frozen tensors are skipped entirely (no decay, moments stay zero).
//
// Every operation is fp32 and in torch.optim.AdamW(foreach=False, fused=False)'s order, so the two agree to
// the last bit except where torch's vectorised sqrt (not correctly rounded) is 1 ulp off: scalars are
// formed in double and rounded to float once, p is decayed first, m uses torch's lerp
// (m + (1-beta1)(g-m) as one fma), v = fma((1-beta2) g, g, beta2 v), then
// p += (-lr_t / (1 - beta1^t)) m / (sqrt(v) / (1 - beta2^t)^0.5 + eps).
//
// The moments live where the parameters do: AdamW takes the device of its moments' arena, and each tensor's
// update (adamw_update) runs on the CPU or, for device tensors, on the CUDA backend with the same operations
// in the same order (so the two agree bit for bit: sqrt and division are correctly rounded on both).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/tensor.h"

namespace q3vl {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

struct AdamWTensorUpdate;  // core/kernels/cuda_layers.h

// The fp32 scalars of one tensor's update at step `step`, each formed in double and rounded to float once
// (as torch does when a Python float meets an fp32 tensor); shared by the CPU and CUDA updates so both use
// the same bits.
struct AdamWScalars {
  float grad_scale, decay_factor, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
  bool lerp_from_m;  // torch's lerp: m + w (g - m) when |w| < 0.5, else g - (1 - w) (g - m)
};
// lr: the tensor's learning rate lr_t (base lr * lr_scale).
AdamWScalars adamw_scalars(const AdamWOptions& options, int64_t step, double lr, double grad_scale, bool decay);

// One update of one tensor at step `step` (1-based): param, exp_avg, exp_avg_sq updated in place and
// param_bf16 (when defined) set to the new parameter rounded to bf16; on the CUDA backend when any of the
// tensors is in device memory (then all must be), else on the CPU.
void adamw_update(const AdamWTensorUpdate& update, const AdamWOptions& options, int64_t step);

struct OptimTensor {
  std::string name;  // the parameter's key (HF checkpoint key), used for checkpoint state names
  Tensor param;      // f32, contiguous
  Tensor grad;       // f32, same shape (may be absent when frozen)
  bool decay = true;
  double lr_scale = 1.0;
  bool frozen = false;
  Tensor param_bf16{};  // optional bf16 compute copy of param (same shape and device), rewritten by each update
};

class AdamW {
 public:
  // Allocates zeroed exp_avg / exp_avg_sq for every tensor (frozen ones too, so checkpoints have one layout)
  // in an arena on `device`, where every tensor's param and grad must be too.
  AdamW(std::vector<OptimTensor> tensors, const AdamWOptions& options, Device device = Device::cpu);

  // One update of every non-frozen tensor with base learning rate `lr`; increments steps().
  void step(double lr, double grad_scale = 1.0);

  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps);  // after restoring the moments from a checkpoint
  const AdamWOptions& options() const { return options_; }
  size_t size() const { return tensors_.size(); }
  const OptimTensor& tensor(size_t i) const { return tensors_[i]; }
  const Tensor& exp_avg(size_t i) const { return exp_avg_[i]; }
  const Tensor& exp_avg_sq(size_t i) const { return exp_avg_sq_[i]; }
  // Bytes of the moments (exp_avg + exp_avg_sq, each 64-byte aligned) of one tensor of `numel` elements;
  // the optimizer's arena is the sum over its tensors.
  static size_t state_bytes(int64_t numel);

 private:
  AdamWOptions options_;
  std::vector<OptimTensor> tensors_;
  std::unique_ptr<Arena> arena_;
  std::vector<Tensor> exp_avg_, exp_avg_sq_;
  int64_t steps_ = 0;
};

// Sum of squares of every element of the non-frozen gradients, accumulated in f64 in a fixed order (per
// tensor in blocks, blocks summed in index order) so it is identical for any thread count.
double gradient_sum_of_squares(const std::vector<OptimTensor>& tensors);

// Clipping coefficient for a total gradient norm: min(1, max_norm / (norm + 1e-6)) as torch's
// clip_grad_norm_; 1 when max_norm <= 0 (clipping off). A norm that is not finite is an error (the caller
// checks for NaN/Inf gradients first).
double clip_coefficient(double norm, double max_norm);

}  // namespace q3vl
