// AdamW step (torch's single-tensor operation order in fp32; device tensors go to the CUDA backend), the
// deterministic gradient sum of squares and the clipping coefficient.
#include "core/optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <string>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "core/bf16.h"
#include "core/kernels/cuda_layers.h"
#include "core/layer_checks.h"

namespace q3vl {

namespace {

constexpr const char* kLayer = "AdamW";
// Tensors smaller than this are updated by one thread: a parallel region costs more than the work.
constexpr int64_t kParallelMin = 1 << 15;
// Elements per partial sum of gradient_sum_of_squares; the partition, not the thread count, fixes the order.
constexpr int64_t kSumBlock = 1 << 16;
// Partial sums kept at once (on the stack) before they are added in block order.
constexpr int64_t kSumGroup = 256;

// require() against the shape `expected` of any rank: `dtype` (f32 unless said), contiguous, host memory.
void require_f32(const std::string& name, const Tensor& t, const Shape& expected, DType dtype = DType::f32) {
  const auto& d = expected.dims;
  const char* n = name.c_str();
  switch (expected.ndim) {
    case 0: return require(kLayer, n, t, dtype, {});
    case 1: return require(kLayer, n, t, dtype, {d[0]});
    case 2: return require(kLayer, n, t, dtype, {d[0], d[1]});
    case 3: return require(kLayer, n, t, dtype, {d[0], d[1], d[2]});
    case 4: return require(kLayer, n, t, dtype, {d[0], d[1], d[2], d[3]});
    case 5: return require(kLayer, n, t, dtype, {d[0], d[1], d[2], d[3], d[4]});
    default: return require(kLayer, n, t, dtype, {d[0], d[1], d[2], d[3], d[4], d[5]});
  }
}

// The same checks on a tensor that must be in device memory (where the optimizer's moments are).
void require_f32_device(const std::string& name, const Tensor& t, const Shape& expected, DType dtype = DType::f32) {
  const char* n = name.c_str();
  Q3VL_CHECK(t.defined(), kLayer, ": ", n, " is missing");
  Q3VL_CHECK(t.device() == Device::cuda, kLayer, ": ", n, " ", t.str(),
             " is in host memory, but the optimizer's moments are on the CUDA device");
  require_dtype(kLayer, n, t, dtype);
  Q3VL_CHECK(t.shape() == expected, kLayer, ": ", n, " has shape ", t.shape().str(), ", expected ", expected.str());
  Q3VL_CHECK(t.is_contiguous(), kLayer, ": ", n, " ", t.str(), " is not contiguous");
}

// out = sqrt(in), correctly rounded like std::sqrt. std::sqrt may set errno, which keeps GCC from
// vectorising a loop that calls it; the SIMD square roots are IEEE correctly rounded too, so every path
// gives the same bits.
void sqrt_into(float* out, const float* in, int64_t n) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_sqrt_ps(_mm256_loadu_ps(in + i)));
#elif defined(__SSE__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_loadu_ps(in + i)));
#endif
  for (; i < n; ++i) out[i] = std::sqrt(in[i]);
}

// Elements per chunk of adamw_update: small enough for the stack and L1, a multiple of any vector width.
constexpr int64_t kChunk = 512;

// One chunk in passes over L1-resident data. Two reasons for the passes. (1) torch rounds g * grad_scale,
// p * (1 - lr wd) and v * beta2 before the sums that use them (separate kernels), but GCC contracts a
// product feeding a sum into one fma even across statements and C++ gives no portable way to forbid it;
// those products are stored, and no contraction crosses memory. (2) The square roots get a pass of their
// own (sqrt_into) and the other passes vectorise.
void adamw_update_chunk(float* p, const float* grad, float* m, float* v, int64_t n, const AdamWScalars& s) {
  float g[kChunk], root[kChunk];
  for (int64_t i = 0; i < n; ++i) {
    g[i] = grad[i] * s.grad_scale;
    p[i] = p[i] * s.decay_factor;
    v[i] = v[i] * s.beta2;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float m_old = m[i];
    m[i] = std::fma(s.lerp_coeff, g[i] - m_old, s.lerp_from_m ? m_old : g[i]);
    v[i] = std::fma(s.one_minus_beta2 * g[i], g[i], v[i]);
  }
  sqrt_into(root, v, n);
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] + (s.neg_step_size * m[i]) / (root[i] / s.bias_correction2_sqrt + s.eps);
}

void update_elements(float* p, const float* grad, float* m, float* v, int64_t n, const AdamWScalars& s) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t start = c * kChunk;
    adamw_update_chunk(p + start, grad + start, m + start, v + start, std::min(kChunk, n - start), s);
  }
}

// Sum of squares of one block in a fixed order: eight interleaved f64 lanes (so it vectorises), the tail,
// then the lanes in index order.
double block_sum_of_squares(const float* x, int64_t n) {
  constexpr int kLanes = 8;
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += double(x[i + l]) * double(x[i + l]);
  for (; i < n; ++i) lane[0] += double(x[i]) * double(x[i]);
  double sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

double tensor_sum_of_squares(const float* x, int64_t n) {
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  if (blocks <= 1) return block_sum_of_squares(x, n);
  double total = 0;
  for (int64_t first = 0; first < blocks; first += kSumGroup) {
    const int64_t count = std::min(kSumGroup, blocks - first);
    double partial[kSumGroup];
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < count; ++b) {
      const int64_t start = (first + b) * kSumBlock;
      partial[b] = block_sum_of_squares(x + start, std::min(kSumBlock, n - start));
    }
    for (int64_t b = 0; b < count; ++b) total += partial[b];
  }
  return total;
}

}  // namespace

AdamWScalars adamw_scalars(const AdamWOptions& options, int64_t step, double lr, double grad_scale, bool decay) {
  const double bias_correction1 = 1 - std::pow(options.beta1, double(step));
  const double bias_correction2 = 1 - std::pow(options.beta2, double(step));
  const float lerp_weight = float(1 - options.beta1);
  AdamWScalars s{};
  s.grad_scale = float(grad_scale);
  s.lerp_from_m = std::fabs(lerp_weight) < 0.5f;
  s.lerp_coeff = s.lerp_from_m ? lerp_weight : lerp_weight - 1.0f;
  s.beta2 = float(options.beta2);
  s.one_minus_beta2 = float(1 - options.beta2);
  s.bias_correction2_sqrt = float(std::pow(bias_correction2, 0.5));
  s.eps = float(options.eps);
  // p * 1.0f is p exactly, so undecayed tensors share the loop.
  s.decay_factor = decay ? float(1 - lr * options.weight_decay) : 1.0f;
  s.neg_step_size = float(-(lr / bias_correction1));
  return s;
}

void adamw_update(const AdamWTensorUpdate& u, const AdamWOptions& options, int64_t step) {
  if (on_cuda({&u.param, &u.grad, &u.exp_avg, &u.exp_avg_sq, &u.param_bf16}))
    return cuda_layers().adamw_update(u, options, step);
  Q3VL_CHECK(step >= 1, kLayer, ": step ", step, " must be at least 1");
  const Shape& shape = u.param.shape();
  require_f32("param", u.param, shape);
  require_f32("grad", u.grad, shape);
  require_f32("exp_avg", u.exp_avg, shape);
  require_f32("exp_avg_sq", u.exp_avg_sq, shape);
  if (u.param_bf16.defined()) require_f32("param_bf16", u.param_bf16, shape, DType::bf16);
  float* p = u.param.data<float>();
  const int64_t n = u.param.numel();
  update_elements(p, u.grad.data<float>(), u.exp_avg.data<float>(), u.exp_avg_sq.data<float>(), n,
                  adamw_scalars(options, step, u.lr, u.grad_scale, u.decay));
  if (u.param_bf16.defined()) {
    auto* out = static_cast<uint16_t*>(u.param_bf16.raw());
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(p[i]);
  }
}

AdamW::AdamW(std::vector<OptimTensor> tensors, const AdamWOptions& options, Device device)
    : options_(options), tensors_(std::move(tensors)) {
  Q3VL_CHECK(options_.beta1 >= 0 && options_.beta1 < 1, kLayer, ": beta1 ", options_.beta1, " is not in [0, 1)");
  Q3VL_CHECK(options_.beta2 >= 0 && options_.beta2 < 1, kLayer, ": beta2 ", options_.beta2, " is not in [0, 1)");
  Q3VL_CHECK(options_.eps > 0 && std::isfinite(options_.eps), kLayer, ": eps ", options_.eps, " is not positive");
  Q3VL_CHECK(options_.weight_decay >= 0 && std::isfinite(options_.weight_decay), kLayer, ": weight_decay ",
             options_.weight_decay, " is negative or not finite");
  size_t bytes = 0;
  for (const OptimTensor& t : tensors_) {
    const std::string who = "tensor '" + t.name + "'";
    const auto check = device == Device::cuda ? require_f32_device : require_f32;
    check(who + " param", t.param, t.param.shape(), DType::f32);
    if (!t.frozen || t.grad.defined()) check(who + " grad", t.grad, t.param.shape(), DType::f32);
    if (t.param_bf16.defined()) check(who + " param_bf16", t.param_bf16, t.param.shape(), DType::bf16);
    Q3VL_CHECK(t.lr_scale >= 0 && std::isfinite(t.lr_scale), kLayer, ": ", who, " has lr_scale ", t.lr_scale,
               ", expected a finite value >= 0");
    bytes += state_bytes(t.param.numel());
  }
  arena_ = std::make_unique<Arena>("AdamW moments", bytes, device);
  exp_avg_.reserve(tensors_.size());
  exp_avg_sq_.reserve(tensors_.size());
  for (const OptimTensor& t : tensors_) {
    exp_avg_.push_back(Tensor::zeros(*arena_, t.param.shape(), DType::f32));
    exp_avg_sq_.push_back(Tensor::zeros(*arena_, t.param.shape(), DType::f32));
  }
}

void AdamW::step(double lr, double grad_scale) {
  Q3VL_CHECK(lr >= 0 && std::isfinite(lr), kLayer, ": learning rate ", lr, " is negative or not finite");
  Q3VL_CHECK(grad_scale >= 0 && std::isfinite(grad_scale), kLayer, ": grad_scale ", grad_scale,
             " is negative or not finite");
  const int64_t t = steps_ + 1;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const OptimTensor& ot = tensors_[i];
    if (ot.frozen) continue;
    AdamWTensorUpdate u{ot.param, ot.grad, exp_avg_[i], exp_avg_sq_[i], ot.param_bf16};
    u.decay = ot.decay;
    u.lr = lr * ot.lr_scale;
    u.grad_scale = grad_scale;
    adamw_update(u, options_, t);
  }
  steps_ = t;
}

void AdamW::set_steps(int64_t steps) {
  Q3VL_CHECK(steps >= 0, kLayer, ": step count ", steps, " is negative");
  steps_ = steps;
}

size_t AdamW::state_bytes(int64_t numel) {
  Q3VL_CHECK(numel >= 0, kLayer, ": element count ", numel, " is negative");
  return 2 * Arena::aligned(size_t(numel) * sizeof(float));
}

double gradient_sum_of_squares(const std::vector<OptimTensor>& tensors) {
  for (const OptimTensor& t : tensors)
    if (!t.frozen) require_f32("tensor '" + t.name + "' grad", t.grad, t.grad.shape());
  double total = 0;
  for (const OptimTensor& t : tensors)
    if (!t.frozen) total += tensor_sum_of_squares(t.grad.data<float>(), t.grad.numel());
  return total;
}

double clip_coefficient(double norm, double max_norm) {
  Q3VL_CHECK(norm >= 0 && std::isfinite(norm), "clip_coefficient: gradient norm ", norm, " is negative or not finite");
  if (max_norm <= 0) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

}  // namespace q3vl
