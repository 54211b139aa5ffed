// Dense SwiGLU MLP forward/backward: the two input projections as CPU GEMMs into the fused [N, 2I] block, then
// swiglu and linear (which dispatch on their own); host memory only.
#include "core/layers/swiglu_mlp.h"

#include "core/arena_layout.h"
#include "core/kernels/cpu/gemm.h"
#include "core/layer_checks.h"
#include "core/layers/activations.h"
#include "core/layers/linear.h"

namespace q3vl {

namespace {

// The saved tensors, in carving order.
template <class Carve>
SwigluMlpSaved saved_tensors(int64_t n, int64_t inter, DType dt, Carve&& carve) {
  SwigluMlpSaved s;
  s.gate_up = carve({n, 2 * inter}, dt);
  s.act = carve({n, inter}, dt);
  return s;
}

// The backward's scratch: d act, then d gate_up.
struct ScratchTensors {
  Tensor d_act, d_gate_up;
};
template <class Carve>
ScratchTensors scratch_tensors(int64_t n, int64_t inter, DType dt, Carve&& carve) {
  ScratchTensors s;
  s.d_act = carve({n, inter}, dt);
  s.d_gate_up = carve({n, 2 * inter}, dt);
  return s;
}

// Checks shared by forward and backward; returns I.
int64_t check_weights(const char* L, const SwigluMlpWeights& w, const char* gate_name, const char* up_name,
                      const char* down_name, DType dt, int64_t h) {
  require(L, gate_name, w.gate_proj, dt, {-1, h});
  const int64_t inter = w.gate_proj.size(0);
  require(L, up_name, w.up_proj, dt, {inter, h});
  require(L, down_name, w.down_proj, dt, {h, inter});
  return inter;
}

// gate and up written side by side into gate_up [N, 2I] by two GEMMs with row stride 2I.
template <class T>
void gate_up_forward(const Tensor& x, const Tensor& wg, const Tensor& wu, const Tensor& gate_up) {
  const int64_t n = x.size(0), h = x.size(1), i = wg.size(0);
  T* out = gate_up.data<T>();
  cpu::gemm<T>(false, true, n, i, h, T(1), x.data<T>(), h, wg.data<T>(), h, T(0), out, 2 * i);
  cpu::gemm<T>(false, true, n, i, h, T(1), x.data<T>(), h, wu.data<T>(), h, T(0), out + i, 2 * i);
}

// Gradients of the two projections from d_gate_up [N, 2I]: dWg, dWu accumulate; dx written.
template <class T>
void gate_up_backward(const Tensor& x, const Tensor& wg, const Tensor& wu, const Tensor& d_gate_up, const Tensor& dx,
                      const Tensor& dwg, const Tensor& dwu) {
  const int64_t n = x.size(0), h = x.size(1), i = wg.size(0);
  const T* dgu = d_gate_up.data<T>();
  cpu::gemm<T>(true, false, i, h, n, T(1), dgu, 2 * i, x.data<T>(), h, T(1), dwg.data<T>(), h);
  cpu::gemm<T>(true, false, i, h, n, T(1), dgu + i, 2 * i, x.data<T>(), h, T(1), dwu.data<T>(), h);
  cpu::gemm<T>(false, false, n, h, i, T(1), dgu, 2 * i, wg.data<T>(), h, T(0), dx.data<T>(), h);
  cpu::gemm<T>(false, false, n, h, i, T(1), dgu + i, 2 * i, wu.data<T>(), h, T(1), dx.data<T>(), h);
}

}  // namespace

size_t swiglu_mlp_saved_bytes(int64_t n, int64_t inter, DType dtype) {
  ArenaSizer sizer;
  saved_tensors(n, inter, dtype, sizer);
  return sizer.bytes();
}

size_t swiglu_mlp_scratch_bytes(int64_t n, int64_t inter, DType dtype) {
  ArenaSizer sizer;
  scratch_tensors(n, inter, dtype, sizer);
  return sizer.bytes();
}

SwigluMlpSaved swiglu_mlp_forward(const SwigluMlpWeights& w, const Tensor& x, Arena& saved, const Tensor& y) {
  const char* L = "swiglu_mlp_forward";
  const DType dt = x.dtype();
  require(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), h = x.size(1);
  const int64_t inter = check_weights(L, w, "gate_proj", "up_proj", "down_proj", dt, h);
  require(L, "y", y, dt, {n, h});
  SwigluMlpSaved s = saved_tensors(n, inter, dt, ArenaCarver(saved));
  dispatch_float(L, dt, [&](auto tag) { gate_up_forward<decltype(tag)>(x, w.gate_proj, w.up_proj, s.gate_up); });
  swiglu_forward(s.gate_up, s.act);
  linear_forward(s.act, w.down_proj, Tensor{}, y);
  return s;
}

void swiglu_mlp_backward(const SwigluMlpWeights& w, const Tensor& x, const SwigluMlpSaved& saved, const Tensor& dy,
                         const Tensor& dx, const SwigluMlpWeights& grads, Arena& scratch) {
  const char* L = "swiglu_mlp_backward";
  const DType dt = x.dtype();
  require(L, "x", x, dt, {-1, -1});
  const int64_t n = x.size(0), h = x.size(1);
  const int64_t inter = check_weights(L, w, "gate_proj", "up_proj", "down_proj", dt, h);
  check_weights(L, grads, "grad gate_proj", "grad up_proj", "grad down_proj", dt, h);
  require(L, "saved.gate_up", saved.gate_up, dt, {n, 2 * inter});
  require(L, "saved.act", saved.act, dt, {n, inter});
  require(L, "dy", dy, dt, {n, h});
  require(L, "dx", dx, dt, {n, h});
  const size_t mark = scratch.mark();
  const ScratchTensors t = scratch_tensors(n, inter, dt, ArenaCarver(scratch));
  linear_backward(saved.act, w.down_proj, dy, t.d_act, grads.down_proj, Tensor{});
  swiglu_backward(saved.gate_up, t.d_act, t.d_gate_up);
  dispatch_float(L, dt, [&](auto tag) {
    gate_up_backward<decltype(tag)>(x, w.gate_proj, w.up_proj, t.d_gate_up, dx, grads.gate_proj, grads.up_proj);
  });
  scratch.release(mark);
}

}  // namespace q3vl
