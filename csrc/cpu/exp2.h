// exp2_in_range: the AVX2 (and AVX-512) 2^z shared by the CPU kernels (SiLU in group_norm.cpp, the softmax in
// attention.cpp) and benchmarks/tile_shapes.cpp, which times it after a score tile's products. Only <immintrin.h>: no torch.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace ddpm_fast {
namespace cpu {

// 2^z for z in [-126, 126] (the caller clamps; out of range the exponent bits wrap): 2^n 2^f with n = round(z),
// |f| <= 1/2, 2^f by a degree-5 polynomial (a weighted Chebyshev fit of 2^f on [-1/2, 1/2], relative error
// 2.2e-7 evaluated in fp32) and 2^n added into the exponent bits. Eleven vector operations, none of the range
// checks of at::vec's exp.
inline __m256 exp2_in_range(__m256 z) {
  const __m256 n = _mm256_round_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(z, n);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(0.00132669706f), f, _mm256_set1_ps(0.00967545994f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.0555074252f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.240221217f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.693146944f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.00000012f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

#if defined(__AVX512F__)
// The same 2^z on 16 lanes, with 2^n applied by scalef: exact like the exponent-bit add in range, one operation
// instead of three (on AVX-512 cores every vector operation takes a slot on the two FMA ports).
inline __m512 exp2_in_range(__m512 z) {
  const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(z, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00132669706f), f, _mm512_set1_ps(0.00967545994f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0555074252f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240221217f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693146944f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000012f));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace cpu
}  // namespace ddpm_fast
#endif
