// Device helpers of the elementwise CUDA kernels: fp32 conversion of fp32/fp16/bf16 elements, the logical
// (NCHW) index of a memory offset, and the keyed normal of one element from csrc/common/philox.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/philox.h"
#include "launch.h"

namespace ddpm_fast {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// NCHW index within a sample of memory offset `off` (NHWC memory: off = hw * C + c).
__device__ __forceinline__ int64_t logical_index(int64_t off, const Layout& g) {
  return g.nhwc ? (off % g.channels) * g.spatial + off / g.channels : off;
}

// The keyed normal of logical element i of global sample gs at step t (one Philox call, one of its 4 normals).
__device__ __forceinline__ float keyed_normal_at(PhiloxKey key, int64_t i, uint32_t gs, uint32_t t, uint32_t stream) {
  float z[4];
  philox_normal4(key, static_cast<uint32_t>(i >> 2), gs, t, stream, z);
  return z[i & 3];
}

inline int blocks_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);  // grid-stride beyond this
}

}  // namespace cuda
}  // namespace ddpm_fast
