// Building blocks of the CPU elementwise kernels: fp32 vectors loaded from fp32/fp16/bf16 memory,
// keyed Gaussian noise generated eight Philox counters at a time, and a threaded chunk loop that hands
// each chunk its noise in memory order (NCHW or NHWC) without it ever touching DRAM.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "../common/philox.h"
#include "exp2.h"
#include "kernels.h"

namespace ddpm_fast {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = 2 * Vec::size();  // elements per vector iteration: one 16-bit vector, two fp32

template <typename T>
inline void load2(const T* p, Vec& lo, Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = Vec::loadu(p);
    hi = Vec::loadu(p + Vec::size());
  } else {
    static_assert(at::vec::Vectorized<T>::size() == kLanes);
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2(T* p, const Vec& lo, const Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
    hi.store(p + Vec::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// Counters per block of keyed normals: eight, or one per lane of a wider vector (AVX-512: sixteen).
constexpr int kNormalCounters = Vec::size() > 8 ? Vec::size() : 8;

// Normals of counters c .. c+L-1 (elements 4c .. 4c+4L-1 of sample g at step t), L = kNormalCounters, in element
// order. Each counter's four normals depend on the counter alone, not on L.
inline void philox_normal_block(PhiloxKey key, uint32_t c, uint32_t g, uint32_t t, uint32_t stream, float* z) {
  constexpr int L = kNormalCounters;
  alignas(64) uint32_t w[4][L];
  for (int l = 0; l < L; ++l) {
    w[0][l] = c + l;
    w[1][l] = g;
    w[2][l] = t;
    w[3][l] = stream;
  }
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int l = 0; l < L; ++l) {  // vectorizes to vpmuludq on AVX2
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * w[0][l];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * w[2][l];
      const uint32_t c1 = w[1][l], c3 = w[3][l];
      w[0][l] = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      w[1][l] = static_cast<uint32_t>(p1);
      w[2][l] = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      w[3][l] = static_cast<uint32_t>(p0);
    }
  }
  alignas(64) float u[4][L];
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < L; ++l) u[j][l] = uint_to_unit_float(w[j][l]);
  alignas(64) float zz[4][L];
  static_assert(L % Vec::size() == 0);
  for (int l = 0; l < L; l += Vec::size()) {
    for (int pair = 0; pair < 2; ++pair) {
      const Vec r = (Vec(-2.0f) * Vec::loadu(&u[2 * pair][l]).log()).sqrt();
      const Vec theta = Vec(kTwoPi) * Vec::loadu(&u[2 * pair + 1][l]);
      (r * theta.cos()).store(&zz[2 * pair][l]);
      (r * theta.sin()).store(&zz[2 * pair + 1][l]);
    }
  }
  for (int l = 0; l < L; ++l)
    for (int j = 0; j < 4; ++j) z[4 * l + j] = zz[j][l];
}

// dst[k] = normal of logical element i0 + k of sample g at step t, for k < count.
inline void fill_normal(float* dst, PhiloxKey key, uint32_t g, uint32_t t, uint32_t stream, int64_t i0,
                        int64_t count) {
  const int64_t end = i0 + count;
  constexpr int64_t L = kNormalCounters;
  alignas(64) float block[4 * L];
  for (int64_t c = i0 / 4; 4 * c < end; c += L) {
    philox_normal_block(key, static_cast<uint32_t>(c), g, t, stream, block);
    const int64_t lo = std::max(i0, 4 * c), hi = std::min(end, 4 * c + 4 * L);
    std::copy(block + (lo - 4 * c), block + (hi - 4 * c), dst + (lo - i0));
  }
}

// While alive, denormal results are flushed to zero and denormal inputs read as zero on this thread (MXCSR FTZ and
// DAZ); the thread's previous mode comes back after. Peaked softmax weights (and their products with V) and SiLU's
// reciprocals of large denominators reach the denormals, and on x86 each denormal result costs a microcode assist
// (measured: attention 20-25x slower with its logits scaled by 30, until flushed). Values below 1.2e-38 become 0.
class FlushDenormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned saved_ = _mm_getcsr();

 public:
  FlushDenormals() { _mm_setcsr(saved_ | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved_); }
#endif
};

// at::parallel_for with the denormals flushed (FlushDenormals) in each thread while it runs its chunk.
template <class F>
void parallel_for_flushed(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    FlushDenormals flushed;
    f(b, e);
  });
}

constexpr int64_t kChunk = 4096;       // elements a chunk: its noise (16 KB) stays in L1/L2
constexpr int64_t kSerialBelow = 1 << 15;  // smaller tensors are not worth waking threads for

// Calls body(b, lo, hi, z) over chunks [lo, hi) of each sample b (offsets in memory order within the
// sample), in parallel. With a key, z holds the chunk's keyed normals in memory order; else nullptr.
template <class Body>
void for_each_chunk(const Geometry& geo, const NoiseKey* key, const int64_t* t, const Body& body) {
  const int64_t n = geo.numel_per_sample, C = geo.channels;
  // An NHWC chunk is whole pixels: its noise is C runs of consecutive logical indices.
  const int64_t step = geo.nhwc ? std::max<int64_t>(1, kChunk / C) * C : kChunk;
  const int64_t per_sample = (n + step - 1) / step;
  const int64_t items = geo.batch * per_sample;
  const int64_t grain = geo.batch * n < kSerialBelow ? items : std::max<int64_t>(1, kSerialBelow / step);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> z, logical;
    if (key) {
      z.resize(step);
      if (geo.nhwc) logical.resize(step);
    }
    const PhiloxKey pk = key ? philox_key(key->seed) : PhiloxKey{0, 0};
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / per_sample;
      const int64_t lo = (item % per_sample) * step, hi = std::min(lo + step, n);
      if (key) {
        const uint32_t g = static_cast<uint32_t>(key->sample_offset + b);
        const uint32_t tb = static_cast<uint32_t>(t[b]);
        if (!geo.nhwc) {
          fill_normal(z.data(), pk, g, tb, key->stream, lo, hi - lo);
        } else {
          const int64_t p0 = lo / C, np = (hi - lo) / C;
          for (int64_t c = 0; c < C; ++c)
            fill_normal(logical.data() + c * np, pk, g, tb, key->stream, c * geo.spatial + p0, np);
          for (int64_t p = 0; p < np; ++p)
            for (int64_t c = 0; c < C; ++c) z[p * C + c] = logical[c * np + p];
        }
      }
      body(b, lo, hi, key ? z.data() : nullptr);
    }
  });
}

}  // namespace cpu
}  // namespace ddpm_fast
