// Fused DDPM reverse step (Ho et al. 2020, Algorithm 2; eq. 7 and 15), one pass over memory:
//   x_0     = (px * x_t + pm * m) * q,  clamped to [-r, r] when clipping      (m: epsilon, x_0 or v)
//   x_{t-1} = c0 * x_0 + c1 * x_t + cm * m + sigma * z                   (z given or keyed Philox noise)
// Without clipping the two lines fold into x_{t-1} = kx * x_t + km * m + sigma * z, with kx and km
// computed in double (csrc/common/coefficients.h): one rounding less and no cancellation at large t.
#include <vector>

#include "../common/coefficients.h"
#include "elementwise.h"

namespace ddpm_fast {
namespace cpu {
namespace {

enum class ZSource { kNone, kKeyed, kGiven };

template <typename T, ZSource Z, bool Clip, bool WriteX0>
void step_chunk(const StepCoeffs& k, float r, const T* x, const T* m, const float* zk, const T* zg, T* out, T* x0o,
                int64_t n) {
  const Vec px(k.px), pm(k.pm), q(k.q), c0(k.c0), c1(k.c1), cm(k.cm), kx(k.kx), km(k.km), sigma(k.sigma);
  const Vec lo_r(-r), hi_r(r);
  auto compute = [&](const Vec& xv, const Vec& mv, const Vec& zv, Vec& o, Vec& x0v) {
    if constexpr (Clip || WriteX0) x0v = at::vec::fmadd(px, xv, pm * mv) * q;
    if constexpr (Clip) {
      x0v = at::vec::clamp(x0v, lo_r, hi_r);
      o = at::vec::fmadd(c0, x0v, at::vec::fmadd(c1, xv, cm * mv));
    } else {
      o = at::vec::fmadd(kx, xv, km * mv);
    }
    if constexpr (Z != ZSource::kNone) o = at::vec::fmadd(sigma, zv, o);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Vec x_lo, x_hi, m_lo, m_hi, z_lo, z_hi, o_lo, o_hi, p_lo, p_hi;
    load2(x + i, x_lo, x_hi);
    load2(m + i, m_lo, m_hi);
    if constexpr (Z == ZSource::kKeyed) load2(zk + i, z_lo, z_hi);
    if constexpr (Z == ZSource::kGiven) load2(zg + i, z_lo, z_hi);
    compute(x_lo, m_lo, z_lo, o_lo, p_lo);
    compute(x_hi, m_hi, z_hi, o_hi, p_hi);
    store2(out + i, o_lo, o_hi);
    if constexpr (WriteX0) store2(x0o + i, p_lo, p_hi);
  }
  for (; i < n; ++i) {  // scalar tail, same maths
    const float xv = static_cast<float>(x[i]), mv = static_cast<float>(m[i]);
    float x0v = (k.px * xv + k.pm * mv) * k.q, o;
    if constexpr (Clip) {
      x0v = std::min(std::max(x0v, -r), r);
      o = k.c0 * x0v + k.c1 * xv + k.cm * mv;
    } else {
      o = k.kx * xv + k.km * mv;
    }
    if constexpr (Z == ZSource::kKeyed) o += k.sigma * zk[i];
    if constexpr (Z == ZSource::kGiven) o += k.sigma * static_cast<float>(zg[i]);
    out[i] = static_cast<T>(o);
    if constexpr (WriteX0) x0o[i] = static_cast<T>(x0v);
  }
}

template <typename T, ZSource Z, bool Clip, bool WriteX0>
void step_typed(const StepArgs& a, const std::vector<StepCoeffs>& coeffs, bool any_noise) {
  const int64_t n = a.geo.numel_per_sample;
  const T* x = static_cast<const T*>(a.x);
  const T* m = static_cast<const T*>(a.model_output);
  const T* zg = static_cast<const T*>(a.noise);
  T* out = static_cast<T*>(a.out);
  T* x0o = static_cast<T*>(a.x0_out);
  const NoiseKey* key = (Z == ZSource::kKeyed && any_noise) ? &a.key : nullptr;
  for_each_chunk(a.geo, key, a.t, [&](int64_t b, int64_t lo, int64_t hi, const float* zk) {
    const int64_t base = b * n + lo;
    const StepCoeffs& k = coeffs[b];
    auto run = [&](auto z_tag) {
      constexpr ZSource ZZ = decltype(z_tag)::value;
      step_chunk<T, ZZ, Clip, WriteX0>(k, a.clip_range, x + base, m + base, zk, zg ? zg + base : nullptr, out + base,
                                       x0o ? x0o + base : nullptr, hi - lo);
    };
    if (k.sigma == 0.0f || (Z == ZSource::kKeyed && zk == nullptr))
      run(std::integral_constant<ZSource, ZSource::kNone>{});
    else
      run(std::integral_constant<ZSource, Z>{});
  });
}

template <typename T>
void step_dispatch(const StepArgs& a, const std::vector<StepCoeffs>& coeffs, bool any_noise) {
  const ZSource z = a.noise ? ZSource::kGiven : ZSource::kKeyed;
  const bool x0 = a.x0_out != nullptr;
#define DDPM_STEP_CASE(ZV, CLIP, X0) \
  if (z == ZV && a.clip == CLIP && x0 == X0) return step_typed<T, ZV, CLIP, X0>(a, coeffs, any_noise);
  DDPM_STEP_CASE(ZSource::kGiven, false, false)
  DDPM_STEP_CASE(ZSource::kGiven, false, true)
  DDPM_STEP_CASE(ZSource::kGiven, true, false)
  DDPM_STEP_CASE(ZSource::kGiven, true, true)
  DDPM_STEP_CASE(ZSource::kKeyed, false, false)
  DDPM_STEP_CASE(ZSource::kKeyed, false, true)
  DDPM_STEP_CASE(ZSource::kKeyed, true, false)
  DDPM_STEP_CASE(ZSource::kKeyed, true, true)
#undef DDPM_STEP_CASE
}

}  // namespace

void ddpm_step(const StepArgs& a) {
  std::vector<StepCoeffs> coeffs(a.geo.batch);
  bool any_noise = false;
  for (int64_t b = 0; b < a.geo.batch; ++b) {
    const int64_t t = a.t[b];
    coeffs[b] = step_coeffs_for(t, a.t_prev ? a.t_prev[b] : t - 1, a.abar, a.coeffs ? a.coeffs + 7 * b : nullptr,
                                a.prediction_type, a.variance_type);
    any_noise |= coeffs[b].sigma != 0.0f;
  }
  switch (a.dtype) {
    case DType::kFloat: return step_dispatch<float>(a, coeffs, any_noise);
    case DType::kHalf: return step_dispatch<at::Half>(a, coeffs, any_noise);
    case DType::kBFloat16: return step_dispatch<at::BFloat16>(a, coeffs, any_noise);
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
