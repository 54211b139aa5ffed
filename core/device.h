// The device side of memory, as core sees it: whether a CUDA device can be used, device allocations (one per
// arena) and copies between host and device memory. Implemented by the CUDA backend
// (core/kernels/cuda/device.cu) or, in a build without it, by core/kernels/no_cuda.cpp, which reports that the
// binary has no CUDA backend. Nothing here includes CUDA headers, so every part of core can use it.
#pragma once

#include <cstddef>
#include <string>

#include "core/dtype.h"

namespace q3vl {

// True when this binary has the CUDA backend.
bool cuda_built();
// Number of usable CUDA devices (0 without the backend or without a device/driver).
int cuda_device_count();
// Why cuda_device_count() is 0, for messages ("no CUDA device: ..."); empty when a device is usable.
std::string cuda_unavailable_reason();
// Throws a q3vl::Error naming `what` unless a CUDA device is usable (e.g. `--device cuda` without a GPU).
void require_cuda(const std::string& what);

// Device memory of `bytes` bytes for `what` (an arena's name, for the error when it does not fit: asked and
// free bytes are named).
void* device_alloc(size_t bytes, const std::string& what);
void device_free(void* p);

// Copies `bytes` bytes between any two of host and device memory; ordered after all work queued on the
// backend's stream, and complete when it returns.
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes);

// Sets `bytes` bytes of device memory to zero (queued on the backend's stream).
void device_zero(void* p, size_t bytes);

// Waits for all work queued on the backend's stream (errors of earlier kernels surface here).
void device_synchronize();

}  // namespace q3vl
