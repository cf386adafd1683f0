// CUDA fused DDPM reverse step (Ho et al. 2020, Algorithm 2; eq. 7 and 15), grid-stride over B x n elements:
//   x_0 = (px x_t + pm m) q,  clamped when clipping;  x_{t-1} = c0 x_0 + c1 x_t + cm m + sigma z
//   (= kx x_t + km m + sigma z without clipping), z given or keyed Philox (stream 0, csrc/common/philox.h).
// 128-bit packs per thread when every sample is a whole number of packs and the pointers are aligned (then
// one Philox call serves four NCHW elements); element by element otherwise.
// Launch and indexing only: the coefficients come from csrc/common/coefficients.h through the host.
#include "elementwise.cuh"

namespace ddpm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, bool Clip, int Noise, bool WriteX0>
__global__ void ddpm_step_kernel(StepParams p) {
  const T* x = static_cast<const T*>(p.x);
  const T* m = static_cast<const T*>(p.m);
  const T* zg = static_cast<const T*>(p.noise);
  T* out = static_cast<T*>(p.out);
  T* x0o = static_cast<T*>(p.x0_out);
  const int64_t n = p.geo.numel_per_sample, total = p.geo.batch * n;
  const PhiloxKey key = philox_key(p.seed);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / n;
    const float* k = p.coeffs + 9 * b;
    const float xv = to_float(x[idx]), mv = to_float(m[idx]);
    float x0 = (k[0] * xv + k[1] * mv) * k[2], o;
    if (Clip) {
      x0 = fminf(fmaxf(x0, -p.clip_range), p.clip_range);
      o = k[3] * x0 + k[4] * xv + k[5] * mv;
    } else {
      o = k[6] * xv + k[7] * mv;
    }
    if (Noise == 1) o += k[8] * to_float(zg[idx]);
    if (Noise == 2 && k[8] != 0.f) {
      const int64_t i = logical_index(idx - b * n, p.geo);
      o += k[8] * keyed_normal_at(key, i, static_cast<uint32_t>(p.sample_offset + b), static_cast<uint32_t>(p.t[b]),
                                  kStreamStep);
    }
    out[idx] = from_float<T>(o);
    if (WriteX0) x0o[idx] = from_float<T>(x0);
  }
}

// The same step, one 128-bit pack (4 fp32 or 8 fp16/bf16 elements of one sample) per thread-iteration.
template <typename T, bool Clip, int Noise, bool WriteX0>
__global__ void ddpm_step_pack_kernel(StepParams p) {
  constexpr int V = Pack<T>::kSize;
  const T* x = static_cast<const T*>(p.x);
  const T* m = static_cast<const T*>(p.m);
  const T* zg = static_cast<const T*>(p.noise);
  T* out = static_cast<T*>(p.out);
  T* x0o = static_cast<T*>(p.x0_out);
  const int64_t n = p.geo.numel_per_sample, packs = p.geo.batch * n / V;
  const PhiloxKey key = philox_key(p.seed);
  for (int64_t pk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = pk * V, b = idx / n;
    const float* k = p.coeffs + 9 * b;
    float xv[V], mv[V], z[V], o[V], x0[V];
    load_pack(x + idx, xv);
    load_pack(m + idx, mv);
    if (Noise == 1) load_pack(zg + idx, z);
    if (Noise == 2 && k[8] != 0.f)
      keyed_normals<V>(key, p.geo, idx - b * n, static_cast<uint32_t>(p.sample_offset + b),
                       static_cast<uint32_t>(p.t[b]), kStreamStep, z);
    DDPM_UNROLL
    for (int j = 0; j < V; ++j) {
      x0[j] = (k[0] * xv[j] + k[1] * mv[j]) * k[2];
      if (Clip) {
        x0[j] = fminf(fmaxf(x0[j], -p.clip_range), p.clip_range);
        o[j] = k[3] * x0[j] + k[4] * xv[j] + k[5] * mv[j];
      } else {
        o[j] = k[6] * xv[j] + k[7] * mv[j];
      }
      if (Noise == 1 || (Noise == 2 && k[8] != 0.f)) o[j] += k[8] * z[j];
    }
    store_pack(out + idx, o);
    if (WriteX0) store_pack(x0o + idx, x0);
  }
}

template <typename T, bool Clip, int Noise>
cudaError_t launch_x0(const StepParams& p, cudaStream_t s) {
  const int64_t total = p.geo.batch * p.geo.numel_per_sample;
  if (packable(p.geo, sizeof(T), {p.x, p.m, p.noise, p.out, p.x0_out})) {
    const int blocks = blocks_for(total / Pack<T>::kSize, kThreads);
    if (p.x0_out)
      ddpm_step_pack_kernel<T, Clip, Noise, true><<<blocks, kThreads, 0, s>>>(p);
    else
      ddpm_step_pack_kernel<T, Clip, Noise, false><<<blocks, kThreads, 0, s>>>(p);
    return cudaGetLastError();
  }
  const int blocks = blocks_for(total, kThreads);
  if (p.x0_out)
    ddpm_step_kernel<T, Clip, Noise, true><<<blocks, kThreads, 0, s>>>(p);
  else
    ddpm_step_kernel<T, Clip, Noise, false><<<blocks, kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const StepParams& p, cudaStream_t s) {
  const int noise = p.noise ? 1 : 2;
  if (p.clip) return noise == 1 ? launch_x0<T, true, 1>(p, s) : launch_x0<T, true, 2>(p, s);
  return noise == 1 ? launch_x0<T, false, 1>(p, s) : launch_x0<T, false, 2>(p, s);
}

}  // namespace

cudaError_t ddpm_step(const StepParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto t) { return launch<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace ddpm_fast
