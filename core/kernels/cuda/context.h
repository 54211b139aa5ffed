// The CUDA backend's per-process context: the current device, the stream every layer queues its work on, the
// cuBLASLt handle and its workspace, and the reductions' scratch. Created on first use (after which nothing is allocated here), so a
// CPU-only run never touches the driver.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace q3vl::cuda {

struct Context {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;  // cuBLASLt workspace
  size_t workspace_bytes = 0;
  int multiprocessors = 0;
  // Scratch of the two-level deterministic reductions (per-block partial sums, then a fixed-order sum of the
  // partials): fixed size, made with the context, so no layer allocates; users size their grids to fit it.
  float* reduction_workspace = nullptr;
  size_t reduction_workspace_bytes = 0;
};

Context& context();

// Threads per block and blocks for a grid-stride loop over n elements.
constexpr int kThreads = 256;
inline unsigned blocks_for(long long n, int threads = kThreads) {
  const long long b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535LL * 16 ? 65535LL * 16 : b));
}

}  // namespace q3vl::cuda
