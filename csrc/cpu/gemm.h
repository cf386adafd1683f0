// Row-major single-precision GEMM through the BLAS torch links (MKL on x86), shared by the attention and
// Winograd kernels. The Fortran sgemm_ is declared weak: a torch built without it gets the plain loop.
#pragma once

#include <stdint.h>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace ddpm_fast {
namespace cpu {

// Row-major C (m x n, ldc) = alpha * A (m x k, lda) * op(B) + beta * C, where op(B) = B^T for B (n x k, ldb)
// when b_transposed, else B (k x n, ldb). Row-major product = column-major product of the transposes.
inline void gemm_rm(bool b_transposed, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_) {
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(b_transposed ? "T" : "N", "N", &M, &N, &K, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int64_t p = 0; p < k; ++p) acc += a[i * lda + p] * (b_transposed ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * acc + (beta == 0.f ? 0.f : beta * c[i * ldc + j]);
    }
}

}  // namespace cpu
}  // namespace ddpm_fast
