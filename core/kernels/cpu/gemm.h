// The one GEMM every CPU layer calls (Eigen underneath, multithreaded through OpenMP unless called from
// inside a parallel region). Row-major: C[m,n] = alpha * op(A) * op(B) + beta * C, where op(A) is [m,k]
// and lda/ldb/ldc are row strides. The CUDA backend later provides the same signature over cuBLASLt.
#pragma once

#include <cstdint>

namespace q3vl::cpu {

template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

}  // namespace q3vl::cpu
