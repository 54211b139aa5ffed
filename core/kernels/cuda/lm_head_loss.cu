// Fused lm_head + cross-entropy on the device, in vocabulary chunks of kVocabChunk words: each chunk's logits
// x w_chunk^T go through cuda::gemm into an f32 [N, chunk] scratch buffer (never the whole [N, V]); a block per
// row folds the chunk into the row's running max (f32) and sum of exponentials (f64 across chunks), and picks
// the target logit. A final single block writes lse, sums the loss in a fixed order (f64) and counts the
// tokens; its result is the one device-to-host read of the forward (it also carries the label check, which
// needs the labels' values). The backward recomputes each chunk's logits, turns them into
// scale * (softmax - onehot) (in place in f32, or into a bf16 buffer that feeds the bf16 GEMMs), and runs
// dx (+)= dlogits w_chunk (into an f32 accumulator when x is bf16) and dw_chunk += dlogits^T x through the GEMM.
// Every reduction has a fixed order: no atomics.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/device_checks.h"
#include "core/kernels/cuda/elem.cuh"
#include "core/kernels/cuda/gemm.h"
#include "core/kernels/cuda/layers_impl.h"
#include "core/layers/cross_entropy.h"

namespace q3vl::cuda {

namespace {

constexpr int kRowThreads = 256;     // per row of a chunk (a power of two for the tree reductions)
constexpr int kFinishThreads = 1024;  // the single block that sums the loss

// What the forward reads back: the loss sum, the token count and the first bad label (index n when none).
struct LossResult {
  double sum;
  long long count;
  long long first_bad;
  long long bad_label;
};

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  template <class V>
  __device__ V operator()(V a, V b) const { return a + b; }
};
struct MinOp {
  __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
};

// Tree reduction over the block (blockDim.x a power of two) in a fixed order; every thread gets the result.
template <class V, class Op>
__device__ V block_reduce(V v, V* shared, Op op) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  const V r = shared[0];
  __syncthreads();
  return r;
}

__global__ void init_rows(int64_t n, float* row_max, double* row_sum, float* target) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0;
    target[i] = 0.0f;
  }
}

// One block per row: the chunk [c0, c0 + cw) folded into the row's running max and sum, the target picked.
__global__ void __launch_bounds__(kRowThreads)
    fold_chunk(const float* __restrict__ logits, int64_t cw, int64_t c0, const int64_t* __restrict__ labels,
               float* __restrict__ row_max, double* __restrict__ row_sum, float* __restrict__ target) {
  __shared__ float shared[kRowThreads];
  const int64_t i = blockIdx.x;
  const int64_t label = labels[i];
  if (label == kIgnoreIndex) return;  // the whole block
  const float* row = logits + i * cw;
  float cm = -INFINITY;
  for (int64_t j = threadIdx.x; j < cw; j += blockDim.x) cm = fmaxf(cm, row[j]);
  cm = block_reduce(cm, shared, MaxOp{});
  const float m_old = row_max[i], m = fmaxf(m_old, cm);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < cw; j += blockDim.x) s += expf(row[j] - m);
  s = block_reduce(s, shared, SumOp{});
  if (threadIdx.x == 0) {
    // exp(-inf) = 0 rescales the empty sum of the first chunk.
    row_sum[i] = row_sum[i] * exp(static_cast<double>(m_old) - static_cast<double>(m)) + s;
    row_max[i] = m;
    if (label >= c0 && label < c0 + cw) target[i] = row[label - c0];
  }
}

// One block: lse of every row (0 on ignored rows), the loss summed in a fixed order, tokens counted, labels checked.
__global__ void __launch_bounds__(kFinishThreads)
    finish_loss(const int64_t* __restrict__ labels, int64_t n, int64_t vocab, const float* __restrict__ row_max,
                const double* __restrict__ row_sum, const float* __restrict__ target, float* __restrict__ lse,
                LossResult* __restrict__ result) {
  __shared__ double sums[kFinishThreads];
  __shared__ long long counts[kFinishThreads];
  double s = 0.0;
  long long count = 0, first_bad = n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t label = labels[i];
    if (label == kIgnoreIndex || label < 0 || label >= vocab) {
      if (label != kIgnoreIndex && i < first_bad) first_bad = i;
      lse[i] = 0.0f;
      continue;
    }
    const float l = static_cast<float>(static_cast<double>(row_max[i]) + log(row_sum[i]));
    lse[i] = l;
    s += static_cast<double>(l) - static_cast<double>(target[i]);
    ++count;
  }
  s = block_reduce(s, sums, SumOp{});
  count = block_reduce(count, counts, SumOp{});
  first_bad = block_reduce(first_bad, counts, MinOp{});
  if (threadIdx.x == 0) {
    result->sum = s;
    result->count = count;
    result->first_bad = first_bad;
    result->bad_label = first_bad < n ? labels[first_bad] : 0;
  }
}

// dlogits = scale * (softmax - onehot) of the chunk [c0, c0 + cw) from its logits and lse; 0 on ignored rows.
// dlogits may alias logits (f32).
template <class T>
__global__ void chunk_gradient(const float* logits, int64_t n, int64_t cw, int64_t c0,
                               const int64_t* __restrict__ labels, const float* __restrict__ lse, float scale,
                               T* dlogits) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * cw;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / cw, j = e % cw;
    const int64_t label = labels[i];
    float g = 0.0f;
    if (label != kIgnoreIndex) {
      g = scale * expf(logits[e] - lse[i]);
      if (label == c0 + j) g -= scale;
    }
    dlogits[e] = from_float<T>(g);
  }
}

template <class T>
__global__ void store_rounded(const float* __restrict__ src, int64_t count, T* __restrict__ dst) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[e] = from_float<T>(src[e]);
}

struct Dims {
  int64_t n, hidden, vocab;
};

Dims check_common(const char* layer, const Tensor& x, const Tensor& w, const Tensor& labels, const Tensor& lse,
                  const Arena& scratch) {
  require_float_dtype(layer, "x", x);
  const DType dt = x.dtype();
  require_device(layer, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), hidden = x.size(1);
  require_device(layer, "w", w, dt, {-1, hidden});
  const int64_t vocab = w.size(0);
  Q3VL_CHECK(vocab > 0, layer, ": w ", w.str(), " has an empty vocabulary dimension");
  require_device(layer, "labels", labels, DType::i64, {n});
  require_device(layer, "lse", lse, DType::f32, {n});
  Q3VL_CHECK(scratch.device() == Device::cuda, layer, ": scratch arena '", scratch.name(),
             "' is in host memory, but the layer runs on the CUDA device");
  return {n, hidden, vocab};
}

template <class P>
P* take(Arena& scratch, int64_t count) {
  return static_cast<P*>(scratch.allocate(static_cast<size_t>(count) * sizeof(P)));
}

const char* row_of(const Tensor& t, int64_t row, int64_t width) {
  return static_cast<const char*>(t.raw()) + static_cast<size_t>(row * width) * dtype_size(t.dtype());
}

}  // namespace

double CudaLayersImpl::lm_head_cross_entropy_forward(const Tensor& x, const Tensor& w, const Tensor& labels,
                                                     const Tensor& lse, int64_t& count, Arena& scratch) const {
  const char* L = "lm_head_cross_entropy_forward";
  const Dims g = check_common(L, x, w, labels, lse, scratch);
  count = 0;
  if (g.n == 0) return 0.0;
  const DType dt = x.dtype();
  cudaStream_t stream = context().stream;
  const size_t mark = scratch.mark();
  const int64_t width = std::min(g.vocab, kVocabChunk);
  float* logits = take<float>(scratch, g.n * width);
  float* row_max = take<float>(scratch, g.n);
  double* row_sum = take<double>(scratch, g.n);
  float* target = take<float>(scratch, g.n);
  auto* result = take<LossResult>(scratch, 1);
  const int64_t* lab = labels.device_data<const int64_t>(DType::i64);
  init_rows<<<blocks_for(g.n), kThreads, 0, stream>>>(g.n, row_max, row_sum, target);
  Q3VL_CUDA_LAUNCHED("lm_head_loss init_rows");
  for (int64_t c0 = 0; c0 < g.vocab; c0 += kVocabChunk) {
    const int64_t cw = std::min(kVocabChunk, g.vocab - c0);
    gemm(false, true, g.n, cw, g.hidden, 1.0f, x.raw(), g.hidden, row_of(w, c0, g.hidden), g.hidden, 0.0f, logits,
         cw, dt, DType::f32);
    fold_chunk<<<static_cast<unsigned>(g.n), kRowThreads, 0, stream>>>(logits, cw, c0, lab, row_max, row_sum,
                                                                      target);
    Q3VL_CUDA_LAUNCHED("lm_head_loss fold_chunk");
  }
  finish_loss<<<1, kFinishThreads, 0, stream>>>(lab, g.n, g.vocab, row_max, row_sum, target,
                                                lse.device_data<float>(DType::f32), result);
  Q3VL_CUDA_LAUNCHED("lm_head_loss finish_loss");
  // The forward's one read-back: the caller needs the loss and the count on the host.
  LossResult host{};
  Q3VL_CUDA_CHECK(cudaMemcpyAsync(&host, result, sizeof(host), cudaMemcpyDeviceToHost, stream));
  Q3VL_CUDA_CHECK(cudaStreamSynchronize(stream));
  scratch.release(mark);
  Q3VL_CHECK(host.first_bad >= g.n, L, ": labels[", host.first_bad, "] = ", host.bad_label, " is neither ",
             kIgnoreIndex, " nor in [0, ", g.vocab, ")");
  count = host.count;
  return host.sum;
}

void CudaLayersImpl::lm_head_cross_entropy_backward(const Tensor& x, const Tensor& w, const Tensor& labels,
                                                    const Tensor& lse, double scale, const Tensor& dx,
                                                    const Tensor& dw, Arena& scratch) const {
  const char* L = "lm_head_cross_entropy_backward";
  const Dims g = check_common(L, x, w, labels, lse, scratch);
  const DType dt = x.dtype();
  require_device(L, "dx", dx, dt, {g.n, g.hidden});
  require_grad_dtype(L, "dw", dw, dt);
  require_device(L, "dw", dw, dw.dtype(), {g.vocab, g.hidden});
  if (g.n == 0) return;
  cudaStream_t stream = context().stream;
  const size_t mark = scratch.mark();
  const int64_t width = std::min(g.vocab, kVocabChunk);
  float* logits = take<float>(scratch, g.n * width);
  const int64_t* lab = labels.device_data<const int64_t>(DType::i64);
  const float* lsep = lse.device_data<const float>(DType::f32);
  dispatch_float_dtype(L, dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr bool kF32 = std::is_same_v<T, float>;
    // f32: the gradient overwrites the logits and dx accumulates in place; bf16: a bf16 gradient chunk for the
    // GEMMs and an f32 dx accumulator rounded once at the end.
    T* dlogits = kF32 ? reinterpret_cast<T*>(logits) : take<T>(scratch, g.n * width);
    float* dx_acc = kF32 ? static_cast<float*>(dx.raw()) : take<float>(scratch, g.n * g.hidden);
    for (int64_t c0 = 0; c0 < g.vocab; c0 += kVocabChunk) {
      const int64_t cw = std::min(kVocabChunk, g.vocab - c0);
      const void* wc = row_of(w, c0, g.hidden);
      gemm(false, true, g.n, cw, g.hidden, 1.0f, x.raw(), g.hidden, wc, g.hidden, 0.0f, logits, cw, dt, DType::f32);
      chunk_gradient<T><<<blocks_for(g.n * cw), kThreads, 0, stream>>>(logits, g.n, cw, c0, lab, lsep,
                                                                       static_cast<float>(scale), dlogits);
      Q3VL_CUDA_LAUNCHED("lm_head_loss chunk_gradient");
      gemm(false, false, g.n, g.hidden, cw, 1.0f, dlogits, cw, wc, g.hidden, c0 == 0 ? 0.0f : 1.0f, dx_acc,
           g.hidden, dt, DType::f32);
      gemm(true, false, cw, g.hidden, g.n, 1.0f, dlogits, cw, x.raw(), g.hidden, 1.0f,
           const_cast<char*>(row_of(dw, c0, g.hidden)), g.hidden, dt, dw.dtype());
    }
    if constexpr (!kF32) {
      store_rounded<T><<<blocks_for(g.n * g.hidden), kThreads, 0, stream>>>(dx_acc, g.n * g.hidden,
                                                                            static_cast<T*>(dx.raw()));
      Q3VL_CUDA_LAUNCHED("lm_head_loss store_rounded");
    }
  });
  // Everything above is queued on the stream: later users of this scratch memory queue behind it.
  scratch.release(mark);
}

}  // namespace q3vl::cuda
