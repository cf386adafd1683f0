// exp2_in_range: the AVX2 (and AVX-512) 2^z shared by the CPU kernels (SiLU in group_norm.cpp, the softmax in
// attention.cpp) and benchmarks/tile_shapes.cpp, which times it after a score tile's products. Only <immintrin.h>:
// no torch.
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

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// 2^z on 16 lanes as 2^f 2^floor(z): vreduceps gives f = z - floor(z) in [0, 1) in one operation (for +-inf: 0),
// 2^f is the polynomial c[0] f^N-1 + ... + c[N-1] (Horner), and vscalefps multiplies by 2^floor(z) (exactly; 0
// below the range, inf above, instead of wrapping). On AVX-512 cores every vector operation takes a slot on the
// two FMA ports, so the count matters. Callers clamp z from below above -126 so that results stay normal:
// vscalefps would return denormals, and each costs a microcode assist.
template <int N>
inline __m512 exp2_by_fit(__m512 z, const float (&c)[N]) {
  const __m512 f = _mm512_reduce_ps(z, _MM_FROUND_TO_NEG_INF);
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, z);
}

// The same 2^z as AVX2's in three operations fewer than a literal translation: a degree-5 fit on [0, 1), relative
// error 1.6e-7 evaluated in fp32.
inline __m512 exp2_in_range(__m512 z) {
  static constexpr float c[] = {0.00187757576f, 0.00898934249f, 0.0558263175f, 0.240153611f, 0.693153083f,
                                0.99999994f};
  return exp2_by_fit(z, c);
}

// A degree-4 fit on [0, 1): relative error 2.7e-6 in fp32, one FMA fewer. Enough for SiLU, y / (1 + 2^z): an
// error e in 2^z moves it by at most |y| s (1 - s) e <= 0.45 e (s = sigmoid(y)), 1.2e-6.
inline __m512 exp2_coarse(__m512 z) {
  static constexpr float c[] = {0.0135341650f, 0.0520114675f, 0.241442755f, 0.693003833f, 1.00000262f};
  return exp2_by_fit(z, c);
}
#endif

}  // namespace cpu
}  // namespace ddpm_fast
#endif
