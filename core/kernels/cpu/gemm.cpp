// Eigen-backed row-major GEMM for f32 and f64.
#include "core/kernels/cpu/gemm.h"

#include <Eigen/Core>

namespace q3vl::cpu {

template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<Mat, 0, Stride> C(c, m, n, Stride(ldc));
  if (beta == T(0)) {
    C.setZero();  // beta = 0 must not propagate NaN/Inf from uninitialised C
  } else if (beta != T(1)) {
    C *= beta;
  }
  if (m == 0 || n == 0 || k == 0) return;
  const int64_t ar = trans_a ? k : m, ac = trans_a ? m : k;
  const int64_t br = trans_b ? n : k, bc = trans_b ? k : n;
  Eigen::Map<const Mat, 0, Stride> A(a, ar, ac, Stride(lda));
  Eigen::Map<const Mat, 0, Stride> B(b, br, bc, Stride(ldb));
  if (!trans_a && !trans_b) C.noalias() += alpha * A * B;
  else if (!trans_a && trans_b) C.noalias() += alpha * A * B.transpose();
  else if (trans_a && !trans_b) C.noalias() += alpha * A.transpose() * B;
  else C.noalias() += alpha * A.transpose() * B.transpose();
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                          int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t);

}  // namespace q3vl::cpu
