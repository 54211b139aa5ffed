// core/device.h and cuda_layers() in a binary built without the CUDA backend (-DQ3VL_CUDA=OFF or no nvcc):
// nothing can be on a device, and asking for one says so.
#include "core/check.h"
#include "core/device.h"
#include "core/kernels/cuda_layers.h"

namespace q3vl {

namespace {
constexpr const char* kNoCuda = "this q3vl was built without the CUDA backend (configure with -DQ3VL_CUDA=ON)";
}

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_unavailable_reason() { return kNoCuda; }
void require_cuda(const std::string& what) { Q3VL_FAIL(what, ": ", kNoCuda); }
void* device_alloc(size_t, const std::string& what) { Q3VL_FAIL(what, ": ", kNoCuda); }
void device_free(void*) {}
void copy_bytes(void*, Device, const void*, Device, size_t) { Q3VL_FAIL("copy to or from device memory: ", kNoCuda); }
void device_zero(void*, size_t) { Q3VL_FAIL("zeroing device memory: ", kNoCuda); }
void device_synchronize() {}
const CudaLayers& cuda_layers() { Q3VL_FAIL(kNoCuda); }

}  // namespace q3vl
