// AdamW update of one tensor on the device: the CPU's element update (core/optim/adamw.h) with the same fp32
// operations in the same order, each rounded where the CPU rounds (explicit __f*_rn intrinsics, so nvcc
// contracts nothing into an fma the CPU does not have), fmaf where the CPU uses std::fma, correctly rounded
// sqrt and division. The result equals the CPU's bit for bit; the bf16 compute copy is written in the same pass.
#include <cuda_bf16.h>

#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/layers_impl.h"
#include "core/layer_checks.h"
#include "core/optim/adamw.h"

namespace q3vl::cuda {

namespace {

__global__ void adamw_elements(float* p, const float* grad, float* m, float* v, __nv_bfloat16* p_bf16, int64_t n,
                               AdamWScalars s) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = __fmul_rn(grad[i], s.grad_scale);
    float pi = __fmul_rn(p[i], s.decay_factor);
    float vi = __fmul_rn(v[i], s.beta2);
    const float m_old = m[i];
    const float mi = fmaf(s.lerp_coeff, __fsub_rn(g, m_old), s.lerp_from_m ? m_old : g);
    vi = fmaf(__fmul_rn(s.one_minus_beta2, g), g, vi);
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bias_correction2_sqrt), s.eps);
    pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(s.neg_step_size, mi), denom));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (p_bf16) p_bf16[i] = __float2bfloat16_rn(pi);
  }
}

// Defined, in device memory, `dtype`, contiguous and shaped like the parameter.
void require_like(const char* L, const char* name, const Tensor& t, DType dtype, const Shape& shape) {
  Q3VL_CHECK(t.defined(), L, ": ", name, " is missing");
  Q3VL_CHECK(t.device() == Device::cuda, L, ": ", name, " ", t.str(),
             " is in host memory, but the update runs on the CUDA device (its other tensors are there)");
  require_dtype(L, name, t, dtype);
  Q3VL_CHECK(t.shape() == shape, L, ": ", name, " has shape ", t.shape().str(), ", expected ", shape.str());
  Q3VL_CHECK(t.is_contiguous(), L, ": ", name, " ", t.str(), " is not contiguous");
}

}  // namespace

void CudaLayersImpl::adamw_update(const AdamWTensorUpdate& u, const AdamWOptions& options, int64_t step) const {
  const char* L = "adamw_update";
  Q3VL_CHECK(step >= 1, L, ": step ", step, " must be at least 1");
  const Shape& shape = u.param.shape();
  require_like(L, "param", u.param, DType::f32, shape);
  require_like(L, "grad", u.grad, DType::f32, shape);
  require_like(L, "exp_avg", u.exp_avg, DType::f32, shape);
  require_like(L, "exp_avg_sq", u.exp_avg_sq, DType::f32, shape);
  if (u.param_bf16.defined()) require_like(L, "param_bf16", u.param_bf16, DType::bf16, shape);
  const int64_t n = u.param.numel();
  if (n == 0) return;
  const AdamWScalars s = adamw_scalars(options, step, u.lr, u.grad_scale, u.decay);
  adamw_elements<<<blocks_for(n), kThreads, 0, context().stream>>>(
      static_cast<float*>(u.param.raw()), static_cast<const float*>(u.grad.raw()),
      static_cast<float*>(u.exp_avg.raw()), static_cast<float*>(u.exp_avg_sq.raw()),
      u.param_bf16.defined() ? static_cast<__nv_bfloat16*>(u.param_bf16.raw()) : nullptr, n, s);
  Q3VL_CUDA_LAUNCHED("adamw_elements");
}

}  // namespace q3vl::cuda
