// Device helpers of the elementwise CUDA kernels: fp32 conversion of fp32/fp16/bf16 elements, the logical
// (NCHW) index of a memory offset, and the keyed normal of one element from csrc/common/philox.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <initializer_list>

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

// 128 bits of elements: 4 fp32 or 8 fp16/bf16, moved with one vector load or store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float* f) {
  const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p);
  DDPM_UNROLL
  for (int j = 0; j < Pack<T>::kSize; ++j) f[j] = to_float(pk.v[j]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float* f) {
  Pack<T> pk;
  DDPM_UNROLL
  for (int j = 0; j < Pack<T>::kSize; ++j) pk.v[j] = from_float<T>(f[j]);
  *reinterpret_cast<Pack<T>*>(p) = pk;
}

// Keyed normals of the V consecutive memory elements at offset `off` of one sample. NCHW memory is in logical
// order and off is a multiple of 4 (V is), so one Philox call yields four of them; NHWC takes one call each.
template <int V>
__device__ __forceinline__ void keyed_normals(PhiloxKey key, const Layout& g, int64_t off, uint32_t gs, uint32_t t,
                                              uint32_t stream, float* z) {
  if (!g.nhwc) {
    DDPM_UNROLL
    for (int q = 0; q < V / 4; ++q) philox_normal4(key, static_cast<uint32_t>((off >> 2) + q), gs, t, stream, z + 4 * q);
  } else {
    DDPM_UNROLL
    for (int j = 0; j < V; ++j) z[j] = keyed_normal_at(key, logical_index(off + j, g), gs, t, stream);
  }
}

// Whether a kernel may take Pack-sized steps: every sample a whole number of packs, every pointer 16-byte aligned.
inline bool packable(const Layout& g, int elem_size, std::initializer_list<const void*> ptrs) {
  if (g.numel_per_sample % (16 / elem_size) != 0) return false;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// The launchers' dtype switch: f(T{}) with T the element type d names (float, __half or __nv_bfloat16).
template <class F>
cudaError_t dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat: return f(float{});
    case DType::kHalf: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline int blocks_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);  // grid-stride beyond this
}

}  // namespace cuda
}  // namespace ddpm_fast
