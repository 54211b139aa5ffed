// cuBLASLt GEMM with the row-major contract of cpu::gemm and a per-shape cache of descriptors and algorithm.
#include "core/kernels/cuda/gemm.h"

#include <cublasLt.h>

#include <cstring>
#include <functional>
#include <unordered_map>

#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"

namespace q3vl::cuda {

namespace {

cudaDataType_t cuda_type(DType dt) {
  switch (dt) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    default: Q3VL_FAIL("gemm: unsupported dtype ", dtype_name(dt), " (expected f32 or bf16)");
  }
}

// Largest power of two (up to 256) dividing the address: cuBLASLt's heuristic assumes 256-byte alignment
// unless told otherwise, and a kernel chosen for more alignment than a view has faults.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al /= 2;
  return al;
}

struct Key {
  bool ta, tb, bias;
  int64_t m, n, k, lda, ldb, ldc, count, sa, sb, sc;
  DType ab, c;
  uint32_t align_a, align_b, align_c;
  bool operator==(const Key& o) const { return std::memcmp(this, &o, sizeof(Key)) == 0; }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    const auto* p = reinterpret_cast<const unsigned char*>(&k);
    size_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(Key); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }
};

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t x = nullptr, y = nullptr, d = nullptr;  // column-major operands: D = X * Y
  cublasLtMatmulAlgo_t algo{};
};

cublasLtMatrixLayout_t make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld, int64_t count,
                                   int64_t stride) {
  cublasLtMatrixLayout_t l = nullptr;
  Q3VL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, rows, cols, ld));
  if (count > 1) {
    int32_t c = static_cast<int32_t>(count);
    Q3VL_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &c, sizeof(c)));
    Q3VL_CUBLAS_CHECK(
        cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
  }
  return l;
}

// Row-major C[m,n] = op(A) op(B) is column-major C^T[n,m] = op(B)^T op(A)^T: X is B's buffer, Y is A's.
Plan make_plan(const Key& key, const void* bias) {
  Context& ctx = context();
  Plan p;
  const cudaDataType_t ab = cuda_type(key.ab), ct = cuda_type(key.c);
  Q3VL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t opx = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opy = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  Q3VL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opx, sizeof(opx)));
  Q3VL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opy, sizeof(opy)));
  if (key.bias) {
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    Q3VL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
    Q3VL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &ct, sizeof(ct)));
    Q3VL_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  p.x = key.tb ? make_layout(ab, key.k, key.n, key.ldb, key.count, key.sb)
               : make_layout(ab, key.n, key.k, key.ldb, key.count, key.sb);
  p.y = key.ta ? make_layout(ab, key.m, key.k, key.lda, key.count, key.sa)
               : make_layout(ab, key.k, key.m, key.lda, key.count, key.sa);
  p.d = make_layout(ct, key.n, key.m, key.ldc, key.count, key.sc);

  cublasLtMatmulPreference_t pref = nullptr;
  Q3VL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  Q3VL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &ctx.workspace_bytes, sizeof(ctx.workspace_bytes)));
  const uint32_t ax = key.align_b, ay = key.align_a, ad = key.align_c;
  Q3VL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &ax, sizeof(ax)));
  Q3VL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ay, sizeof(ay)));
  Q3VL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ad, sizeof(ad)));
  Q3VL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad, sizeof(ad)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  Q3VL_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(ctx.lt, p.op, p.x, p.y, p.d, p.d, pref, 1, &result, &found));
  cublasLtMatmulPreferenceDestroy(pref);
  Q3VL_CHECK(found > 0, "gemm: cuBLASLt has no algorithm for m=", key.m, " n=", key.n, " k=", key.k, " (",
             dtype_name(key.ab), " -> ", dtype_name(key.c), ")");
  p.algo = result.algo;
  return p;
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const void* a, int64_t lda,
          const void* b, int64_t ldb, float beta, void* c, int64_t ldc, DType ab_dtype, DType c_dtype,
          const void* bias, const GemmBatch& batch) {
  Q3VL_CHECK(m >= 0 && n >= 0 && k >= 0, "gemm: negative size m=", m, " n=", n, " k=", k);
  Q3VL_CHECK(ab_dtype == c_dtype || (ab_dtype == DType::bf16 && c_dtype == DType::f32), "gemm: ",
             dtype_name(ab_dtype), " operands into a ", dtype_name(c_dtype), " result are not supported");
  if (m == 0 || n == 0 || batch.count == 0) return;
  Context& ctx = context();
  if (k == 0) {
    Q3VL_CHECK(beta == 0.0f || beta == 1.0f, "gemm: k = 0 needs beta 0 or 1");
    // op(A) op(B) is empty: C = beta * C (+ bias is not asked for with k = 0 by any layer).
    Q3VL_CHECK(bias == nullptr, "gemm: bias with k = 0");
    if (beta == 0.0f) {
      Q3VL_CHECK(ldc == n && batch.count == 1, "gemm: k = 0 into a strided C");
      Q3VL_CUDA_CHECK(cudaMemsetAsync(c, 0, static_cast<size_t>(m * n) * dtype_size(c_dtype), ctx.stream));
    }
    return;
  }
  Key key{};  // zero-filled so padding bytes compare and hash equal
  key.ta = trans_a;
  key.tb = trans_b;
  key.bias = bias != nullptr;
  key.m = m, key.n = n, key.k = k, key.lda = lda, key.ldb = ldb, key.ldc = ldc;
  key.count = batch.count, key.sa = batch.stride_a, key.sb = batch.stride_b, key.sc = batch.stride_c;
  key.ab = ab_dtype, key.c = c_dtype;
  key.align_a = alignment(a), key.align_b = alignment(b), key.align_c = alignment(c);
  static std::unordered_map<Key, Plan, KeyHash> plans;
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, make_plan(key, bias)).first;
  Plan& p = it->second;
  if (bias)
    Q3VL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  Q3VL_CUBLAS_CHECK(cublasLtMatmul(ctx.lt, p.op, &alpha, b, p.x, a, p.y, &beta, c, p.d, c, p.d, &p.algo,
                                   ctx.workspace, ctx.workspace_bytes, ctx.stream));
}

}  // namespace q3vl::cuda
