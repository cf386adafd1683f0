// Fused forward noising q(x_t | x_0) (Ho et al. 2020, eq. 4), one pass over memory:
//   x_t = sqrt(abar_{t_b}) * x_0 + sqrt(1 - abar_{t_b}) * eps
// with the schedule gathered at each sample's own t_b, and eps given or drawn in the kernel from the
// keyed Philox stream (then also written out, as training needs it for the loss).
#include <vector>

#include "../common/coefficients.h"
#include "elementwise.h"

namespace ddpm_fast {
namespace cpu {
namespace {

template <typename T, bool Generate>
void q_sample_typed(const QSampleArgs& a) {
  const int64_t n = a.geo.numel_per_sample;
  std::vector<QSampleCoeffs> coeffs(a.geo.batch);
  for (int64_t b = 0; b < a.geo.batch; ++b)
    coeffs[b] = q_sample_coeffs_for(a.t[b], a.abar, a.coeffs ? a.coeffs + 2 * b : nullptr);
  const T* x0 = static_cast<const T*>(a.x0);
  T* noise = static_cast<T*>(a.noise);
  T* out = static_cast<T*>(a.out);
  for_each_chunk(a.geo, Generate ? &a.key : nullptr, a.t, [&](int64_t b, int64_t lo, int64_t hi, const float* zk) {
    const int64_t base = b * n + lo, len = hi - lo;
    const Vec ca(coeffs[b].a), cb(coeffs[b].b);
    const T* xp = x0 + base;
    T* ep = noise + base;
    T* op = out + base;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      Vec x_lo, x_hi, e_lo, e_hi;
      load2(xp + i, x_lo, x_hi);
      if constexpr (Generate) {
        load2(zk + i, e_lo, e_hi);
        if constexpr (!std::is_same_v<T, float>) {  // eps as stored, so x_t and the returned eps agree
          store2(ep + i, e_lo, e_hi);
          load2(ep + i, e_lo, e_hi);
        } else {
          store2(ep + i, e_lo, e_hi);
        }
      } else {
        load2(ep + i, e_lo, e_hi);
      }
      store2(op + i, at::vec::fmadd(ca, x_lo, cb * e_lo), at::vec::fmadd(ca, x_hi, cb * e_hi));
    }
    for (; i < len; ++i) {
      if constexpr (Generate) ep[i] = static_cast<T>(zk[i]);
      op[i] = static_cast<T>(coeffs[b].a * static_cast<float>(xp[i]) + coeffs[b].b * static_cast<float>(ep[i]));
    }
  });
}

template <typename T>
void q_sample_dispatch(const QSampleArgs& a) {
  if (a.generate_noise)
    q_sample_typed<T, true>(a);
  else
    q_sample_typed<T, false>(a);
}

}  // namespace

void q_sample(const QSampleArgs& a) {
  switch (a.dtype) {
    case DType::kFloat: return q_sample_dispatch<float>(a);
    case DType::kHalf: return q_sample_dispatch<at::Half>(a);
    case DType::kBFloat16: return q_sample_dispatch<at::BFloat16>(a);
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
