// The one place ops are registered: torch custom ops (TORCH_LIBRARY) so they compose with
// torch.compile and CUDA graphs. Inputs are validated in Python (ddpm_fast/ops) with readable
// messages before any kernel runs; the checks here are the last line of defence against a crash.
#include <torch/extension.h>
#include <torch/library.h>

#include <array>

#include "common/philox.h"
#include "cpu/kernels.h"

namespace ddpm_fast {
namespace {

using cpu::DType;
using cpu::Geometry;

constexpr int kNCHW = 1, kNHWC = 2;

// Which dense layouts t is in (both for tensors whose size-1 dims make them ambiguous).
int layouts_of(const at::Tensor& t) {
  int l = t.is_contiguous() ? kNCHW : 0;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) l |= kNHWC;
  return l;
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "ddpm_fast: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Geometry shared by x and every other (non-null) tensor: same shape, dtype, device, dense layout.
Geometry geometry(const at::Tensor& x, std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(x.device().is_cpu(), "ddpm_fast cpu kernels: tensors must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(0) > 0 && x.numel() > 0, "ddpm_fast: expected a non-empty batch");
  int layouts = layouts_of(x);
  for (const at::Tensor* o : others) {
    if (!o) continue;
    TORCH_CHECK(o->sizes() == x.sizes(), "ddpm_fast: shape mismatch ", o->sizes(), " vs ", x.sizes());
    TORCH_CHECK(o->scalar_type() == x.scalar_type(), "ddpm_fast: dtype mismatch");
    TORCH_CHECK(o->device() == x.device(), "ddpm_fast: device mismatch");
    layouts &= layouts_of(*o);
  }
  TORCH_CHECK(layouts != 0, "ddpm_fast: tensors must share one dense layout (contiguous or channels_last)");
  Geometry g;
  g.batch = x.size(0);
  g.numel_per_sample = x.numel() / g.batch;
  g.nhwc = !(layouts & kNCHW);
  g.channels = x.dim() >= 2 ? x.size(1) : 1;
  g.spatial = g.nhwc ? x.size(2) * x.size(3) : 1;
  return g;
}

void check_timesteps(const at::Tensor& t, const at::Tensor& abar, int64_t batch) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == batch && t.is_contiguous() &&
                  t.device().is_cpu(),
              "ddpm_fast: t must be a contiguous int64 CPU tensor of shape (batch,)");
  TORCH_CHECK(abar.scalar_type() == at::kDouble && abar.dim() == 1 && abar.is_contiguous() && abar.device().is_cpu(),
              "ddpm_fast: alphas_cumprod must be a contiguous float64 CPU tensor");
  if (batch > 0) {
    const auto [lo, hi] = at::aminmax(t);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < abar.size(0), "ddpm_fast: t out of range");
  }
}

cpu::NoiseKey noise_key(int64_t seed, int64_t sample_offset, uint32_t stream) {
  TORCH_CHECK(sample_offset >= 0, "ddpm_fast: sample_offset must be >= 0");
  return {static_cast<uint64_t>(seed), sample_offset, stream};
}

// A (B, n) fp32 coefficient table given by the caller, checked; nullptr when absent.
const float* coeff_table(const std::optional<at::Tensor>& c, int64_t batch, int64_t n) {
  if (!c) return nullptr;
  TORCH_CHECK(c->scalar_type() == at::kFloat && c->device().is_cpu() && c->is_contiguous() &&
                  c->sizes() == at::IntArrayRef({batch, n}),
              "ddpm_fast: coefficients must be a contiguous float32 CPU tensor of shape (batch, ", n, ")");
  return c->data_ptr<float>();
}

void ddpm_step_cpu(const at::Tensor& x_t, const at::Tensor& model_output, const at::Tensor& t,
                   const std::optional<at::Tensor>& t_prev, const at::Tensor& alphas_cumprod,
                   const std::optional<at::Tensor>& coeffs, const std::optional<at::Tensor>& noise, int64_t seed,
                   int64_t sample_offset, int64_t prediction_type, int64_t variance_type, bool clip_sample,
                   double clip_range, const at::Tensor& out, const std::optional<at::Tensor>& x0_out) {
  const at::Tensor* nz = noise ? &*noise : nullptr;
  const at::Tensor* x0 = x0_out ? &*x0_out : nullptr;
  cpu::StepArgs a;
  a.geo = geometry(x_t, {&model_output, nz, &out, x0});
  check_timesteps(t, alphas_cumprod, a.geo.batch);
  TORCH_CHECK(prediction_type >= 0 && prediction_type <= 2, "ddpm_fast: unknown prediction_type");
  TORCH_CHECK(variance_type >= 0 && variance_type <= 1, "ddpm_fast: unknown variance_type");
  a.dtype = dtype_of(x_t);
  a.x = x_t.data_ptr();
  a.model_output = model_output.data_ptr();
  a.noise = nz ? nz->data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.x0_out = x0 ? x0->data_ptr() : nullptr;
  a.t = t.data_ptr<int64_t>();
  a.t_prev = nullptr;
  if (t_prev) {
    TORCH_CHECK(t_prev->scalar_type() == at::kLong && t_prev->sizes() == t.sizes() && t_prev->is_contiguous(),
                "ddpm_fast: t_prev must be a contiguous int64 tensor shaped like t");
    const auto [lo, hi] = at::aminmax(*t_prev);
    TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < alphas_cumprod.size(0), "ddpm_fast: t_prev out of range");
    a.t_prev = t_prev->data_ptr<int64_t>();
  }
  a.abar = alphas_cumprod.data_ptr<double>();
  a.coeffs = coeff_table(coeffs, a.geo.batch, 7);
  a.key = noise_key(seed, sample_offset, kStreamStep);
  a.prediction_type = static_cast<int>(prediction_type);
  a.variance_type = static_cast<int>(variance_type);
  a.clip = clip_sample;
  a.clip_range = static_cast<float>(clip_range);
  cpu::ddpm_step(a);
}

void dpmpp_step_cpu(const at::Tensor& x_t, const at::Tensor& model_output, const std::optional<at::Tensor>& x0_last,
                    const at::Tensor& coeffs, const at::Tensor& out, const at::Tensor& x0_out,
                    const std::optional<at::Tensor>& x0_last2, const std::optional<at::Tensor>& x0_last3,
                    const std::optional<at::Tensor>& last_sample, const std::optional<at::Tensor>& sample_out,
                    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& t, int64_t seed,
                    int64_t sample_offset) {
  auto ptr = [](const std::optional<at::Tensor>& o) { return o ? &*o : nullptr; };
  const at::Tensor *d1 = ptr(x0_last), *d2 = ptr(x0_last2), *d3 = ptr(x0_last3), *l = ptr(last_sample),
                   *y = ptr(sample_out), *z = ptr(noise);
  TORCH_CHECK((d2 == nullptr || d1 != nullptr) && (d3 == nullptr || d2 != nullptr),
              "ddpm_fast: dpmpp_step's history is x0_last, x0_last2, x0_last3 in that order");
  TORCH_CHECK((l == nullptr) == (y == nullptr), "ddpm_fast: dpmpp_step's last_sample and sample_out come together");
  cpu::DpmppArgs a;
  a.geo = geometry(x_t, {&model_output, d1, d2, d3, l, y, z, &out, &x0_out});
  a.dtype = dtype_of(x_t);
  a.x = x_t.data_ptr();
  a.model_output = model_output.data_ptr();
  a.x0_last = d1 ? d1->data_ptr() : nullptr;
  a.x0_last2 = d2 ? d2->data_ptr() : nullptr;
  a.x0_last3 = d3 ? d3->data_ptr() : nullptr;
  a.last_sample = l ? l->data_ptr() : nullptr;
  a.sample_out = y ? y->data_ptr() : nullptr;
  a.noise = z ? z->data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.x0_out = x0_out.data_ptr();
  const float* k = coeff_table(coeffs, a.geo.batch, cpu::kDpmppColumns);
  TORCH_CHECK(k != nullptr, "ddpm_fast: dpmpp_step needs its (batch, 14) coefficients");
  const int have = d3 ? 3 : d2 ? 2 : d1 ? 1 : 0;
  for (int64_t b = 0; b < a.geo.batch; ++b)
    TORCH_CHECK(cpu::dpmpp_history_needed(k + cpu::kDpmppColumns * b, y != nullptr) <= have,
                "ddpm_fast: dpmpp_step's coefficients read more history than was given");
  a.coeffs = k;
  if (t) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == a.geo.batch && t->is_contiguous() &&
                    t->device().is_cpu(),
                "ddpm_fast: t must be a contiguous int64 CPU tensor of shape (batch,)");
    a.t = t->data_ptr<int64_t>();
    a.key = noise_key(seed, sample_offset, kStreamStep);
  }
  cpu::dpmpp_step(a);
}

void q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& alphas_cumprod,
                  const std::optional<at::Tensor>& coeffs, const at::Tensor& noise, bool generate_noise, int64_t seed,
                  int64_t sample_offset, const at::Tensor& out) {
  cpu::QSampleArgs a;
  a.geo = geometry(x0, {&noise, &out});
  check_timesteps(t, alphas_cumprod, a.geo.batch);
  a.dtype = dtype_of(x0);
  a.x0 = x0.data_ptr();
  a.noise = noise.data_ptr();
  a.generate_noise = generate_noise;
  a.out = out.data_ptr();
  a.t = t.data_ptr<int64_t>();
  a.abar = alphas_cumprod.data_ptr<double>();
  a.coeffs = coeff_table(coeffs, a.geo.batch, 2);
  a.key = noise_key(seed, sample_offset, kStreamQSample);
  cpu::q_sample(a);
}

// Small per-channel operands as contiguous fp32 (the kernel's maths precision).
at::Tensor as_f32(const std::optional<at::Tensor>& t, std::initializer_list<int64_t> shape, const char* name) {
  if (!t) return {};
  TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), "ddpm_fast: ", name, " has the wrong shape");
  TORCH_CHECK(t->device().is_cpu(), "ddpm_fast: ", name, " must be on the CPU");
  return t->to(at::kFloat).contiguous();
}

// The forward; with mean and rstd ((B, G) fp32) it also keeps each group's statistics for the backward.
void run_group_norm(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, double eps,
                    bool silu, const at::Tensor& out, const at::Tensor* mean, const at::Tensor* rstd) {
  TORCH_CHECK(x.dim() >= 2, "ddpm_fast: group_norm_silu expects (B, C, ...)");
  const Geometry geo = geometry(x, {&out});
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "ddpm_fast: channels not divisible by groups");
  for (const at::Tensor* t : {mean, rstd})
    TORCH_CHECK(!t || (t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == B * groups),
                "ddpm_fast: mean and rstd must be contiguous fp32 (B, groups)");
  const at::Tensor w = as_f32(weight, {C}, "weight"), b = as_f32(bias, {C}, "bias"), a = as_f32(add, {B, C}, "add");
  cpu::GroupNormArgs args;
  args.batch = B;
  args.channels = C;
  args.spatial = x.numel() / (B * C);
  args.nhwc = geo.nhwc;
  args.dtype = dtype_of(x);
  args.x = x.data_ptr();
  args.out = out.data_ptr();
  args.weight = w.defined() ? w.data_ptr<float>() : nullptr;
  args.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  args.add = a.defined() ? a.data_ptr<float>() : nullptr;
  args.groups = groups;
  args.eps = static_cast<float>(eps);
  args.silu = silu;
  args.mean = mean ? mean->data_ptr<float>() : nullptr;
  args.rstd = rstd ? rstd->data_ptr<float>() : nullptr;
  cpu::group_norm(args);
}

void group_norm_silu_cpu(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, double eps,
                         bool silu, const at::Tensor& out) {
  run_group_norm(x, groups, weight, bias, add, eps, silu, out, nullptr, nullptr);
}

void group_norm_silu_train_cpu(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add,
                               double eps, bool silu, const at::Tensor& out, const at::Tensor& mean,
                               const at::Tensor& rstd) {
  run_group_norm(x, groups, weight, bias, add, eps, silu, out, &mean, &rstd);
}

void group_norm_silu_backward_cpu(const at::Tensor& x, const at::Tensor& grad, int64_t groups,
                                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& add, const at::Tensor& mean,
                                  const at::Tensor& rstd, bool silu, const at::Tensor& grad_x,
                                  const at::Tensor& sums) {
  TORCH_CHECK(x.dim() >= 2, "ddpm_fast: group_norm_silu_backward expects (B, C, ...)");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "ddpm_fast: group_norm_silu_backward takes fp32");
  const Geometry geo = geometry(x, {&grad, &grad_x});
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "ddpm_fast: channels not divisible by groups");
  for (const at::Tensor* t : {&mean, &rstd})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == B * groups,
                "ddpm_fast: mean and rstd must be contiguous fp32 (B, groups)");
  TORCH_CHECK(sums.scalar_type() == at::kFloat && sums.is_contiguous() && sums.numel() == B * C * 3,
              "ddpm_fast: sums must be contiguous fp32 (B, C, 3)");
  const at::Tensor w = as_f32(weight, {C}, "weight"), b = as_f32(bias, {C}, "bias"), a = as_f32(add, {B, C}, "add");
  cpu::GroupNormBackwardArgs args;
  args.batch = B;
  args.channels = C;
  args.spatial = x.numel() / (B * C);
  args.nhwc = geo.nhwc;
  args.x = x.data_ptr<float>();
  args.grad = grad.data_ptr<float>();
  args.weight = w.defined() ? w.data_ptr<float>() : nullptr;
  args.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  args.add = a.defined() ? a.data_ptr<float>() : nullptr;
  args.mean = mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.groups = groups;
  args.silu = silu;
  args.grad_x = grad_x.data_ptr<float>();
  args.sums = sums.data_ptr<float>();
  cpu::group_norm_backward(args);
}

// The forward; with lse ((B, H, N) contiguous fp32) it also keeps each query's log-sum-exp for the backward.
void run_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                   const std::optional<at::Tensor>& residual, const at::Tensor& out, const at::Tensor* lse) {
  for (const at::Tensor* t : {&q, &k, &v, &out}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(3) == 1,
                "ddpm_fast: attention expects float32 CPU (B, H, N, D) tensors with a contiguous last dim");
  }
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "ddpm_fast: attention: k shape mismatch");
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == M, "ddpm_fast: attention: v shape mismatch");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({B, H, N, Dv}), "ddpm_fast: attention: out shape mismatch");
  cpu::AttentionArgs a;
  a.batch = B;
  a.heads = H;
  a.q_len = N;
  a.kv_len = M;
  a.head_dim = D;
  a.v_dim = Dv;
  a.q = q.data_ptr<float>();
  a.k = k.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.residual = nullptr;
  auto strides = [](const at::Tensor& t, int64_t* dst) {
    for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
  };
  strides(q, a.q_strides);
  strides(k, a.k_strides);
  strides(v, a.v_strides);
  strides(out, a.out_strides);
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == at::kFloat && residual->stride(3) == 1,
                "ddpm_fast: attention: residual must match out with a contiguous last dim");
    a.residual = residual->data_ptr<float>();
    strides(*residual, a.res_strides);
  }
  a.scale = static_cast<float>(scale);
  if (lse) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() && lse->sizes() == at::IntArrayRef({B, H, N}),
                "ddpm_fast: attention: lse must be contiguous fp32 (B, H, N)");
    a.lse = lse->data_ptr<float>();
  }
  cpu::attention(a);
}

void attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                   const std::optional<at::Tensor>& residual, const at::Tensor& out) {
  run_attention(q, k, v, scale, residual, out, nullptr);
}

void attention_train_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                         const std::optional<at::Tensor>& residual, const at::Tensor& out, const at::Tensor& lse) {
  run_attention(q, k, v, scale, residual, out, &lse);
}

// dq, dk, dv of attention from the forward's out (without the residual) and lse (attention_backward.cpp). Every
// operand is read and written through its batch, head and row strides; rows must not overlap (the products run
// in the BLAS, whose leading dimensions are at least a row).
void attention_backward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& grad_out, const at::Tensor& lse, double scale, const at::Tensor& grad_q,
                            const at::Tensor& grad_k, const at::Tensor& grad_v) {
  for (const at::Tensor* t : {&q, &k, &v, &out, &grad_out, &grad_q, &grad_k, &grad_v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(3) == 1 &&
                    t->numel() > 0,
                "ddpm_fast: attention_backward expects non-empty float32 CPU (B, H, N, D) tensors with a contiguous "
                "last dim");
    TORCH_CHECK(t->size(2) == 1 || t->stride(2) >= t->size(3), "ddpm_fast: attention_backward: rows must not overlap");
  }
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.sizes() == at::IntArrayRef({B, H, M, D}) && grad_k.sizes() == k.sizes(),
              "ddpm_fast: attention_backward: k shape mismatch");
  TORCH_CHECK(v.sizes() == at::IntArrayRef({B, H, M, Dv}) && grad_v.sizes() == v.sizes(),
              "ddpm_fast: attention_backward: v shape mismatch");
  TORCH_CHECK(grad_q.sizes() == q.sizes(), "ddpm_fast: attention_backward: grad_q shape mismatch");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({B, H, N, Dv}) && grad_out.sizes() == out.sizes(),
              "ddpm_fast: attention_backward: out shape mismatch");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == at::IntArrayRef({B, H, N}),
              "ddpm_fast: attention_backward: lse must be contiguous fp32 (B, H, N)");
  cpu::AttentionBackwardArgs a;
  a.batch = B;
  a.heads = H;
  a.q_len = N;
  a.kv_len = M;
  a.head_dim = D;
  a.v_dim = Dv;
  a.q = q.data_ptr<float>();
  a.k = k.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.grad_out = grad_out.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.grad_q = grad_q.data_ptr<float>();
  a.grad_k = grad_k.data_ptr<float>();
  a.grad_v = grad_v.data_ptr<float>();
  auto strides = [](const at::Tensor& t, int64_t* dst) {  // a single row's stride: any value will do, a row's width
    dst[0] = t.stride(0);
    dst[1] = t.stride(1);
    dst[2] = t.size(2) == 1 ? t.size(3) : t.stride(2);
  };
  strides(q, a.q_strides);
  strides(k, a.k_strides);
  strides(v, a.v_strides);
  strides(out, a.out_strides);
  strides(grad_out, a.go_strides);
  strides(grad_q, a.gq_strides);
  strides(grad_k, a.gk_strides);
  strides(grad_v, a.gv_strides);
  a.scale = static_cast<float>(scale);
  cpu::attention_backward(a);
}

at::Tensor winograd_weight_cpu(const at::Tensor& w, int64_t tile, bool rotated) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.scalar_type() == at::kFloat &&
                  w.device().is_cpu(),
              "ddpm_fast: winograd_weight expects a float32 CPU (K, C, 3, 3) weight");
  TORCH_CHECK(tile == 2 || tile == 4, "ddpm_fast: winograd_weight: tile must be 2 or 4");
  const at::Tensor wc = w.contiguous();
  const int64_t K = w.size(0), C = w.size(1);
  at::Tensor u = at::empty({(tile + 2) * (tile + 2), rotated ? K : C, rotated ? C : K}, w.options());
  (tile == 4 ? cpu::winograd_weight_transform_4x4 : cpu::winograd_weight_transform)(wc.data_ptr<float>(), K, C,
                                                                                     u.data_ptr<float>(), rotated);
  return u;
}

void conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "ddpm_fast: conv3x3 expects a float32 channels_last CPU input");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(u.dim() == 3 && (u.size(0) == 16 || u.size(0) == 36) && u.size(1) == C && u.is_contiguous() &&
                  u.scalar_type() == at::kFloat,
              "ddpm_fast: conv3x3: transformed weight must be (16, C, K) or (36, C, K) float32");
  const int64_t K = u.size(2);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({N, K, H, W}) && out.scalar_type() == at::kFloat &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "ddpm_fast: conv3x3: out must be a float32 channels_last (N, K, H, W) tensor");
  TORCH_CHECK(!out.is_alias_of(x), "ddpm_fast: conv3x3: out must not alias x");
  cpu::WinogradArgs a;
  a.batch = N;
  a.height = H;
  a.width = W;
  a.in_channels = C;
  a.out_channels = K;
  a.tile = u.size(0) == 36 ? 4 : 2;
  a.x = x.data_ptr<float>();
  a.u = u.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.bias = nullptr;
  a.residual = nullptr;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K && bias->is_contiguous() && bias->scalar_type() == at::kFloat,
                "ddpm_fast: conv3x3: bias must be a contiguous float32 (K,) tensor");
    a.bias = bias->data_ptr<float>();
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == at::kFloat &&
                    residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                "ddpm_fast: conv3x3: residual must be a float32 channels_last tensor shaped like out");
    a.residual = residual->data_ptr<float>();
  }
  cpu::winograd_conv3x3(a);
}

at::Tensor winograd_weight_bf16_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.is_floating_point() && w.device().is_cpu(),
              "ddpm_fast: winograd_weight_bf16 expects a floating-point CPU (K, C, 3, 3) weight");
  const int64_t K = w.size(0), C = w.size(1), NB = cpu::kBf16Block;
  const at::Tensor wf = w.to(at::kFloat).contiguous();  // the transform in fp32, one rounding to bf16 after it
  at::Tensor u = at::empty({16, C, K}, wf.options());
  cpu::winograd_weight_transform(wf.data_ptr<float>(), K, C, u.data_ptr<float>());
  at::Tensor packed = at::empty({16, (K + NB - 1) / NB, (C + 1) / 2, NB, 2}, w.options().dtype(at::kBFloat16));
  cpu::winograd_pack_bf16(u.data_ptr<float>(), K, C, packed.data_ptr<at::BFloat16>());
  return packed;
}

void conv3x3_winograd_bf16_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu() &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "ddpm_fast: conv3x3_bf16 expects a bfloat16 channels_last CPU input");
  TORCH_CHECK(*cpu::bf16_instructions() != '\0',
              "ddpm_fast: conv3x3_bf16 needs a CPU with AVX512-BF16 or AMX-BF16");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == N && out.size(2) == H && out.size(3) == W &&
                  out.scalar_type() == at::kBFloat16 && out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "ddpm_fast: conv3x3_bf16: out must be a bfloat16 channels_last (N, K, H, W) tensor");
  const int64_t K = out.size(1), NB = cpu::kBf16Block;
  TORCH_CHECK(u.dim() == 5 && u.size(0) == 16 && u.size(1) == (K + NB - 1) / NB && u.size(2) == (C + 1) / 2 &&
                  u.size(3) == NB && u.size(4) == 2 && u.is_contiguous() && u.scalar_type() == at::kBFloat16,
              "ddpm_fast: conv3x3_bf16: packed weight must be winograd_weight_bf16 of a (K, C, 3, 3) weight");
  TORCH_CHECK(!out.is_alias_of(x), "ddpm_fast: conv3x3_bf16: out must not alias x");
  cpu::WinogradBf16Args a;
  a.batch = N;
  a.height = H;
  a.width = W;
  a.in_channels = C;
  a.out_channels = K;
  a.x = x.data_ptr<at::BFloat16>();
  a.u = u.data_ptr<at::BFloat16>();
  a.out = out.data_ptr<at::BFloat16>();
  a.bias = nullptr;
  a.residual = nullptr;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K && bias->is_contiguous() && bias->scalar_type() == at::kFloat,
                "ddpm_fast: conv3x3_bf16: bias must be a contiguous float32 (K,) tensor");
    a.bias = bias->data_ptr<float>();
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == at::kBFloat16 &&
                    residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                "ddpm_fast: conv3x3_bf16: residual must be a bfloat16 channels_last tensor shaped like out");
    a.residual = residual->data_ptr<at::BFloat16>();
  }
  cpu::winograd_conv3x3_bf16(a);
}

void keyed_normal_cpu(const at::Tensor& t, int64_t seed, int64_t sample_offset, int64_t stream, const at::Tensor& out) {
  cpu::NormalArgs a;
  a.geo = geometry(out, {});
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == a.geo.batch && t.is_contiguous(),
              "ddpm_fast: t must be a contiguous int64 tensor of shape (batch,)");
  TORCH_CHECK(stream >= 0 && stream <= 0xffffffffLL, "ddpm_fast: stream must fit in 32 bits");
  a.dtype = dtype_of(out);
  a.out = out.data_ptr();
  a.t = t.data_ptr<int64_t>();
  a.key = noise_key(seed, sample_offset, static_cast<uint32_t>(stream));
  cpu::keyed_normal(a);
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY(ddpm_fast, m) {
  m.def(
      "ddpm_step(Tensor x_t, Tensor model_output, Tensor t, Tensor? t_prev, Tensor alphas_cumprod, Tensor? coeffs, "
      "Tensor? noise, int seed, "
      "int sample_offset, int prediction_type, int variance_type, bool clip_sample, float clip_range, "
      "Tensor(a!) out, Tensor(b!)? x0_out) -> ()");
  m.def(
      "q_sample(Tensor x0, Tensor t, Tensor alphas_cumprod, Tensor? coeffs, Tensor(a!) noise, bool generate_noise, "
      "int seed, "
      "int sample_offset, Tensor(b!) out) -> ()");
  m.def(
      "dpmpp_step(Tensor x_t, Tensor model_output, Tensor? x0_last, Tensor coeffs, Tensor(a!) out, Tensor(b!) x0_out, "
      "Tensor? x0_last2=None, Tensor? x0_last3=None, Tensor? last_sample=None, Tensor(c!)? sample_out=None, "
      "Tensor? noise=None, Tensor? t=None, int seed=0, int sample_offset=0) -> ()");
  m.def("keyed_normal(Tensor t, int seed, int sample_offset, int stream, Tensor(a!) out) -> ()");
  m.def(
      "group_norm_silu(Tensor x, int groups, Tensor? weight, Tensor? bias, Tensor? add, float eps, bool silu, "
      "Tensor(a!) out) -> ()");
  m.def(
      "group_norm_silu_train(Tensor x, int groups, Tensor? weight, Tensor? bias, Tensor? add, float eps, bool silu, "
      "Tensor(a!) out, Tensor(b!) mean, Tensor(c!) rstd) -> ()");
  m.def(
      "group_norm_silu_backward(Tensor x, Tensor grad, int groups, Tensor? weight, Tensor? bias, Tensor? add, "
      "Tensor mean, Tensor rstd, bool silu, Tensor(a!) grad_x, Tensor(b!) sums) -> ()");
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? residual, Tensor(a!) out) -> ()");
  m.def(
      "attention_train(Tensor q, Tensor k, Tensor v, float scale, Tensor? residual, Tensor(a!) out, Tensor(b!) lse) "
      "-> ()");
  m.def(
      "attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor grad_out, Tensor lse, float scale, "
      "Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v) -> ()");
  m.def("winograd_weight(Tensor w, int tile=2, bool rotated=False) -> Tensor");
  m.def("conv3x3(Tensor x, Tensor u, Tensor? bias, Tensor? residual, Tensor(a!) out) -> ()");
  m.def("winograd_weight_bf16(Tensor w) -> Tensor");
  m.def("conv3x3_bf16(Tensor x, Tensor u, Tensor? bias, Tensor? residual, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("ddpm_step", &ddpm_fast::ddpm_step_cpu);
  m.impl("dpmpp_step", &ddpm_fast::dpmpp_step_cpu);
  m.impl("q_sample", &ddpm_fast::q_sample_cpu);
  m.impl("keyed_normal", &ddpm_fast::keyed_normal_cpu);
  m.impl("group_norm_silu", &ddpm_fast::group_norm_silu_cpu);
  m.impl("group_norm_silu_train", &ddpm_fast::group_norm_silu_train_cpu);
  m.impl("group_norm_silu_backward", &ddpm_fast::group_norm_silu_backward_cpu);
  m.impl("attention", &ddpm_fast::attention_cpu);
  m.impl("attention_train", &ddpm_fast::attention_train_cpu);
  m.impl("attention_backward", &ddpm_fast::attention_backward_cpu);
  m.impl("winograd_weight", &ddpm_fast::winograd_weight_cpu);
  m.impl("conv3x3", &ddpm_fast::conv3x3_winograd_cpu);
  m.impl("winograd_weight_bf16", &ddpm_fast::winograd_weight_bf16_cpu);
  m.impl("conv3x3_bf16", &ddpm_fast::conv3x3_winograd_bf16_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddpm_fast CPU kernels (ops registered under torch.ops.ddpm_fast)";
  m.def("capability", &ddpm_fast::cpu::capability, "instruction set the kernels were compiled for");
  m.def("gemm_library", &ddpm_fast::cpu::gemm_library, "library of the Winograd products: onednn or blas");
  m.def("bf16_instructions", &ddpm_fast::cpu::bf16_instructions,
        "the CPU's bf16 matrix instructions the bf16 Winograd products use: amx_bf16, avx512_bf16 or empty");
  // The scalar HOST_DEVICE functions of csrc/common/philox.h that the CUDA kernels use, compiled for the host
  // so the CPU tests can check them (known-answer vectors, and equality with the reference noise).
  m.def("philox4x32_10", [](std::array<uint32_t, 4> counter, uint32_t k0, uint32_t k1) {
    ddpm_fast::philox4x32_10(counter.data(), ddpm_fast::PhiloxKey{k0, k1});
    return counter;
  });
  m.def("philox_normal4", [](uint64_t seed, uint32_t i4, uint32_t g, uint32_t t, uint32_t stream) {
    std::array<float, 4> z;
    ddpm_fast::philox_normal4(ddpm_fast::philox_key(seed), i4, g, t, stream, z.data());
    return z;
  });
}
