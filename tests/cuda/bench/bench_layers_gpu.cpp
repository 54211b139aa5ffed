// Forward + backward of the CUDA layers at the Qwen3-VL-30B-A3B shapes (4096 text tokens, hidden 2048, 32 q /
// 4 kv heads of 128, expert FFN 768, vocabulary 151,936; vision 1152 wide, 16 heads of 72, MLP 4304), bf16
// activations and weights, f32 parameter gradients. GEMM layers report TFLOP/s against the 798 TF ceiling
// (forward + backward = 3 x 2*N*in*out); element-wise and norm layers report GB/s against the 4.27 TB/s copy
// ceiling, counting each tensor read or written once (the fewest bytes the layer must move). Rows at 32768
// tokens put the element-wise data well above the 60 MiB L2 so they measure device memory, not the cache.
#include <benchmark/benchmark.h>

#include <cmath>

#include "core/device.h"
#include "core/kernels/cuda/gemm.h"
#include "core/layers/activations.h"
#include "core/layers/linear.h"
#include "core/layers/norms.h"
#include "core/layers/rotary.h"
#include "tests/cuda/bench/gpu_bench.h"

namespace q3vl::bench {
namespace {

constexpr DType kBf16 = DType::bf16;

// The ceiling itself: one bf16 GEMM of 8192^3 through the project's cuBLASLt wrapper, and a device copy.
void BM_GemmBf16_8192(benchmark::State& state) {
  const int64_t n = 8192;
  const size_t mark = device_arena().mark();
  Tensor a = device_random({n, n}, kBf16, 1), b = device_random({n, n}, kBf16, 2);
  Tensor c = Tensor::empty(device_arena(), {n, n}, kBf16);
  run_timed(state, [&] {
    cuda::gemm(false, true, n, n, n, 1.0f, a.raw(), n, b.raw(), n, 0.0f, c.raw(), n, kBf16, kBf16);
  });
  report_flops(state, 2.0 * n * n * n);
  device_arena().release(mark);
}
BENCHMARK(BM_GemmBf16_8192)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);

void BM_DeviceCopy_2GB(benchmark::State& state) {
  const int64_t n = int64_t{1} << 29;  // f32 elements: 2 GiB
  const size_t mark = device_arena().mark();
  Tensor a = device_random({n}, DType::f32, 3), b = Tensor::empty(device_arena(), {n}, DType::f32);
  run_timed(state, [&] { copy(b, a); });
  report_bytes(state, 2.0 * static_cast<double>(a.nbytes()));
  device_arena().release(mark);
}
BENCHMARK(BM_DeviceCopy_2GB)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);

// Linear forward + backward (dx, dW) of N x in -> out; args {N, in, out}.
void BM_LinearFwdBwd(benchmark::State& state) {
  const int64_t n = state.range(0), in = state.range(1), out = state.range(2);
  const size_t mark = device_arena().mark();
  Tensor x = device_random({n, in}, kBf16, 1), w = device_random({out, in}, kBf16, 2, 0.02);
  Tensor dy = device_random({n, out}, kBf16, 3);
  Tensor y = Tensor::empty(device_arena(), {n, out}, kBf16), dx = Tensor::empty(device_arena(), {n, in}, kBf16);
  Tensor dw = Tensor::zeros(device_arena(), {out, in}, DType::f32);
  run_timed(state, [&] {
    linear_forward(x, w, Tensor(), y);
    linear_backward(x, w, dy, dx, dw, Tensor());
  });
  report_flops(state, 3.0 * 2.0 * n * in * out);
  device_arena().release(mark);
}
BENCHMARK(BM_LinearFwdBwd)
    ->ArgNames({"N", "in", "out"})
    ->Args({4096, 2048, 4096})     // q_proj
    ->Args({4096, 4096, 2048})     // o_proj
    ->Args({4096, 2048, 512})      // k_proj / v_proj
    ->Args({4096, 2048, 151936})   // lm_head
    ->Args({16384, 1152, 3456})    // vision qkv, 4 images of 64x64 patches
    ->Args({16384, 1152, 4304})    // vision MLP fc1
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

// RMSNorm forward + backward of [N, D]: reads x twice (forward, backward), dy once; writes y and dx; the
// weight, its f32 gradient and the f32 rstd are counted too.
void BM_RmsNormFwdBwd(benchmark::State& state) {
  const int64_t n = state.range(0), d = state.range(1);
  const size_t mark = device_arena().mark();
  Tensor x = device_random({n, d}, kBf16, 1), w = device_random({d}, kBf16, 2);
  Tensor dy = device_random({n, d}, kBf16, 3);
  Tensor y = Tensor::empty(device_arena(), {n, d}, kBf16), dx = Tensor::empty(device_arena(), {n, d}, kBf16);
  Tensor rstd = Tensor::empty(device_arena(), {n}, DType::f32);
  Tensor dw = Tensor::zeros(device_arena(), {d}, DType::f32);
  run_timed(state, [&] {
    rmsnorm_forward(x, w, 1e-6, y, rstd);
    rmsnorm_backward(x, w, rstd, dy, dx, dw);
  });
  report_bytes(state, 5.0 * static_cast<double>(x.nbytes()) + 2.0 * n * 4.0);
  device_arena().release(mark);
}
BENCHMARK(BM_RmsNormFwdBwd)
    ->ArgNames({"N", "D"})
    ->Args({4096, 2048})
    ->Args({32768, 2048})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

// LayerNorm forward + backward (the vision tower's) of [N, D]: as RMSNorm plus the mean.
void BM_LayerNormFwdBwd(benchmark::State& state) {
  const int64_t n = state.range(0), d = state.range(1);
  const size_t mark = device_arena().mark();
  Tensor x = device_random({n, d}, kBf16, 1), w = device_random({d}, kBf16, 2), b = device_random({d}, kBf16, 4);
  Tensor dy = device_random({n, d}, kBf16, 3);
  Tensor y = Tensor::empty(device_arena(), {n, d}, kBf16), dx = Tensor::empty(device_arena(), {n, d}, kBf16);
  Tensor mean = Tensor::empty(device_arena(), {n}, DType::f32), rstd = Tensor::empty(device_arena(), {n}, DType::f32);
  Tensor dw = Tensor::zeros(device_arena(), {d}, DType::f32), db = Tensor::zeros(device_arena(), {d}, DType::f32);
  run_timed(state, [&] {
    layernorm_forward(x, w, b, 1e-6, y, mean, rstd);
    layernorm_backward(x, w, mean, rstd, dy, dx, dw, db);
  });
  report_bytes(state, 5.0 * static_cast<double>(x.nbytes()) + 4.0 * n * 4.0);
  device_arena().release(mark);
}
BENCHMARK(BM_LayerNormFwdBwd)
    ->ArgNames({"N", "D"})
    ->Args({16384, 1152})
    ->Args({65536, 1152})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

// SwiGLU forward + backward over the expert rows (N tokens x top-8 slots, 2I = 1536): forward reads gate_up
// and writes y; backward reads gate_up and dy and writes dgate_up.
void BM_SwigluFwdBwd(benchmark::State& state) {
  const int64_t rows = state.range(0), inter = state.range(1);
  const size_t mark = device_arena().mark();
  Tensor gu = device_random({rows, 2 * inter}, kBf16, 1), dy = device_random({rows, inter}, kBf16, 2);
  Tensor y = Tensor::empty(device_arena(), {rows, inter}, kBf16);
  Tensor dgu = Tensor::empty(device_arena(), {rows, 2 * inter}, kBf16);
  run_timed(state, [&] {
    swiglu_forward(gu, y);
    swiglu_backward(gu, dy, dgu);
  });
  report_bytes(state, 3.0 * static_cast<double>(gu.nbytes()) + 2.0 * static_cast<double>(y.nbytes()));
  device_arena().release(mark);
}
BENCHMARK(BM_SwigluFwdBwd)
    ->ArgNames({"rows", "I"})
    ->Args({4096 * 8, 768})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

// GELU (tanh) forward + backward of the vision MLP activation [N, 4304]: x read twice, dy read, y and dx written.
void BM_GeluFwdBwd(benchmark::State& state) {
  const int64_t n = state.range(0), d = state.range(1);
  const size_t mark = device_arena().mark();
  Tensor x = device_random({n, d}, kBf16, 1), dy = device_random({n, d}, kBf16, 2);
  Tensor y = Tensor::empty(device_arena(), {n, d}, kBf16), dx = Tensor::empty(device_arena(), {n, d}, kBf16);
  run_timed(state, [&] {
    gelu_forward(Gelu::tanh, x, y);
    gelu_backward(Gelu::tanh, x, dy, dx);
  });
  report_bytes(state, 5.0 * static_cast<double>(x.nbytes()));
  device_arena().release(mark);
}
BENCHMARK(BM_GeluFwdBwd)
    ->ArgNames({"N", "D"})
    ->Args({16384, 4304})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

// Text rotary forward + backward on q [N, 32, 128] with f32 cos/sin tables [N, 128]: x and dy read, y and dx
// written, the tables read twice.
void BM_RotaryFwdBwd(benchmark::State& state) {
  const int64_t n = state.range(0), h = state.range(1), d = state.range(2);
  const size_t mark = device_arena().mark();
  Tensor x = device_random({n, h, d}, kBf16, 1), dy = device_random({n, h, d}, kBf16, 2);
  Tensor cos = device_random({n, d}, kBf16, 3), sin = device_random({n, d}, kBf16, 4);
  Tensor y = Tensor::empty(device_arena(), {n, h, d}, kBf16), dx = Tensor::empty(device_arena(), {n, h, d}, kBf16);
  run_timed(state, [&] {
    rotary_forward(x, cos, sin, y);
    rotary_backward(dy, cos, sin, dx);
  });
  report_bytes(state, 4.0 * static_cast<double>(x.nbytes()) + 4.0 * static_cast<double>(cos.nbytes()));
  device_arena().release(mark);
}
BENCHMARK(BM_RotaryFwdBwd)
    ->ArgNames({"N", "H", "D"})
    ->Args({4096, 32, 128})
    ->Args({32768, 32, 128})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

}  // namespace
}  // namespace q3vl::bench
