// Fused multistep solver step (DPM-Solver++ 1M/2M/3M and its SDE variant, Lu et al. 2022; UniPC's corrector and
// predictor, Zhao et al. 2023), data prediction, one pass over memory:
//   D0     = (px * x + pm * m) * q                                   (x_0 predicted from epsilon, x_0 or v)
//   y      = x, or with a corrector (UniPC's UniC, last sample L):
//            c_l L + c_1 D1 + c_d (D0 - D1) + c_e (D1 - D2) + c_f (D1 - D3)
//   x_next = a_x y + a_0 D0 + a_d (D0 - D1) + a_e ((D0 - D1) - rho (D1 - D2)) + a_z z
//                                                   (z given or keyed Philox noise, stream 0)
// D1, D2, D3: the data predictions of the previous steps, newest first. The differences (and 3M's second difference)
// are formed here, grouped as diffusers groups them: split into D0, D1, D2 terms, the coefficients grow large and
// opposite where a step ratio r is small (2M: a_d ~ 1 / r0) and their roundings stop cancelling. The (B, 14) fp32
// coefficient rows [px, pm, q, a_x, a_0, a_d, a_e, rho, a_z, c_l, c_1, c_d, c_e, c_f] come from the host, computed in
// float64
// (ddpm_fast/reference/dpmpp_step.py); D0 is written beside x_next for the next step, and y where corrected.
#include "elementwise.h"

namespace ddpm_fast {
namespace cpu {
namespace {

enum class ZSource { kNone, kKeyed, kGiven };

template <typename T>
struct Ptrs {
  const T *x, *m, *d1, *d2, *d3, *l, *zg;
  T *out, *d0o, *yo;
};

// NH: how many history tensors this sample reads (0-3); Corr: y is corrected (and written); Z: the noise term.
template <typename T, int NH, bool Corr, ZSource Z>
void multistep_chunk(const float* k, const Ptrs<T>& p, int64_t base, const float* zk, int64_t n) {
  static_assert(!Corr || NH >= 1, "the corrector reads D1");
  const Vec px(k[0]), pm(k[1]), q(k[2]), ax(k[3]), a0(k[4]), ad(k[5]), ae(k[6]), rho(k[7]), az(k[8]);
  const Vec cl(k[9]), c1(k[10]), cd(k[11]), ce(k[12]), cf(k[13]);
  const T *x = p.x + base, *m = p.m + base;
  const T* d1 = NH >= 1 ? p.d1 + base : nullptr;
  const T* d2 = NH >= 2 ? p.d2 + base : nullptr;
  const T* d3 = NH >= 3 ? p.d3 + base : nullptr;
  const T* l = Corr ? p.l + base : nullptr;
  const T* zg = Z == ZSource::kGiven ? p.zg + base : nullptr;
  T *out = p.out + base, *d0o = p.d0o + base, *yo = Corr ? p.yo + base : nullptr;
  // v[0] x, v[1] m, v[2..4] D1..D3, v[5] L, v[6] z
  auto compute = [&](const Vec* v, Vec& o, Vec& d0v, Vec& yv) {
    d0v = at::vec::fmadd(px, v[0], pm * v[1]) * q;
    Vec e01, e12, e13;
    if constexpr (NH >= 1) e01 = d0v - v[2];
    if constexpr (NH >= 2) e12 = v[2] - v[3];
    if constexpr (NH >= 3) e13 = v[2] - v[4];
    yv = v[0];
    if constexpr (Corr) {
      yv = at::vec::fmadd(cl, v[5], at::vec::fmadd(c1, v[2], cd * e01));
      if constexpr (NH >= 2) yv = at::vec::fmadd(ce, e12, yv);
      if constexpr (NH >= 3) yv = at::vec::fmadd(cf, e13, yv);
    }
    o = at::vec::fmadd(ax, yv, a0 * d0v);
    if constexpr (NH >= 1) o = at::vec::fmadd(ad, e01, o);
    if constexpr (NH >= 2) o = at::vec::fmadd(ae, at::vec::fnmadd(rho, e12, e01), o);
    if constexpr (Z != ZSource::kNone) o = at::vec::fmadd(az, v[6], o);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Vec lo[7], hi[7], o_lo, o_hi, d_lo, d_hi, y_lo, y_hi;
    load2(x + i, lo[0], hi[0]);
    load2(m + i, lo[1], hi[1]);
    if constexpr (NH >= 1) load2(d1 + i, lo[2], hi[2]);
    if constexpr (NH >= 2) load2(d2 + i, lo[3], hi[3]);
    if constexpr (NH >= 3) load2(d3 + i, lo[4], hi[4]);
    if constexpr (Corr) load2(l + i, lo[5], hi[5]);
    if constexpr (Z == ZSource::kKeyed) load2(zk + i, lo[6], hi[6]);
    if constexpr (Z == ZSource::kGiven) load2(zg + i, lo[6], hi[6]);
    compute(lo, o_lo, d_lo, y_lo);
    compute(hi, o_hi, d_hi, y_hi);
    store2(out + i, o_lo, o_hi);
    store2(d0o + i, d_lo, d_hi);
    if constexpr (Corr) store2(yo + i, y_lo, y_hi);
  }
  for (; i < n; ++i) {  // scalar tail, same maths
    const float xv = static_cast<float>(x[i]), mv = static_cast<float>(m[i]);
    const float d0v = (k[0] * xv + k[1] * mv) * k[2];
    float e01 = 0.0f, e12 = 0.0f, e13 = 0.0f, d1v = 0.0f;
    if constexpr (NH >= 1) d1v = static_cast<float>(d1[i]), e01 = d0v - d1v;
    if constexpr (NH >= 2) e12 = d1v - static_cast<float>(d2[i]);
    if constexpr (NH >= 3) e13 = d1v - static_cast<float>(d3[i]);
    float yv = xv;
    if constexpr (Corr) {
      yv = k[9] * static_cast<float>(l[i]) + (k[10] * d1v + k[11] * e01);
      if constexpr (NH >= 2) yv += k[12] * e12;
      if constexpr (NH >= 3) yv += k[13] * e13;
    }
    float o = k[3] * yv + k[4] * d0v;
    if constexpr (NH >= 1) o += k[5] * e01;
    if constexpr (NH >= 2) o += k[6] * (e01 - k[7] * e12);
    if constexpr (Z == ZSource::kKeyed) o += k[8] * zk[i];
    if constexpr (Z == ZSource::kGiven) o += k[8] * static_cast<float>(zg[i]);
    out[i] = static_cast<T>(o);
    d0o[i] = static_cast<T>(d0v);
    if constexpr (Corr) yo[i] = static_cast<T>(yv);
  }
}

// The history a row reads: the deepest D_j that a non-zero coefficient multiplies.
int history_needed(const float* k, bool corr) {
  if (corr && k[13] != 0.0f) return 3;
  if (k[6] != 0.0f || (corr && k[12] != 0.0f)) return 2;
  if (k[5] != 0.0f || corr) return 1;
  return 0;
}

template <typename T, int NH, bool Corr>
void run_z(ZSource z, const float* k, const Ptrs<T>& p, int64_t base, const float* zk, int64_t n) {
  if constexpr (Corr) {
    multistep_chunk<T, NH, true, ZSource::kNone>(k, p, base, zk, n);
  } else {
    if (z == ZSource::kKeyed) return multistep_chunk<T, NH, false, ZSource::kKeyed>(k, p, base, zk, n);
    if (z == ZSource::kGiven) return multistep_chunk<T, NH, false, ZSource::kGiven>(k, p, base, zk, n);
    multistep_chunk<T, NH, false, ZSource::kNone>(k, p, base, zk, n);
  }
}

template <typename T>
void dpmpp_typed(const DpmppArgs& a) {
  const int64_t n = a.geo.numel_per_sample;
  Ptrs<T> p;
  p.x = static_cast<const T*>(a.x);
  p.m = static_cast<const T*>(a.model_output);
  p.d1 = static_cast<const T*>(a.x0_last);
  p.d2 = static_cast<const T*>(a.x0_last2);
  p.d3 = static_cast<const T*>(a.x0_last3);
  p.l = static_cast<const T*>(a.last_sample);
  p.zg = static_cast<const T*>(a.noise);
  p.out = static_cast<T*>(a.out);
  p.d0o = static_cast<T*>(a.x0_out);
  p.yo = static_cast<T*>(a.sample_out);
  const bool corr = p.yo != nullptr;
  const int have = p.d3 ? 3 : p.d2 ? 2 : p.d1 ? 1 : 0;
  bool keyed = false;
  if (p.zg == nullptr && a.t != nullptr && !corr)
    for (int64_t b = 0; b < a.geo.batch; ++b) keyed |= a.coeffs[kDpmppColumns * b + 8] != 0.0f;
  for_each_chunk(a.geo, keyed ? &a.key : nullptr, a.t, [&](int64_t b, int64_t lo, int64_t hi, const float* zk) {
    const int64_t base = b * n + lo;
    const float* k = a.coeffs + kDpmppColumns * b;
    const ZSource z = k[8] == 0.0f ? ZSource::kNone : p.zg ? ZSource::kGiven : zk ? ZSource::kKeyed : ZSource::kNone;
    const int nh = std::min(history_needed(k, corr), have);  // the binding checks that a needed one is there
    if (corr) {
      if (nh == 3) return run_z<T, 3, true>(z, k, p, base, zk, hi - lo);
      if (nh == 2) return run_z<T, 2, true>(z, k, p, base, zk, hi - lo);
      return run_z<T, 1, true>(z, k, p, base, zk, hi - lo);
    }
    if (nh == 3) return run_z<T, 3, false>(z, k, p, base, zk, hi - lo);
    if (nh == 2) return run_z<T, 2, false>(z, k, p, base, zk, hi - lo);
    if (nh == 1) return run_z<T, 1, false>(z, k, p, base, zk, hi - lo);
    run_z<T, 0, false>(z, k, p, base, zk, hi - lo);
  });
}

}  // namespace

int dpmpp_history_needed(const float* row, bool corrected) { return history_needed(row, corrected); }

void dpmpp_step(const DpmppArgs& a) {
  switch (a.dtype) {
    case DType::kFloat: return dpmpp_typed<float>(a);
    case DType::kHalf: return dpmpp_typed<at::Half>(a);
    case DType::kBFloat16: return dpmpp_typed<at::BFloat16>(a);
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
