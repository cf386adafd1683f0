// CUDA GroupNorm (Wu & He 2018) + optional SiLU with the per-(batch, channel) add folded in, NCHW and NHWC:
//   h = x + add[b, c];  y = (h - mean_bg) rstd_bg w_c + b_c;  out = y sigmoid(y)
// Statistics in fp32 by Welford/Chan merges (csrc/common/welford.h, the header the CPU kernel uses).
// One pass when a group fits in shared memory (as apex's NHWC group norm does for small groups): one block per
// (sample, group) loads the group once into shared memory as fp32, reduces, and writes the output from there.
// Otherwise two passes: partial statistics of group slices, then a per-(sample, channel) scale/shift, then an
// elementwise pass with 128-bit loads (float4, or 8 halves / bfloat16s) where the layout allows.
#include "elementwise.cuh"

#include "../common/welford.h"

namespace ddpm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSlices = 32;  // slices of a group in the two-pass statistics
constexpr int64_t kSmemFloats = 46 * 1024 / 4;  // one pass when the group fits beside the static shared memory

// Memory offset of element e of group g of sample b (e counts the group's elements in memory order).
__device__ __forceinline__ int64_t group_offset(const GroupNormParams& p, int64_t b, int64_t g, int64_t e,
                                                int64_t* channel) {
  const int64_t C = p.channels, HW = p.spatial, Cg = C / p.groups;
  if (p.nhwc) {
    const int64_t pix = e / Cg, j = e % Cg;
    *channel = g * Cg + j;
    return (b * HW + pix) * C + g * Cg + j;
  }
  *channel = g * Cg + e / HW;
  return (b * C + g * Cg) * HW + e;
}

__device__ __forceinline__ WelfordState shfl_down(const WelfordState& s, int delta) {
  WelfordState r;
  r.mean = __shfl_down_sync(0xffffffffu, s.mean, delta);
  r.m2 = __shfl_down_sync(0xffffffffu, s.m2, delta);
  r.n = __shfl_down_sync(0xffffffffu, static_cast<long long>(s.n), delta);
  return r;
}

// Chan merge of every thread's state; the result is valid in thread 0.
__device__ WelfordState block_reduce(WelfordState s) {
  __shared__ float mean[32], m2[32];
  __shared__ long long n[32];
  for (int d = 16; d > 0; d >>= 1) s = welford_merge(s, shfl_down(s, d));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    mean[warp] = s.mean;
    m2[warp] = s.m2;
    n[warp] = s.n;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    s = lane < warps ? WelfordState{mean[lane], m2[lane], n[lane]} : WelfordState{};
    for (int d = 16; d > 0; d >>= 1) s = welford_merge(s, shfl_down(s, d));
  }
  return s;
}

// Streaming Welford update of one value.
__device__ __forceinline__ void welford_add(WelfordState& s, float v) {
  s.n += 1;
  const float d = v - s.mean;
  s.mean += d / static_cast<float>(s.n);
  s.m2 += d * (v - s.mean);
}

__device__ __forceinline__ float activate(float y, bool silu) { return silu ? y / (1.f + __expf(-y)) : y; }

__device__ __forceinline__ void channel_affine(const GroupNormParams& p, int64_t b, int64_t c, float mean, float rstd,
                                               float* scale, float* shift) {
  const float w = p.weight ? p.weight[c] : 1.f, bias = p.bias ? p.bias[c] : 0.f;
  const float add = p.add ? p.add[b * p.channels + c] : 0.f;
  *scale = rstd * w;
  *shift = (add - mean) * *scale + bias;
}

// ---------------------------------------------------------------------------------------------- one pass
template <typename T>
__global__ void group_norm_one_pass(GroupNormParams p) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x / p.groups, g = blockIdx.x % p.groups;
  const int64_t count = (p.channels / p.groups) * p.spatial;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  WelfordState s;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    int64_t c;
    const float v = to_float(x[group_offset(p, b, g, e, &c)]) + (p.add ? p.add[b * p.channels + c] : 0.f);
    smem[e] = v;
    welford_add(s, v);
  }
  __shared__ float stats[2];
  s = block_reduce(s);
  if (threadIdx.x == 0) {
    stats[0] = s.mean;
    stats[1] = rsqrtf(fmaxf(s.m2 / static_cast<float>(s.n), 0.f) + p.eps);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    int64_t c;
    const int64_t off = group_offset(p, b, g, e, &c);
    const float w = p.weight ? p.weight[c] : 1.f, bias = p.bias ? p.bias[c] : 0.f;
    out[off] = from_float<T>(activate((smem[e] - stats[0]) * stats[1] * w + bias, p.silu));
  }
}

// ---------------------------------------------------------------------------------------------- two passes
template <typename T>
__global__ void group_stats_slices(GroupNormParams p) {
  const int64_t item = blockIdx.x, b = item / p.groups, g = item % p.groups;
  const int64_t count = (p.channels / p.groups) * p.spatial;
  const int64_t per = (count + kSlices - 1) / kSlices, lo = blockIdx.y * per, hi = min(count, lo + per);
  const T* x = static_cast<const T*>(p.x);
  WelfordState s;
  for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
    int64_t c;
    welford_add(s, to_float(x[group_offset(p, b, g, e, &c)]) + (p.add ? p.add[b * p.channels + c] : 0.f));
  }
  s = block_reduce(s);
  if (threadIdx.x == 0) {
    float* w = p.workspace + 3 * (item * kSlices + blockIdx.y);
    w[0] = s.mean;
    w[1] = s.m2;
    w[2] = static_cast<float>(s.n);
  }
}

// scale/shift of every (sample, channel) from its group's merged slices (workspace after the slices: B x C x 2).
__global__ void channel_scale_shift(GroupNormParams p) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.batch * p.channels) return;
  const int64_t b = i / p.channels, c = i % p.channels, g = c / (p.channels / p.groups);
  const float* w = p.workspace + 3 * (b * p.groups + g) * kSlices;
  WelfordState s;
  for (int k = 0; k < kSlices; ++k)
    s = welford_merge(s, WelfordState{w[3 * k], w[3 * k + 1], static_cast<int64_t>(w[3 * k + 2])});
  float* ss = p.workspace + 3 * p.batch * p.groups * kSlices + 2 * i;
  channel_affine(p, b, c, s.mean, rsqrtf(fmaxf(s.m2 / static_cast<float>(s.n), 0.f) + p.eps), ss, ss + 1);
}

// out = act(x scale + shift), V elements a thread-iteration through one 128-bit load when V > 1.
template <typename T, int V>
__global__ void affine_elementwise(GroupNormParams p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const float* ss = p.workspace + 3 * p.batch * p.groups * kSlices;
  const int64_t n = p.channels * p.spatial, total = p.batch * n;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v * V < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = v * V, b = idx / n, off = idx - b * n;
    // NCHW: V consecutive elements share a channel (spatial % V == 0); NHWC: they are V channels
    const int64_t c0 = p.nhwc ? off % p.channels : off / p.spatial;
    T in[V], res[V];
    if constexpr (V > 1) {
      *reinterpret_cast<uint4*>(in) = *reinterpret_cast<const uint4*>(x + idx);
    } else {
      in[0] = x[idx];
    }
    DDPM_UNROLL
    for (int j = 0; j < V; ++j) {
      const int64_t c = p.nhwc ? c0 + j : c0;
      const float* k = ss + 2 * (b * p.channels + c);
      res[j] = from_float<T>(activate(to_float(in[j]) * k[0] + k[1], p.silu));
    }
    if constexpr (V > 1) {
      *reinterpret_cast<uint4*>(out + idx) = *reinterpret_cast<const uint4*>(res);
    } else {
      out[idx] = res[0];
    }
  }
}

template <typename T>
cudaError_t launch(const GroupNormParams& p, cudaStream_t s) {
  const int64_t count = (p.channels / p.groups) * p.spatial, items = p.batch * p.groups;
  if (count <= kSmemFloats) {
    group_norm_one_pass<T><<<static_cast<unsigned>(items), kThreads, count * sizeof(float), s>>>(p);
    return cudaGetLastError();
  }
  if (!p.workspace) return cudaErrorInvalidValue;
  group_stats_slices<T><<<dim3(static_cast<unsigned>(items), kSlices), kThreads, 0, s>>>(p);
  const int64_t bc = p.batch * p.channels;
  channel_scale_shift<<<static_cast<unsigned>((bc + kThreads - 1) / kThreads), kThreads, 0, s>>>(p);
  constexpr int V = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  const bool fits = p.nhwc ? p.channels % V == 0 : p.spatial % V == 0;
  const int64_t total = p.batch * p.channels * p.spatial;
  if (aligned && fits)
    affine_elementwise<T, V><<<blocks_for(total / V, kThreads), kThreads, 0, s>>>(p);
  else
    affine_elementwise<T, 1><<<blocks_for(total, kThreads), kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t group_norm_workspace_floats(const GroupNormParams& p) {
  return static_cast<size_t>(3 * p.batch * p.groups * kSlices + 2 * p.batch * p.channels);
}

cudaError_t group_norm_silu(const GroupNormParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto t) { return launch<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace ddpm_fast
