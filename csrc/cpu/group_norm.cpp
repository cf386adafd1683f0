// Fused GroupNorm (Wu & He 2018) + optional SiLU, with the ResBlock's per-(batch, channel) add folded in:
//   h = x + add[b, c];  y = (h - mean_bg) / sqrt(var_bg + eps) * w_c + b_c;  out = silu(y) = y * sigmoid(y)
// Statistics in fp32 by parallel Welford merges (csrc/common/welford.h). The add only shifts a channel's mean,
// so it never touches the data: out = x * scale[b, c] + shift[b, c] with
//   scale = rstd_bg * w_c,  shift = (add[b, c] - mean_bg) * scale + b_c.
// NCHW: one task per (sample, group), whose data is contiguous; its output pass re-reads it from cache.
// NHWC: per-channel partial statistics over pixel chunks, merged per (sample, group); then one output pass.
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cmath>
#include <vector>

#include "../common/welford.h"
#include "elementwise.h"

namespace ddpm_fast {
namespace cpu {
namespace {

constexpr int64_t kStatChunk = 2048;

// The shift of shifted sums: the mean of the first kShiftSamples elements. Sums of (x - k) and (x - k)^2 lose
// about log10((k - mean)^2 / var) digits to cancellation; a single element as k lets an outlier there cost
// several (first element at 60 std: 3.5e-4 and 2e-3 off float64, against torch's 2e-6); the mean of 16 or 32
// divides its distance by as much.
constexpr int64_t kShiftSamples = kLanes;  // 32 (AVX-512) or 16: one load2

template <typename T>
float shift_estimate(const T* q, int64_t len) {
  if (len >= kShiftSamples) {
    Vec a, b;
    load2(q, a, b);
    return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a + b) / kShiftSamples;
  }
  float s = 0.f;
  for (int64_t i = 0; i < len; ++i) s += static_cast<float>(q[i]);
  return s / static_cast<float>(len);
}

// Mean and M2 of p[0..n) by shifted sums in one pass per chunk (shift_estimate, so a large mean does not
// cancel), merged across chunks. One pass instead of a sum and then a centred pass: at small groups
// (6x96x15x15, 675 elements a group) the loops' and reductions' fixed costs are a good part of the time.
template <typename T>
WelfordState run_stats(const T* p, int64_t n) {
  WelfordState total;
  for (int64_t lo = 0; lo < n; lo += kStatChunk) {
    const int64_t len = std::min(kStatChunk, n - lo);
    const T* q = p + lo;
    const float k = shift_estimate(q, len);
    const Vec vk(k);
    Vec s0(0.f), s1(0.f), q0(0.f), q1(0.f);
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      Vec a, b;
      load2(q + i, a, b);
      a = a - vk;
      b = b - vk;
      s0 = s0 + a;
      s1 = s1 + b;
      q0 = at::vec::fmadd(a, a, q0);
      q1 = at::vec::fmadd(b, b, q1);
    }
    float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s0 + s1);
    float sq = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, q0 + q1);
    for (; i < len; ++i) {
      const float d = static_cast<float>(q[i]) - k;
      sum += d;
      sq += d * d;
    }
    const float inv = 1.f / static_cast<float>(len);
    total = welford_merge(total, WelfordState{k + sum * inv, std::max(sq - sum * sum * inv, 0.f), len});
  }
  return total;
}

// y * sigmoid(y) = y / (1 + exp(-y)). On AVX2, exp(-y) = 2^z with z = -y log2(e) clamped to [-126, 126]
// (exp2_in_range); the division is a reciprocal estimate refined by one Newton step. About 18 vector operations,
// against about 26 with at::vec's exp_u20 and its range checks (the clamp makes them unnecessary). Past the clamp
// from above (y below -87 on AVX2, -69 on AVX-512) SiLU is below 1e-28 in magnitude, but y times the clamped
// reciprocal is not: y 2^-100 is -0.79 at y = -1e30. There the reciprocal is set to 0, so the result is -0 as
// torch's (and NaN for y = -inf, as torch's -inf / inf). NaN propagates through the final y * r.
inline Vec silu(const Vec& y) {
#if defined(CPU_CAPABILITY_AVX512)
  // z within +-100 keeps 2^z, d and its reciprocal normal: vrcp14ps and vscalefps, unlike AVX2's rcpps, produce
  // denormals, and each costs a microcode assist (measured: 10x slower on weights of 300). Below the clamp SiLU is
  // y itself (z < -100).
  const __m512 z = _mm512_mul_ps(y, _mm512_set1_ps(-1.44269504f));
  const __mmask16 near = _mm512_cmp_ps_mask(z, _mm512_set1_ps(100.f), _CMP_LE_OQ);  // false for NaN: y * 0 is NaN
  const __m512 zc = _mm512_max_ps(_mm512_min_ps(z, _mm512_set1_ps(100.f)), _mm512_set1_ps(-100.f));
  const __m512 d = _mm512_add_ps(exp2_coarse(zc), _mm512_set1_ps(1.f));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(y, _mm512_maskz_mov_ps(near, r));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 z = _mm256_mul_ps(y, _mm256_set1_ps(-1.44269504f));
  const __m256 near = _mm256_cmp_ps(z, _mm256_set1_ps(126.f), _CMP_LE_OQ);
  const __m256 zc = _mm256_max_ps(_mm256_min_ps(z, _mm256_set1_ps(126.f)), _mm256_set1_ps(-126.f));
  const __m256 d = _mm256_add_ps(exp2_in_range(zc), _mm256_set1_ps(1.f));
  __m256 r = _mm256_rcp_ps(d);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));
  return _mm256_mul_ps(y, _mm256_and_ps(r, near));
#else
  return y / (Vec(1.f) + y.neg().exp_u20());
#endif
}
inline float silu(float y) { return y / (1.f + std::exp(-y)); }

// out[i] = act(x[i] * scale + shift) for a run sharing one (scale, shift).
template <typename T, bool Silu>
void affine_run(const T* x, T* out, int64_t n, float scale, float shift) {
  const Vec vs(scale), vb(shift);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Vec a, b;
    load2(x + i, a, b);
    a = at::vec::fmadd(a, vs, vb);
    b = at::vec::fmadd(b, vs, vb);
    if constexpr (Silu) {
      a = silu(a);
      b = silu(b);
    }
    store2(out + i, a, b);
  }
  if constexpr (std::is_same_v<T, float>) {  // the tail as partial vectors: no scalar exp per run
    for (; i < n; i += Vec::size()) {
      const int64_t len = std::min<int64_t>(Vec::size(), n - i);
      Vec a = at::vec::fmadd(Vec::loadu(x + i, len), vs, vb);
      if constexpr (Silu) a = silu(a);
      a.store(out + i, len);
    }
  }
  for (; i < n; ++i) {
    float y = static_cast<float>(x[i]) * scale + shift;
    if constexpr (Silu) y = silu(y);
    out[i] = static_cast<T>(y);
  }
}

// out[c] = act(x[c] * scale[c] + shift[c]) for one NHWC pixel row of C channels.
template <typename T, bool Silu>
void affine_row(const T* x, T* out, int64_t C, const float* scale, const float* shift) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    Vec a, b;
    load2(x + c, a, b);
    a = at::vec::fmadd(a, Vec::loadu(scale + c), Vec::loadu(shift + c));
    b = at::vec::fmadd(b, Vec::loadu(scale + c + Vec::size()), Vec::loadu(shift + c + Vec::size()));
    if constexpr (Silu) {
      a = silu(a);
      b = silu(b);
    }
    store2(out + c, a, b);
  }
  if constexpr (std::is_same_v<T, float>) {
    for (; c < C; c += Vec::size()) {
      const int64_t len = std::min<int64_t>(Vec::size(), C - c);
      Vec a = at::vec::fmadd(Vec::loadu(x + c, len), Vec::loadu(scale + c, len), Vec::loadu(shift + c, len));
      if constexpr (Silu) a = silu(a);
      a.store(out + c, len);
    }
  }
  for (; c < C; ++c) {
    float y = static_cast<float>(x[c]) * scale[c] + shift[c];
    if constexpr (Silu) y = silu(y);
    out[c] = static_cast<T>(y);
  }
}

// A vector stored past the caches (non-temporal): no read for ownership, and the line does not evict the input
// the pass still has to read. p aligned to the vector.
inline void stream(float* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}

// Outputs at least this large are streamed past the caches (NHWC pass): the next op could not find them there.
// A fixed size, not the CPU's reported L3: under KVM sysconf reported 384 MB for this VM's 32 MB.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// affine_row over np pixel rows (row stride C). In fp32, blocks of 2 * 8 channels keep their scale and shift in
// registers down the rows: two loads fewer per vector than row by row (the channel tail goes row by row).
// Stream: non-temporal stores (fp32, out and C aligned to the vector, C a multiple of 2 vectors).
template <typename T, bool Silu, bool Stream = false>
void affine_rows(const T* x, T* out, int64_t np, int64_t C, const float* scale, const float* shift) {
  int64_t c0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = Vec::size();
    for (; c0 + 2 * L <= C; c0 += 2 * L) {
      const Vec s0 = Vec::loadu(scale + c0), s1 = Vec::loadu(scale + c0 + L);
      const Vec b0 = Vec::loadu(shift + c0), b1 = Vec::loadu(shift + c0 + L);
      for (int64_t p = 0; p < np; ++p) {
        const float* xr = x + p * C + c0;
        Vec a = at::vec::fmadd(Vec::loadu(xr), s0, b0), b = at::vec::fmadd(Vec::loadu(xr + L), s1, b1);
        if constexpr (Silu) {
          a = silu(a);
          b = silu(b);
        }
        if constexpr (Stream) {
          stream(out + p * C + c0, a);
          stream(out + p * C + c0 + L, b);
        } else {
          a.store(out + p * C + c0);
          b.store(out + p * C + c0 + L);
        }
      }
    }
  }
  if (c0 < C)
    for (int64_t p = 0; p < np; ++p)
      affine_row<T, Silu>(x + p * C + c0, out + p * C + c0, C - c0, scale + c0, shift + c0);
}

// scale/shift of every channel of group g in sample b from the group's merged statistics.
inline void group_affine(const GroupNormArgs& a, int64_t b, int64_t g, const WelfordState& st, float* scale,
                         float* shift) {
  const int64_t Cg = a.channels / a.groups;
  const float var = std::max(st.m2 / static_cast<float>(st.n), 0.f);
  const float rstd = 1.f / std::sqrt(var + a.eps);
  if (a.mean) a.mean[b * a.groups + g] = st.mean;
  if (a.rstd) a.rstd[b * a.groups + g] = rstd;
  for (int64_t j = 0; j < Cg; ++j) {
    const int64_t c = g * Cg + j;
    const float w = a.weight ? a.weight[c] : 1.f, bias = a.bias ? a.bias[c] : 0.f;
    const float add = a.add ? a.add[b * a.channels + c] : 0.f;
    scale[j] = rstd * w;
    shift[j] = (add - st.mean) * scale[j] + bias;
  }
}

template <typename T, bool Silu>
void group_norm_nchw(const GroupNormArgs& a) {
  const int64_t C = a.channels, HW = a.spatial, G = a.groups, Cg = C / G;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, Cg * HW));
  parallel_for_flushed(0, a.batch * G, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scale(Cg), shift(Cg);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / G, g = item % G;
      const int64_t base = (b * C + g * Cg) * HW;
      WelfordState st;
      if (!a.add) {
        st = run_stats(x + base, Cg * HW);  // the group's channels are one contiguous run
      } else {
        for (int64_t j = 0; j < Cg; ++j)  // each channel's mean shifted by its add
          st = welford_merge(st, welford_shift(run_stats(x + base + j * HW, HW), a.add[b * C + g * Cg + j]));
      }
      group_affine(a, b, g, st, scale.data(), shift.data());
      for (int64_t j = 0; j < Cg; ++j)  // the group was just read: this pass hits the cache
        affine_run<T, Silu>(x + base + j * HW, out + base + j * HW, HW, scale[j], shift[j]);
    }
  });
}

// Per-channel statistics of one chunk of np NHWC pixel rows (C channels each) into dst[0..C): one pass of shifted
// sums (shift = each channel's mean over the chunk's first kShiftRows pixels: see kShiftSamples), with no second
// read. Blocks of 2 * kLanes channels keep their shifts and sums in registers down the chunk's pixels. k, s1, s2:
// C floats of scratch.
constexpr int64_t kShiftRows = 16;

template <typename T>
void chunk_stats(const T* blk, int64_t np, int64_t C, float* k, float* s1, float* s2, WelfordState* dst) {
  const int64_t m = std::min(kShiftRows, np);
  const Vec inv_m(1.f / static_cast<float>(m));
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes <= C; c0 += 2 * kLanes) {
    Vec kv[4], a[4], q[4], v[4];
    for (int i = 0; i < 4; ++i) kv[i] = Vec(0.f);
    for (int64_t p = 0; p < m; ++p) {
      load2(blk + p * C + c0, v[0], v[1]);
      load2(blk + p * C + c0 + kLanes, v[2], v[3]);
      for (int i = 0; i < 4; ++i) kv[i] = kv[i] + v[i];
    }
    for (int i = 0; i < 4; ++i) {
      kv[i] = kv[i] * inv_m;
      a[i] = q[i] = Vec(0.f);
    }
    for (int64_t p = 0; p < np; ++p) {
      const T* row = blk + p * C + c0;
      load2(row, v[0], v[1]);
      load2(row + kLanes, v[2], v[3]);
      for (int i = 0; i < 4; ++i) {
        const Vec d = v[i] - kv[i];
        a[i] = a[i] + d;
        q[i] = at::vec::fmadd(d, d, q[i]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      kv[i].store(k + c0 + i * Vec::size());
      a[i].store(s1 + c0 + i * Vec::size());
      q[i].store(s2 + c0 + i * Vec::size());
    }
  }
  for (int64_t c = c0; c < C; ++c) {
    float sum = 0.f;
    for (int64_t p = 0; p < m; ++p) sum += static_cast<float>(blk[p * C + c]);
    k[c] = sum / static_cast<float>(m);
    s1[c] = s2[c] = 0.f;
  }
  for (int64_t p = 0; p < np && c0 < C; ++p) {
    const T* row = blk + p * C;
    for (int64_t c = c0; c < C; ++c) {
      const float d = static_cast<float>(row[c]) - k[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
  const float inv_n = 1.f / static_cast<float>(np);
  for (int64_t c = 0; c < C; ++c)
    dst[c] = WelfordState{k[c] + s1[c] * inv_n, std::max(s2[c] - s1[c] * s1[c] * inv_n, 0.f), np};
}

// Sample b's scale and shift (C each) from its chunks' statistics partial[chunk][C]: the chunks and the channels
// of each group merged; the add shifts each channel's mean.
void sample_affine(const GroupNormArgs& a, int64_t b, const WelfordState* partial, int64_t chunks, float* scale,
                   float* shift) {
  const int64_t C = a.channels, Cg = C / a.groups;
  for (int64_t g = 0; g < a.groups; ++g) {
    WelfordState st;
    for (int64_t j = 0; j < Cg; ++j) {
      const int64_t c = g * Cg + j;
      WelfordState ch;
      for (int64_t k = 0; k < chunks; ++k) ch = welford_merge(ch, partial[k * C + c]);
      st = welford_merge(st, welford_shift(ch, a.add ? a.add[b * C + c] : 0.f));
    }
    group_affine(a, b, g, st, scale + g * Cg, shift + g * Cg);
  }
}

template <typename T, bool Silu>
void group_norm_nhwc(const GroupNormArgs& a) {
  const int64_t C = a.channels, HW = a.spatial, B = a.batch;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  // Statistics per chunk of P pixels x C channels (a chunk stays in L2), then one read and one write.
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(HW, (1 << 14) / C));
  const int64_t chunks = (HW + P - 1) / P;
  const int64_t threads = at::get_num_threads();
  // A large output (kStreamBytes) is streamed: it neither evicts the sample the second pass re-reads from L2 nor
  // costs a read for ownership. Measured 64x128x32x32 fp32 (32 MB) on a 2-core AMD EPYC (1 MB L2 a core):
  // 1.6-1.9x torch's group_norm + silu with plain stores, 2.1-2.4x streamed; the U-Net's batch-8 tensors (4 MB)
  // keep plain stores, so the next op can find them in cache.
  constexpr int64_t L = Vec::size();
  const bool streamed = std::is_same_v<T, float> && C % (2 * L) == 0 &&
                        reinterpret_cast<uintptr_t>(out) % (L * sizeof(float)) == 0 &&
                        B * HW * C * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  if (B % threads == 0 || B >= 4 * threads) {
    // Whole samples per thread: the second pass reads a sample its thread has just read (from L2, or L3), not
    // from memory again. Measured 64x128x32x32 (32 MB): the two-pass split over all samples read it twice.
    parallel_for_flushed(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<WelfordState> partial(chunks * C);
      std::vector<float> k(C), s1(C), s2(C), scale(C), shift(C);
      for (int64_t b = begin; b < end; ++b) {
        const T* xs = x + b * HW * C;
        for (int64_t i = 0; i < chunks; ++i) {
          const int64_t p0 = i * P;
          chunk_stats(xs + p0 * C, std::min(P, HW - p0), C, k.data(), s1.data(), s2.data(), partial.data() + i * C);
        }
        sample_affine(a, b, partial.data(), chunks, scale.data(), shift.data());
        if (streamed)
          affine_rows<T, Silu, true>(xs, out + b * HW * C, HW, C, scale.data(), shift.data());
        else
          affine_rows<T, Silu>(xs, out + b * HW * C, HW, C, scale.data(), shift.data());
      }
#if defined(__x86_64__)
      if (streamed) _mm_sfence();  // the streamed lines are ordered before the caller's later reads
#endif
    });
    return;
  }
  // Fewer samples than threads can share: chunks of every sample in parallel, twice.
  std::vector<WelfordState> partial(B * chunks * C);
  parallel_for_flushed(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> k(C), s1(C), s2(C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, p0 = (item % chunks) * P;
      chunk_stats(x + (b * HW + p0) * C, std::min(P, HW - p0), C, k.data(), s1.data(), s2.data(),
                  partial.data() + item * C);
    }
  });
  std::vector<float> scale(B * C), shift(B * C);
  for (int64_t b = 0; b < B; ++b)
    sample_affine(a, b, partial.data() + b * chunks * C, chunks, scale.data() + b * C, shift.data() + b * C);
  parallel_for_flushed(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, p0 = (item % chunks) * P, np = std::min(P, HW - p0);
      const int64_t at = (b * HW + p0) * C;
      affine_rows<T, Silu>(x + at, out + at, np, C, scale.data() + b * C, shift.data() + b * C);
    }
  });
}

template <typename T>
void group_norm_typed(const GroupNormArgs& a) {
  if (a.nhwc)
    a.silu ? group_norm_nhwc<T, true>(a) : group_norm_nhwc<T, false>(a);
  else
    a.silu ? group_norm_nchw<T, true>(a) : group_norm_nchw<T, false>(a);
}

}  // namespace

void group_norm(const GroupNormArgs& a) {
  switch (a.dtype) {
    case DType::kFloat: return group_norm_typed<float>(a);
    case DType::kHalf: return group_norm_typed<at::Half>(a);
    case DType::kBFloat16: return group_norm_typed<at::BFloat16>(a);
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
