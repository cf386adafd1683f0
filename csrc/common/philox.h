// Counter-based Gaussian noise: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC'11) followed by Box-Muller. The one C++ home of the construction in DESIGN.md; the
// spec is ddpm_fast/reference/noise.py and kernels/philox.py computes the same function in Triton.
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (i / 4, g, t, stream)      i: flat logical (NCHW) index within a sample, g: global sample index
//   u_j     = ((w_j >> 8) + 0.5) * 2^-24 in (0, 1), exact in fp32
//   (z0, z1) = sqrt(-2 ln u0) (cos, sin)(2 pi u1), (z2, z3) likewise; element i takes z[i % 4].
#pragma once

#include <stdint.h>

#include "macros.h"

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace ddpm_fast {

enum NoiseStream : uint32_t { kStreamStep = 0, kStreamQSample = 1, kStreamXT = 2 };

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr float kTwoPi = 6.28318530717958647692f;

struct PhiloxKey {
  uint32_t k0, k1;
};

HOST_DEVICE PhiloxKey philox_key(uint64_t seed) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

HOST_DEVICE void philox_round(uint32_t c[4], uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c[0];
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c[2];
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  const uint32_t c1 = c[1], c3 = c[3];
  c[0] = hi1 ^ c1 ^ k0;
  c[1] = lo1;
  c[2] = hi0 ^ c3 ^ k1;
  c[3] = lo0;
}

// Philox4x32 with 10 rounds, in place on the counter.
HOST_DEVICE void philox4x32_10(uint32_t c[4], PhiloxKey key) {
  uint32_t k0 = key.k0, k1 = key.k1;
  DDPM_UNROLL
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    philox_round(c, k0, k1);
  }
}

// Uniform in (0, 1) from the top 24 bits: never 0 or 1, exact in fp32.
HOST_DEVICE float uint_to_unit_float(uint32_t w) {
  return (static_cast<float>(w >> 8) + 0.5f) * 5.9604644775390625e-8f;  // 2^-24
}

// Box-Muller on one pair of uniforms.
HOST_DEVICE void box_muller(float u0, float u1, float* z0, float* z1) {
  const float r = sqrtf(-2.0f * logf(u0));
  const float theta = kTwoPi * u1;
  *z0 = r * cosf(theta);
  *z1 = r * sinf(theta);
}

// The four normals of counter (i4, g, t, stream): elements 4*i4 .. 4*i4 + 3 of sample g at step t.
HOST_DEVICE void philox_normal4(PhiloxKey key, uint32_t i4, uint32_t g, uint32_t t, uint32_t stream, float z[4]) {
  uint32_t c[4] = {i4, g, t, stream};
  philox4x32_10(c, key);
  box_muller(uint_to_unit_float(c[0]), uint_to_unit_float(c[1]), &z[0], &z[1]);
  box_muller(uint_to_unit_float(c[2]), uint_to_unit_float(c[3]), &z[2], &z[3]);
}

}  // namespace ddpm_fast
