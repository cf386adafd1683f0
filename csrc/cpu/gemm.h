// Row-major single-precision GEMMs: through the BLAS torch links (MKL on x86), shared by the attention and
// Winograd kernels, and through oneDNN's brgemm micro-kernel for the Winograd products. The Fortran sgemm_ is
// declared weak: a torch built without it gets the plain loop.
#pragma once

#include <stdint.h>

#include <cstdlib>
#include <cstring>

#include <ATen/native/CPUBlas.h>

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

// Which library runs the Winograd products. oneDNN's brgemm JIT-compiles a micro-kernel per shape for the
// widest ISA it finds, on any vendor's CPU; MKL's sgemm takes its AVX2 path on AMD CPUs. On a 2-core AMD EPYC
// (Zen 5, AVX-512), one thread, at the Winograd shapes (64 tiles x 128..256 x 128..512): brgemm 230-240
// GFLOP/s (94-98% of the 512-bit FMA peak), MKL 94-101; with oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2)
// brgemm still ran 109-121 against MKL's 92-96. DDPM_FAST_GEMM=blas keeps the BLAS (checked in Python).
// Fixed per process, not timed at run time, so that a model's results do not depend on a measurement.
enum class GemmProvider { kOneDnn, kBlas };

inline GemmProvider gemm_provider() {
  static const GemmProvider p = [] {
    const char* env = std::getenv("DDPM_FAST_GEMM");
    return env != nullptr && std::strcmp(env, "blas") == 0 ? GemmProvider::kBlas : GemmProvider::kOneDnn;
  }();
  return p;
}

// Row-major C (m x n, ldc) = A (m x k, lda) @ B (k x n, ldb), fp32, by gemm_provider(). (torch's brgemm falls
// back to its BLAS itself where oneDNN's micro-kernels are not built, the CPU lacks AVX2 or
// torch.backends.mkldnn is disabled.)
inline void matmul_rm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc) {
  if (gemm_provider() == GemmProvider::kOneDnn)
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/false, a, b, c, /*is_vnni=*/false);
  else
    gemm_rm(false, m, n, k, 1.f, a, lda, b, ldb, 0.f, c, ldc);
}

}  // namespace cpu
}  // namespace ddpm_fast
