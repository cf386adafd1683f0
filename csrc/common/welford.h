// Parallel variance (Welford 1962; Chan, Golub & LeVeque 1979): statistics of two disjoint parts merge exactly,
//   n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,  M2 = M2_a + M2_b + d^2 * na * nb / n.
// Kernels compute each small part's mean and M2 directly (two passes over data in cache) and merge the parts:
// no catastrophic cancellation of sum-of-squares, no division per element.
#pragma once

#include <stdint.h>

#include "macros.h"

namespace ddpm_fast {

struct WelfordState {
  float mean = 0.f;
  float m2 = 0.f;  // sum of squared deviations from mean
  int64_t n = 0;
};

HOST_DEVICE WelfordState welford_merge(const WelfordState& a, const WelfordState& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  WelfordState r;
  r.n = a.n + b.n;
  const float nb_over_n = static_cast<float>(b.n) / static_cast<float>(r.n);
  const float d = b.mean - a.mean;
  r.mean = a.mean + d * nb_over_n;
  r.m2 = a.m2 + b.m2 + d * d * static_cast<float>(a.n) * nb_over_n;
  return r;
}

// The same part with every value shifted by s (GroupNorm's per-channel add before the norm): M2 is unchanged.
HOST_DEVICE WelfordState welford_shift(WelfordState a, float s) {
  a.mean += s;
  return a;
}

}  // namespace ddpm_fast
