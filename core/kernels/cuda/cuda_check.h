// Error checks of the CUDA backend: every runtime and cuBLASLt call goes through Q3VL_CUDA_CHECK /
// Q3VL_CUBLAS_CHECK, and every kernel launch is followed by Q3VL_CUDA_LAUNCHED. A failure throws a
// q3vl::Error naming the call (or kernel), our file:line and CUDA's own message, so the run stops cleanly with
// the reason instead of computing on garbage.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "core/check.h"

#define Q3VL_CUDA_CHECK(call)                                                                          \
  do {                                                                                                 \
    const cudaError_t q3vl_err_ = (call);                                                              \
    if (q3vl_err_ != cudaSuccess) [[unlikely]]                                                         \
      ::q3vl::detail::throw_error(__FILE__, __LINE__, #call, "CUDA error in ", #call, ": ",            \
                                  cudaGetErrorName(q3vl_err_), " (", cudaGetErrorString(q3vl_err_), ")"); \
  } while (0)

#define Q3VL_CUBLAS_CHECK(call)                                                                        \
  do {                                                                                                 \
    const cublasStatus_t q3vl_st_ = (call);                                                            \
    if (q3vl_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                                \
      ::q3vl::detail::throw_error(__FILE__, __LINE__, #call, "cuBLASLt error in ", #call, ": ",        \
                                  cublasLtGetStatusName(q3vl_st_), " (", cublasLtGetStatusString(q3vl_st_), ")"); \
  } while (0)

// After a <<<...>>> launch: a bad configuration or an earlier asynchronous fault surfaces here, named.
#define Q3VL_CUDA_LAUNCHED(kernel)                                                                     \
  do {                                                                                                 \
    const cudaError_t q3vl_err_ = cudaGetLastError();                                                  \
    if (q3vl_err_ != cudaSuccess) [[unlikely]]                                                         \
      ::q3vl::detail::throw_error(__FILE__, __LINE__, kernel, "CUDA error after launching ", kernel,    \
                                  ": ", cudaGetErrorName(q3vl_err_), " (", cudaGetErrorString(q3vl_err_), ")"); \
  } while (0)
