// Interface between the torch glue (csrc/bindings.cpp) and the CPU kernels: raw pointers and sizes only,
// so the kernel translation units stay free of the Tensor API and compile fast.
#pragma once

#include <stdint.h>

#include <c10/util/BFloat16.h>

namespace ddpm_fast {
namespace cpu {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// A batch of dense samples that all share one memory layout. Each sample is contiguous in memory
// (numel_per_sample elements); inside it the layout is NCHW (logical order) or NHWC (channels last).
struct Geometry {
  int64_t batch;
  int64_t numel_per_sample;
  int64_t channels;  // used when nhwc
  int64_t spatial;   // H * W, used when nhwc
  bool nhwc;
};

// Keyed noise (csrc/common/philox.h): sample b is global sample sample_offset + b, at step t[b].
struct NoiseKey {
  uint64_t seed;
  int64_t sample_offset;
  uint32_t stream;
};

struct StepArgs {
  Geometry geo;
  DType dtype;
  const void* x;             // (B, ...) x_t
  const void* model_output;  // (B, ...) epsilon, x_0 or v
  const void* noise;         // (B, ...) z, or nullptr: keyed noise
  void* out;                 // (B, ...) x_{t-1}; may alias x or model_output
  void* x0_out;              // (B, ...) predicted (clipped) x_0, or nullptr
  const int64_t* t;          // (B,) timesteps
  const int64_t* t_prev;     // (B,) previous timesteps (respaced or custom schedules; < 0: none), or nullptr: t - 1
  const double* abar;        // (T,) alphas_cumprod, float64
  const float* coeffs;       // (B, 7) given px, pm, q, c0, c1, cm, sigma (a scheduler's own), or nullptr
  NoiseKey key;
  int prediction_type;  // PredictionType in csrc/common/coefficients.h
  int variance_type;    // VarianceType
  bool clip;
  float clip_range;
};

// Multistep solver step (csrc/cpu/dpmpp_step.cpp): D0 = (px x + pm m) q, y = x or (corrector) c_l L + c_1 D1 +
// c_d (D0 - D1) + c_e (D1 - D2) + c_f (D1 - D3),
// out = a_x y + a_0 D0 + a_d (D0 - D1) + a_e ((D0 - D1) - rho (D1 - D2)) + a_z z.
constexpr int kDpmppColumns = 14;  // px, pm, q, a_x, a_0, a_d, a_e, rho, a_z, c_l, c_1, c_d, c_e, c_f
struct DpmppArgs {
  Geometry geo;
  DType dtype;
  const void* x;             // (B, ...) x_t
  const void* model_output;  // (B, ...) epsilon, x_0 or v
  const void* x0_last;       // (B, ...) D1, the previous step's D0, or nullptr
  const void* x0_last2 = nullptr;     // (B, ...) D2 (the one before), or nullptr
  const void* x0_last3 = nullptr;     // (B, ...) D3, or nullptr
  const void* last_sample = nullptr;  // (B, ...) L, the corrector's last sample, or nullptr: y = x
  const void* noise = nullptr;        // (B, ...) z, or nullptr: keyed noise where t is given and a_z != 0
  void* out;                 // (B, ...) x_next; may alias an input
  void* x0_out;              // (B, ...) D0; may alias an input
  void* sample_out = nullptr;  // (B, ...) y (with last_sample); may alias an input
  const float* coeffs;       // (B, kDpmppColumns)
  const int64_t* t = nullptr;  // (B,) timesteps keying the noise, or nullptr
  NoiseKey key{0, 0, 0};
};
// The history (0-3 tensors) a coefficient row reads, corrected or not.
int dpmpp_history_needed(const float* row, bool corrected);

struct QSampleArgs {
  Geometry geo;
  DType dtype;
  const void* x0;      // (B, ...)
  void* noise;         // (B, ...) eps: read, or written when generate_noise
  bool generate_noise;
  void* out;           // (B, ...) x_t; may alias x0
  const int64_t* t;    // (B,)
  const double* abar;  // (T,)
  const float* coeffs;  // (B, 2) given a, b (a drop-in scheduler's own), or nullptr
  NoiseKey key;
};

struct NormalArgs {
  Geometry geo;
  DType dtype;
  void* out;         // (B, ...)
  const int64_t* t;  // (B,) the step each sample's noise is keyed with
  NoiseKey key;
};

// GroupNorm + optional SiLU + optional per-(batch, channel) add before the norm.
struct GroupNormArgs {
  int64_t batch, channels, spatial;  // x is (batch, channels, spatial...) with spatial = prod of the rest
  bool nhwc;                         // channels_last memory (4-D only)
  DType dtype;
  const void* x;        // input, dtype
  void* out;            // output, dtype, same layout; may alias x
  const float* weight;  // (C,) or nullptr
  const float* bias;    // (C,) or nullptr
  const float* add;     // (B, C) or nullptr
  int64_t groups;
  float eps;
  bool silu;
  float* mean = nullptr;  // (B, G) fp32 out, or nullptr: each group's mean of h = x + add (for the backward)
  float* rstd = nullptr;  // (B, G) fp32 out, or nullptr: 1 / sqrt(var + eps)
};

// The backward of group_norm (group_norm_backward.cpp), fp32, from the forward's saved mean and rstd.
struct GroupNormBackwardArgs {
  int64_t batch, channels, spatial;
  bool nhwc;
  const float* x;       // the forward's input
  const float* grad;    // dL/d(out), x's layout
  const float* weight;  // (C,) or nullptr
  const float* bias;    // (C,) or nullptr
  const float* add;     // (B, C) or nullptr
  const float* mean;    // (B, G)
  const float* rstd;    // (B, G)
  int64_t groups;
  bool silu;
  float* grad_x;  // dL/dx, x's layout
  float* sums;    // (B, C, 3) out: sum over pixels of x, dy and dy * xhat (dy: the gradient before SiLU)
};

// softmax(q k^T * scale) v (+ residual), fp32, (B, H, N, D) operands addressed through their strides; the last
// dimension of every operand must be contiguous.
struct AttentionArgs {
  int64_t batch, heads, q_len, kv_len, head_dim, v_dim;
  const float* q;
  const float* k;
  const float* v;
  const float* residual;  // or nullptr
  float* out;
  int64_t q_strides[3], k_strides[3], v_strides[3], res_strides[3], out_strides[3];  // batch, head, row
  float scale;
  float* lse = nullptr;  // (B, H, N) contiguous fp32 out, or nullptr: log sum_j exp(scale q_i k_j) per query
};

// The backward of attention (attention_backward.cpp), fp32, from the forward's output o (without the residual) and
// its lse: dq, dk, dv of L given do = dL/do, recomputing the softmax block by block.
struct AttentionBackwardArgs {
  int64_t batch, heads, q_len, kv_len, head_dim, v_dim;
  const float* q;
  const float* k;
  const float* v;
  const float* out;       // (B, H, N, Dv) softmax(q k^T * scale) v
  const float* grad_out;  // (B, H, N, Dv) dL/d(out)
  const float* lse;       // (B, H, N) contiguous
  float* grad_q;          // (B, H, N, D)
  float* grad_k;          // (B, H, M, D)
  float* grad_v;          // (B, H, M, Dv)
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3], go_strides[3];  // batch, head, row
  int64_t gq_strides[3], gk_strides[3], gv_strides[3];
  float scale;
};

// 3x3 convolution, stride 1, padding 1, by Winograd F(2x2, 3x3) or F(4x4, 3x3) on fp32 NHWC activations; u holds
// the transformed weights U[16][C][K] (winograd_weight_transform of w[K][C][3][3]) or U[36][C][K]
// (winograd_weight_transform_4x4). out must not alias x; it may
// alias residual (read and written at the same position).
struct WinogradArgs {
  int64_t batch, height, width, in_channels, out_channels;
  int tile = 2;           // outputs a tile side: 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3))
  const float* x;         // (N, H, W, C)
  const float* u;         // ((tile + 2)^2, C, K)
  const float* bias;      // (K) or nullptr
  const float* residual;  // (N, H, W, K) or nullptr
  float* out;             // (N, H, W, K)
};

// The bf16 variant: bf16 NHWC activations in and out, V = B^T d B computed in fp32 and stored bf16, the 16
// products in bf16 with fp32 accumulation (vdpbf16ps / AMX through oneDNN's brgemm), the output transform, bias
// and residual in fp32. u holds U in bf16, packed for the brgemm: [16][K / kBf16Block][C2 / 2][kBf16Block][2]
// (the VNNI pairs of rows c, c + 1; C2 = C rounded up to even, K to a whole block, zero-padded).
constexpr int64_t kBf16Block = 64;  // output channels per product: the packed B's leading dimension
struct WinogradBf16Args {
  int64_t batch, height, width, in_channels, out_channels;
  const c10::BFloat16* x;         // (N, H, W, C)
  const c10::BFloat16* u;         // packed, see above
  const float* bias;              // (K) or nullptr
  const c10::BFloat16* residual;  // (N, H, W, K) or nullptr
  c10::BFloat16* out;             // (N, H, W, K)
};

// U[(tile + 2)^2][C][K] = G g G^T of each filter g = w[k][c] of w[K][C][3][3]; rotated: U[..][K][C] of the filters
// flipped in both spatial axes (w_rot[c][k][i][j] = w[k][c][2 - i][2 - j], the data gradient's weight).
void winograd_weight_transform(const float* w, int64_t K, int64_t C, float* u, bool rotated = false);
void winograd_weight_transform_4x4(const float* w, int64_t K, int64_t C, float* u, bool rotated = false);
void winograd_conv3x3(const WinogradArgs& args);
// U (16, C, K) fp32 -> the packed bf16 layout of WinogradBf16Args::u.
void winograd_pack_bf16(const float* u, int64_t K, int64_t C, c10::BFloat16* packed);
void winograd_conv3x3_bf16(const WinogradBf16Args& args);
// The CPU's bf16 matrix instructions the bf16 products use: "amx_bf16", "avx512_bf16", or "" (none: bf16
// convolutions then run the fp32 kernel on converted tensors).
const char* bf16_instructions();
void ddpm_step(const StepArgs& args);
void dpmpp_step(const DpmppArgs& args);
void attention(const AttentionArgs& args);
void attention_backward(const AttentionBackwardArgs& args);
void group_norm(const GroupNormArgs& args);
void group_norm_backward(const GroupNormBackwardArgs& args);
void q_sample(const QSampleArgs& args);
void keyed_normal(const NormalArgs& args);

// The instruction set these kernels were compiled for ("avx2" or "default").
const char* capability();
// The library of the Winograd products (gemm.h): "onednn" or "blas".
const char* gemm_library();

}  // namespace cpu
}  // namespace ddpm_fast
