// CUDA fused forward noising q(x_t | x_0) (Ho et al. 2020, eq. 4) and keyed noise written to memory:
//   x_t = a_b x_0 + s_b eps, eps given or keyed Philox (stream 1, then also written out).
#include "elementwise.cuh"

namespace ddpm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, bool Generate>
__global__ void q_sample_kernel(QSampleParams p) {
  const T* x0 = static_cast<const T*>(p.x0);
  T* eps = static_cast<T*>(p.noise);
  T* out = static_cast<T*>(p.out);
  const int64_t n = p.geo.numel_per_sample, total = p.geo.batch * n;
  const PhiloxKey key = philox_key(p.seed);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / n;
    float e;
    if (Generate) {
      const T stored = from_float<T>(keyed_normal_at(key, logical_index(idx - b * n, p.geo),
                                                     static_cast<uint32_t>(p.sample_offset + b),
                                                     static_cast<uint32_t>(p.t[b]), kStreamQSample));
      eps[idx] = stored;
      e = to_float(stored);  // x_t from eps as stored, so the two agree in low precision
    } else {
      e = to_float(eps[idx]);
    }
    out[idx] = from_float<T>(p.coeffs[2 * b] * to_float(x0[idx]) + p.coeffs[2 * b + 1] * e);
  }
}

template <typename T>
__global__ void keyed_normal_kernel(NormalParams p) {
  T* out = static_cast<T*>(p.out);
  const int64_t n = p.geo.numel_per_sample, total = p.geo.batch * n;
  const PhiloxKey key = philox_key(p.seed);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / n;
    out[idx] = from_float<T>(keyed_normal_at(key, logical_index(idx - b * n, p.geo),
                                             static_cast<uint32_t>(p.sample_offset + b), static_cast<uint32_t>(p.t[b]),
                                             p.stream));
  }
}

// q_sample one 128-bit pack of one sample per thread-iteration.
template <typename T, bool Generate>
__global__ void q_sample_pack_kernel(QSampleParams p) {
  constexpr int V = Pack<T>::kSize;
  const T* x0 = static_cast<const T*>(p.x0);
  T* eps = static_cast<T*>(p.noise);
  T* out = static_cast<T*>(p.out);
  const int64_t n = p.geo.numel_per_sample, packs = p.geo.batch * n / V;
  const PhiloxKey key = philox_key(p.seed);
  for (int64_t pk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = pk * V, b = idx / n;
    float xv[V], e[V], o[V];
    load_pack(x0 + idx, xv);
    if (Generate) {
      keyed_normals<V>(key, p.geo, idx - b * n, static_cast<uint32_t>(p.sample_offset + b),
                       static_cast<uint32_t>(p.t[b]), kStreamQSample, e);
      store_pack(eps + idx, e);
      DDPM_UNROLL
      for (int j = 0; j < V; ++j) e[j] = to_float(from_float<T>(e[j]));  // x_t from eps as stored
    } else {
      load_pack(eps + idx, e);
    }
    DDPM_UNROLL
    for (int j = 0; j < V; ++j) o[j] = p.coeffs[2 * b] * xv[j] + p.coeffs[2 * b + 1] * e[j];
    store_pack(out + idx, o);
  }
}

template <typename T>
cudaError_t launch_q(const QSampleParams& p, cudaStream_t s) {
  if (packable(p.geo, sizeof(T), {p.x0, p.noise, p.out})) {
    const int blocks = blocks_for(p.geo.batch * p.geo.numel_per_sample / Pack<T>::kSize, kThreads);
    if (p.generate)
      q_sample_pack_kernel<T, true><<<blocks, kThreads, 0, s>>>(p);
    else
      q_sample_pack_kernel<T, false><<<blocks, kThreads, 0, s>>>(p);
    return cudaGetLastError();
  }
  const int blocks = blocks_for(p.geo.batch * p.geo.numel_per_sample, kThreads);
  if (p.generate)
    q_sample_kernel<T, true><<<blocks, kThreads, 0, s>>>(p);
  else
    q_sample_kernel<T, false><<<blocks, kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_n(const NormalParams& p, cudaStream_t s) {
  keyed_normal_kernel<T><<<blocks_for(p.geo.batch * p.geo.numel_per_sample, kThreads), kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t q_sample(const QSampleParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto t) { return launch_q<decltype(t)>(p, stream); });
}

cudaError_t keyed_normal(const NormalParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto t) { return launch_n<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace ddpm_fast
