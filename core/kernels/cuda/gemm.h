// The one GEMM of the CUDA backend (cuBLASLt underneath), with the row-major contract of cpu::gemm so layers
// read the same on both devices: C[m,n] = alpha * op(A)[m,k] op(B)[k,n] + beta * C, lda/ldb/ldc row strides in
// elements. A and B are f32 (computed in fp32, TF32 off: the checking mode) or bf16 (fp32 accumulation); C is
// f32 or bf16 (bf16 inputs may write or accumulate into an f32 C, e.g. parameter gradients). Optional: a
// strided batch, and a bias over the n columns (C's dtype) added in the epilogue. The algorithm is chosen by
// cuBLASLt's heuristic once per shape, dtypes and pointer alignment, then reused (the step loop allocates
// nothing and asks nothing). Work is queued on the backend's stream.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace q3vl::cuda {

struct GemmBatch {
  int64_t count = 1;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;  // elements between consecutive matrices
};

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const void* a, int64_t lda,
          const void* b, int64_t ldb, float beta, void* c, int64_t ldc, DType ab_dtype, DType c_dtype,
          const void* bias = nullptr, const GemmBatch& batch = {});

}  // namespace q3vl::cuda
