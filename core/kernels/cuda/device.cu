// core/device.h over the CUDA runtime: device discovery, one cudaMalloc per arena, copies on the backend's
// stream.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "core/device.h"
#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"

namespace q3vl {

bool cuda_built() { return true; }

namespace {
// Device count and the reason for none, asked once (cudaGetDeviceCount initialises the driver).
struct Probe {
  int count = 0;
  std::string reason;
};
const Probe& probe() {
  static const Probe p = [] {
    Probe r;
    const cudaError_t e = cudaGetDeviceCount(&r.count);
    if (e != cudaSuccess) {
      r.count = 0;
      r.reason = std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
      cudaGetLastError();  // clear the sticky error so later checks do not report it again
    } else if (r.count == 0) {
      r.reason = "the driver reports no CUDA device";
    }
    return r;
  }();
  return p;
}
}  // namespace

int cuda_device_count() { return probe().count; }
std::string cuda_unavailable_reason() { return probe().reason; }

void require_cuda(const std::string& what) {
  Q3VL_CHECK(cuda_device_count() > 0, what, ": no usable CUDA device: ", cuda_unavailable_reason());
}

void* device_alloc(size_t bytes, const std::string& what) {
  require_cuda(what);
  cuda::context();
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    Q3VL_FAIL(what, ": cannot allocate ", bytes, " bytes of device memory (", free_bytes, " of ", total_bytes,
              " bytes free): ", cudaGetErrorString(e));
  }
  return p;
}

void device_free(void* p) {
  if (p) cudaFree(p);  // never throws: called from destructors
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) {
  if (bytes == 0) return;
  if (dst_device == Device::cpu && src_device == Device::cpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
  const cudaMemcpyKind kind = dst_device == Device::cuda
                                  ? (src_device == Device::cuda ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                                  : cudaMemcpyDeviceToHost;
  cudaStream_t s = cuda::context().stream;
  Q3VL_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, s));
  Q3VL_CUDA_CHECK(cudaStreamSynchronize(s));
}

void device_zero(void* p, size_t bytes) {
  if (bytes > 0) Q3VL_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cuda::context().stream));
}

void device_synchronize() {
  if (cuda_device_count() == 0) return;
  Q3VL_CUDA_CHECK(cudaStreamSynchronize(cuda::context().stream));
}

}  // namespace q3vl
