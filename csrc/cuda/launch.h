// Launchers of the CUDA kernels: plain C++ types only (no torch headers), so these sources compile with any
// nvcc; the torch glue (a .cpp, built only when torch has CUDA) validates tensors and passes raw pointers and
// the current stream. The maths comes from csrc/common/ (the same headers the CPU kernels use and test).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace ddpm_fast {
namespace cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct Layout {
  int64_t batch, numel_per_sample, channels, spatial;  // spatial = H * W (used when nhwc)
  bool nhwc;
};

struct StepParams {
  Layout geo;
  DType dtype;
  const void* x;        // (B, n) x_t
  const void* m;        // (B, n) model output
  const void* noise;    // (B, n) z, or nullptr for keyed noise
  void* out;            // (B, n) x_{t-1}
  void* x0_out;         // (B, n) predicted x_0, or nullptr
  const float* coeffs;  // device (B, 9): px, pm, q, c0, c1, cm, kx, km, sigma (from csrc/common/coefficients.h)
  const int64_t* t;     // device (B,) timesteps (keys the noise)
  uint64_t seed;
  int64_t sample_offset;
  bool clip;
  float clip_range;
};

struct QSampleParams {
  Layout geo;
  DType dtype;
  const void* x0;       // (B, n)
  void* noise;          // (B, n) eps: read, or written when generate
  void* out;            // (B, n) x_t
  const float* coeffs;  // device (B, 2): sqrt(abar_t), sqrt(1 - abar_t)
  const int64_t* t;     // device (B,)
  uint64_t seed;
  int64_t sample_offset;
  bool generate;
};

struct NormalParams {
  Layout geo;
  DType dtype;
  void* out;
  const int64_t* t;
  uint64_t seed;
  int64_t sample_offset;
  uint32_t stream;
};

struct GroupNormParams {
  int64_t batch, channels, spatial, groups;  // spatial = H * W
  bool nhwc;
  DType dtype;
  const void* x;        // input, dtype
  void* out;            // output, dtype, same layout; may alias x (each element is read before it is written)
  const float* weight;  // device (C) fp32, or nullptr
  const float* bias;    // device (C) fp32, or nullptr
  const float* add;     // device (B, C) fp32, or nullptr
  float* workspace;     // device, group_norm_workspace_floats(p) floats (two-pass path only)
  float eps;
  bool silu;
};

// softmax(q k^T scale) v (+ residual) for (B, H, N, D) operands addressed through (batch, head, row) strides,
// the last dimension contiguous; fp16/bf16, head dims 64/128/256 (attention_supported), on tensor cores.
struct AttentionParams {
  int64_t batch, heads, q_len, kv_len, head_dim, v_dim;
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  const void* residual;  // or nullptr
  void* out;
  int64_t q_strides[3], k_strides[3], v_strides[3], res_strides[3], out_strides[3];
  float scale;
};

cudaError_t ddpm_step(const StepParams& p, cudaStream_t stream);
cudaError_t attention(const AttentionParams& p, cudaStream_t stream);
bool attention_supported(DType dtype, int64_t head_dim, int64_t v_dim);
cudaError_t group_norm_silu(const GroupNormParams& p, cudaStream_t stream);
size_t group_norm_workspace_floats(const GroupNormParams& p);
cudaError_t q_sample(const QSampleParams& p, cudaStream_t stream);
cudaError_t keyed_normal(const NormalParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace ddpm_fast
