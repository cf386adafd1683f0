// Flash attention (Dao et al. 2022, the FlashAttention-2 register layout) on tensor cores for fp16/bf16:
//   per (batch, head, 64 queries): for each block of 32 keys, S = Q K^T (mma.sync m16n8k16, fp32 accumulators),
//   online softmax in the exp2 domain (m' = max(m, rowmax S); P = 2^(S - m'); l = l 2^(m - m') + rowsum P;
//   O = O 2^(m - m') + P V), then out = O / l (+ residual). Four warps, 16 query rows each; K and V blocks go
//   through shared memory; Q, K, V, residual and out are addressed through their (batch, head, row) strides with
//   a contiguous last dimension, so the U-Net's (B, HW, C) projections are read in place. The accumulator layout of
//   m16n8 is the A-operand layout of the next m16n8k16, so P goes from S's registers into P V without shared memory.
// Head dims 64, 128 and 256 (D / 8 accumulator tiles of 4 floats a thread); fp32 inputs and other head dims are
// not handled here (ddpm_fast.ops routes them to Triton): tensor cores multiply fp16/bf16 (tf32 would miss fp32's
// tolerance).
#include <cmath>

#include "elementwise.cuh"

namespace ddpm_fast {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kQueryTile = 16 * kWarps;
constexpr int kKeyTile = 32;

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Two 16-bit elements (lo at the lower address) as one 32-bit register.
template <typename T>
__device__ __forceinline__ uint32_t join2(T lo, T hi) {
  const uint16_t l = *reinterpret_cast<const uint16_t*>(&lo), h = *reinterpret_cast<const uint16_t*>(&hi);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

// c (16x8 fp32) += a (16x16, row) b (16x8, col)
template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarps) attention_mma_kernel(AttentionParams p) {
  constexpr int LDS = D + 8;  // padded shared rows: the B-fragment loads of a warp spread over the banks
  __shared__ __align__(16) T Ks[kKeyTile * LDS];
  __shared__ __align__(16) T Vs[kKeyTile * LDS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
  const int64_t b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + h * p.k_strides[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + h * p.v_strides[1];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kQueryTile + warp * 16 + gid, r1 = r0 + 8;
  const bool in0 = r0 < p.q_len, in1 = r1 < p.q_len;
  const float scale_log2 = p.scale * 1.4426950408889634f;

  float o[D / 8][4];
#pragma unroll
  for (int t = 0; t < D / 8; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  auto q_pair = [&](int64_t row, bool in, int col) -> uint32_t {
    return in ? *reinterpret_cast<const uint32_t*>(q + row * p.q_strides[2] + col) : 0u;
  };

  for (int64_t kb = 0; kb < p.kv_len; kb += kKeyTile) {
    __syncthreads();  // every warp is done with the previous K and V blocks
    for (int i = threadIdx.x; i < kKeyTile * D / 2; i += blockDim.x) {
      const int row = i / (D / 2), col = (i % (D / 2)) * 2;
      const int64_t key = kb + row;
      uint32_t kv = 0u, vv = 0u;
      if (key < p.kv_len) {
        kv = *reinterpret_cast<const uint32_t*>(k + key * p.k_strides[2] + col);
        vv = *reinterpret_cast<const uint32_t*>(v + key * p.v_strides[2] + col);
      }
      *reinterpret_cast<uint32_t*>(&Ks[row * LDS + col]) = kv;
      *reinterpret_cast<uint32_t*>(&Vs[row * LDS + col]) = vv;
    }
    __syncthreads();

    // S = Q K^T: this warp's 16 rows x 32 keys, four 16x8 tiles
    float s[kKeyTile / 8][4];
#pragma unroll
    for (int t = 0; t < kKeyTile / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll 4
    for (int kk = 0; kk < D; kk += 16) {
      const uint32_t a[4] = {q_pair(r0, in0, kk + 2 * tig), q_pair(r1, in1, kk + 2 * tig),
                             q_pair(r0, in0, kk + 8 + 2 * tig), q_pair(r1, in1, kk + 8 + 2 * tig)};
#pragma unroll
      for (int t = 0; t < kKeyTile / 8; ++t) {
        const T* kr = &Ks[(t * 8 + gid) * LDS + kk + 2 * tig];
        const uint32_t bb[2] = {*reinterpret_cast<const uint32_t*>(kr), *reinterpret_cast<const uint32_t*>(kr + 8)};
        mma16816<T>(s[t], a, bb);
      }
    }

    // online softmax (rows gid and gid + 8; each row's 32 keys are spread over the 4 threads of a group)
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int t = 0; t < kKeyTile / 8; ++t)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool valid = kb + t * 8 + 2 * tig + j < p.kv_len;
        s[t][j] = valid ? s[t][j] * scale_log2 : -INFINITY;
        s[t][j + 2] = valid ? s[t][j + 2] * scale_log2 : -INFINITY;
        mx0 = fmaxf(mx0, s[t][j]);
        mx1 = fmaxf(mx1, s[t][j + 2]);
      }
#pragma unroll
    for (int d = 1; d < 4; d <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, d));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, d));
    }
    const float alpha0 = exp2f(m0 - mx0), alpha1 = exp2f(m1 - mx1);  // 0 on the first block (m = -inf)
    m0 = mx0;
    m1 = mx1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int t = 0; t < kKeyTile / 8; ++t) {
      s[t][0] = exp2f(s[t][0] - m0);
      s[t][1] = exp2f(s[t][1] - m0);
      s[t][2] = exp2f(s[t][2] - m1);
      s[t][3] = exp2f(s[t][3] - m1);
      sum0 += s[t][0] + s[t][1];
      sum1 += s[t][2] + s[t][3];
    }
    l0 = l0 * alpha0 + sum0;  // this thread's share; the group's shares are summed at the end
    l1 = l1 * alpha1 + sum1;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      o[t][0] *= alpha0;
      o[t][1] *= alpha0;
      o[t][2] *= alpha1;
      o[t][3] *= alpha1;
    }

    // O += P V: P from S's accumulators (their m16n8 layout is m16n8k16's A layout), V from shared memory
#pragma unroll
    for (int ks = 0; ks < kKeyTile / 16; ++ks) {
      const uint32_t a[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]), pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                             pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
      const T* v0 = &Vs[(16 * ks + 2 * tig) * LDS + gid];
#pragma unroll
      for (int t = 0; t < D / 8; ++t) {
        const T* vc = v0 + t * 8;
        const uint32_t bb[2] = {join2<T>(vc[0], vc[LDS]), join2<T>(vc[8 * LDS], vc[9 * LDS])};
        mma16816<T>(o[t], a, bb);
      }
    }
  }

#pragma unroll
  for (int d = 1; d < 4; d <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, d);
    l1 += __shfl_xor_sync(0xffffffffu, l1, d);
  }
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + h * p.out_strides[1];
  const T* res = p.residual ? static_cast<const T*>(p.residual) + b * p.res_strides[0] + h * p.res_strides[1] : nullptr;
#pragma unroll
  for (int t = 0; t < D / 8; ++t) {
    const int col = t * 8 + 2 * tig;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = half ? r1 : r0;
      if (!(half ? in1 : in0)) continue;
      const float inv = half ? inv1 : inv0;
      float y0 = o[t][2 * half] * inv, y1 = o[t][2 * half + 1] * inv;
      if (res) {
        y0 += to_float<T>(res[row * p.res_strides[2] + col]);
        y1 += to_float<T>(res[row * p.res_strides[2] + col + 1]);
      }
      out[row * p.out_strides[2] + col] = from_float<T>(y0);
      out[row * p.out_strides[2] + col + 1] = from_float<T>(y1);
    }
  }
}

template <typename T>
cudaError_t launch(const AttentionParams& p, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((p.q_len + kQueryTile - 1) / kQueryTile),
                  static_cast<unsigned>(p.batch * p.heads));
  switch (p.head_dim) {
    case 64: attention_mma_kernel<T, 64><<<grid, 32 * kWarps, 0, s>>>(p); break;
    case 128: attention_mma_kernel<T, 128><<<grid, 32 * kWarps, 0, s>>>(p); break;
    case 256: attention_mma_kernel<T, 256><<<grid, 32 * kWarps, 0, s>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

bool attention_supported(DType dtype, int64_t head_dim, int64_t v_dim) {
  return dtype != DType::kFloat && head_dim == v_dim && (head_dim == 64 || head_dim == 128 || head_dim == 256);
}

cudaError_t attention(const AttentionParams& p, cudaStream_t stream) {
  if (!attention_supported(p.dtype, p.head_dim, p.v_dim)) return cudaErrorInvalidValue;
  return p.dtype == DType::kHalf ? launch<__half>(p, stream) : launch<__nv_bfloat16>(p, stream);
}

}  // namespace cuda
}  // namespace ddpm_fast
