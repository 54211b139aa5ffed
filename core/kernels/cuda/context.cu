// The CUDA backend's context: device, stream, cuBLASLt handle and workspace, reduction scratch, made once per process.
#include "core/kernels/cuda/context.h"

#include "core/kernels/cuda/cuda_check.h"

namespace q3vl::cuda {

namespace {
// cuBLASLt asks for at most 32 MiB of workspace on Hopper for its fastest kernels.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;
// Room for 1024 partial rows of 2048 f32 column sums (the norms' weight gradients).
constexpr size_t kReductionWorkspaceBytes = size_t{8} << 20;

Context make_context() {
  Context c;
  Q3VL_CUDA_CHECK(cudaGetDevice(&c.device));
  Q3VL_CUDA_CHECK(cudaDeviceGetAttribute(&c.multiprocessors, cudaDevAttrMultiProcessorCount, c.device));
  Q3VL_CUDA_CHECK(cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking));
  Q3VL_CUBLAS_CHECK(cublasLtCreate(&c.lt));
  c.workspace_bytes = kWorkspaceBytes;
  Q3VL_CUDA_CHECK(cudaMalloc(&c.workspace, c.workspace_bytes));
  c.reduction_workspace_bytes = kReductionWorkspaceBytes;
  Q3VL_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&c.reduction_workspace), c.reduction_workspace_bytes));
  return c;
}
}  // namespace

Context& context() {
  static Context c = make_context();
  return c;
}

}  // namespace q3vl::cuda
