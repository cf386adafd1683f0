// Torch glue of the CUDA kernels (ddpm_fast._C_cuda, built by setup.py only when torch has CUDA): checks the
// tensors, passes raw pointers and torch's current stream (so the kernels are captured by CUDA graphs and order
// with torch's own work), and registers CUDA implementations of the ops the CPU extension defines
// (csrc/bindings.cpp), under the same schemas. Inputs are validated in Python with readable messages first.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>

#include "common/coefficients.h"
#include "cuda/launch.h"

namespace ddpm_fast {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "ddpm_fast cuda: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// x's dense layout; every other tensor must have x's shape, dtype, device and that layout.
cuda::Layout layout_of(const at::Tensor& x, std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(x.is_cuda(), "ddpm_fast cuda: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() >= 1 && x.numel() > 0, "ddpm_fast cuda: expected a non-empty batch");
  const bool nchw = x.is_contiguous();
  const bool nhwc = !nchw && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nchw || nhwc, "ddpm_fast cuda: expected a contiguous or channels_last tensor");
  for (const at::Tensor* o : others) {
    if (!o) continue;
    TORCH_CHECK(o->sizes() == x.sizes() && o->scalar_type() == x.scalar_type() && o->device() == x.device(),
                "ddpm_fast cuda: shape, dtype and device must match x");
    TORCH_CHECK(nhwc ? o->is_contiguous(at::MemoryFormat::ChannelsLast) : o->is_contiguous(),
                "ddpm_fast cuda: tensors must share x's dense layout");
  }
  cuda::Layout g;
  g.batch = x.size(0);
  g.numel_per_sample = x.numel() / g.batch;
  g.channels = x.dim() >= 2 ? x.size(1) : 1;
  g.spatial = nhwc ? x.size(2) * x.size(3) : 1;
  g.nhwc = nhwc;
  return g;
}

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

// t (and t_prev, abar, a given coefficient table) arrive on the host, as the Python side passes them to the CPU
// kernels too: the per-sample coefficients are computed here with csrc/common/coefficients.h (the CPU kernels'
// own functions), then the (B, 9) or (B, 2) table and t go to the device in one small copy each.
void check_host_schedule(const at::Tensor& t, const at::Tensor& abar, int64_t batch) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == batch && t.is_contiguous() && t.is_cpu(),
              "ddpm_fast cuda: t must be a contiguous int64 CPU tensor of shape (batch,)");
  TORCH_CHECK(abar.scalar_type() == at::kDouble && abar.dim() == 1 && abar.is_contiguous() && abar.is_cpu(),
              "ddpm_fast cuda: alphas_cumprod must be a contiguous float64 CPU tensor");
  const auto [lo, hi] = at::aminmax(t);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < abar.size(0), "ddpm_fast cuda: t out of range");
}

const float* host_table(const std::optional<at::Tensor>& c, int64_t batch, int64_t n) {
  if (!c) return nullptr;
  TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_cpu() && c->is_contiguous() &&
                  c->sizes() == at::IntArrayRef({batch, n}),
              "ddpm_fast cuda: coefficients must be a contiguous float32 CPU tensor of shape (batch, ", n, ")");
  return c->data_ptr<float>();
}

void ddpm_step_cuda(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
                    const std::optional<at::Tensor>& t_prev, const at::Tensor& abar,
                    const std::optional<at::Tensor>& coeffs, const std::optional<at::Tensor>& noise, int64_t seed,
                    int64_t sample_offset, int64_t prediction_type, int64_t variance_type, bool clip,
                    double clip_range, const at::Tensor& out, const std::optional<at::Tensor>& x0_out) {
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::StepParams p;
  p.geo = layout_of(x, {&m, opt(noise), &out, opt(x0_out)});
  const int64_t B = p.geo.batch;
  check_host_schedule(t, abar, B);
  if (t_prev)
    TORCH_CHECK(t_prev->scalar_type() == at::kLong && t_prev->sizes() == t.sizes() && t_prev->is_contiguous() &&
                    t_prev->is_cpu(),
                "ddpm_fast cuda: t_prev must be a contiguous int64 CPU tensor shaped like t");
  const float* given = host_table(coeffs, B, 7);
  const int64_t* th = t.data_ptr<int64_t>();
  const int64_t* tp = t_prev ? t_prev->data_ptr<int64_t>() : nullptr;
  const double* ab = abar.data_ptr<double>();
  if (tp)
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(tp[b] >= -1 && tp[b] < abar.size(0), "ddpm_fast cuda: t_prev out of range");
  at::Tensor table = at::empty({B, 9}, at::TensorOptions().dtype(at::kFloat));
  float* tb = table.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const StepCoeffs k = step_coeffs_for(th[b], tp ? tp[b] : th[b] - 1, ab, given ? given + 7 * b : nullptr,
                                         static_cast<int>(prediction_type), static_cast<int>(variance_type));
    const float row[9] = {k.px, k.pm, k.q, k.c0, k.c1, k.cm, k.kx, k.km, k.sigma};
    std::copy(row, row + 9, tb + 9 * b);
  }
  const at::Tensor table_dev = table.to(x.device()), t_dev = t.to(x.device());
  p.dtype = dtype_of(x);
  p.x = x.data_ptr();
  p.m = m.data_ptr();
  p.noise = noise ? noise->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.x0_out = x0_out ? x0_out->data_ptr() : nullptr;
  p.coeffs = table_dev.data_ptr<float>();
  p.t = t_dev.data_ptr<int64_t>();
  p.seed = static_cast<uint64_t>(seed);
  p.sample_offset = sample_offset;
  p.clip = clip;
  p.clip_range = static_cast<float>(clip_range);
  C10_CUDA_CHECK(cuda::ddpm_step(p, c10::cuda::getCurrentCUDAStream()));
}

void q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,
                   const std::optional<at::Tensor>& coeffs, const at::Tensor& noise, bool generate, int64_t seed,
                   int64_t sample_offset, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x0.device());
  cuda::QSampleParams p;
  p.geo = layout_of(x0, {&noise, &out});
  const int64_t B = p.geo.batch;
  check_host_schedule(t, abar, B);
  const float* given = host_table(coeffs, B, 2);
  const int64_t* th = t.data_ptr<int64_t>();
  at::Tensor table = at::empty({B, 2}, at::TensorOptions().dtype(at::kFloat));
  float* tb = table.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const QSampleCoeffs k = q_sample_coeffs_for(th[b], abar.data_ptr<double>(), given ? given + 2 * b : nullptr);
    tb[2 * b] = k.a;
    tb[2 * b + 1] = k.b;
  }
  const at::Tensor table_dev = table.to(x0.device()), t_dev = t.to(x0.device());
  p.dtype = dtype_of(x0);
  p.x0 = x0.data_ptr();
  p.noise = noise.data_ptr();
  p.out = out.data_ptr();
  p.coeffs = table_dev.data_ptr<float>();
  p.t = t_dev.data_ptr<int64_t>();
  p.seed = static_cast<uint64_t>(seed);
  p.sample_offset = sample_offset;
  p.generate = generate;
  C10_CUDA_CHECK(cuda::q_sample(p, c10::cuda::getCurrentCUDAStream()));
}

void keyed_normal_cuda(const at::Tensor& t, int64_t seed, int64_t sample_offset, int64_t stream,
                       const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::NormalParams p;
  p.geo = layout_of(out, {});
  TORCH_CHECK(t.device() == out.device() && t.scalar_type() == at::kLong && t.is_contiguous() &&
                  t.numel() == out.size(0),
              "ddpm_fast cuda: t must be a contiguous int64 (B,) tensor on out's device");
  TORCH_CHECK(stream >= 0 && stream <= 0xffffffffLL, "ddpm_fast cuda: stream must fit in 32 bits");
  p.dtype = dtype_of(out);
  p.out = out.data_ptr();
  p.t = t.data_ptr<int64_t>();
  p.seed = static_cast<uint64_t>(seed);
  p.sample_offset = sample_offset;
  p.stream = static_cast<uint32_t>(stream);
  C10_CUDA_CHECK(cuda::keyed_normal(p, c10::cuda::getCurrentCUDAStream()));
}

void group_norm_silu_cuda(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, double eps,
                          bool silu, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() >= 2, "ddpm_fast cuda: group_norm_silu expects (B, C, ...)");
  const cuda::Layout g = layout_of(x, {&out});
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "ddpm_fast cuda: channels must be divisible by groups");
  auto fp32 = [&](const std::optional<at::Tensor>& v, at::IntArrayRef shape) -> at::Tensor {
    if (!v) return at::Tensor();
    TORCH_CHECK(v->sizes() == shape && v->device() == x.device(), "ddpm_fast cuda: group_norm_silu: bad ",
                "weight/bias/add shape or device");
    return v->to(at::kFloat).contiguous();
  };
  const at::Tensor w = fp32(weight, {C}), b = fp32(bias, {C}), a = fp32(add, {B, C});
  cuda::GroupNormParams p;
  p.batch = B;
  p.channels = C;
  p.spatial = x.numel() / (B * C);
  p.groups = groups;
  p.nhwc = g.nhwc;
  p.dtype = dtype_of(x);
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.weight = w.defined() ? w.data_ptr<float>() : nullptr;
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.add = a.defined() ? a.data_ptr<float>() : nullptr;
  p.eps = static_cast<float>(eps);
  p.silu = silu;
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(cuda::group_norm_workspace_floats(p))}, x.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  C10_CUDA_CHECK(cuda::group_norm_silu(p, c10::cuda::getCurrentCUDAStream()));
}

void attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                    const std::optional<at::Tensor>& residual, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(q.device());
  for (const at::Tensor* t : {&q, &k, &v, &out, opt(residual)}) {
    if (!t) continue;
    TORCH_CHECK(t->dim() == 4 && t->device() == q.device() && t->scalar_type() == q.scalar_type() &&
                    t->stride(3) == 1 && t->stride(2) % 2 == 0 &&
                    reinterpret_cast<uintptr_t>(t->data_ptr()) % 4 == 0,
                "ddpm_fast cuda: attention expects (B, H, N, D) tensors of q's dtype and device with a contiguous "
                "last dim, even row strides and 4-byte aligned data");
  }
  cuda::AttentionParams a;
  a.batch = q.size(0);
  a.heads = q.size(1);
  a.q_len = q.size(2);
  a.head_dim = q.size(3);
  a.kv_len = k.size(2);
  a.v_dim = v.size(3);
  a.dtype = dtype_of(q);
  TORCH_CHECK(cuda::attention_supported(a.dtype, a.head_dim, a.v_dim),
              "ddpm_fast cuda: attention runs fp16/bf16 with head dims 64, 128 or 256 (v's equal to q's)");
  TORCH_CHECK(k.size(0) == a.batch && k.size(1) == a.heads && k.size(3) == a.head_dim && v.size(2) == a.kv_len &&
                  v.size(0) == a.batch && v.size(1) == a.heads,
              "ddpm_fast cuda: attention: q, k, v shapes do not match");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({a.batch, a.heads, a.q_len, a.v_dim}),
              "ddpm_fast cuda: attention: out shape mismatch");
  auto strides = [](const at::Tensor& t, int64_t* dst) {
    for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
  };
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  strides(q, a.q_strides);
  strides(k, a.k_strides);
  strides(v, a.v_strides);
  strides(out, a.out_strides);
  a.residual = nullptr;
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "ddpm_fast cuda: attention: residual must match out");
    a.residual = residual->data_ptr();
    strides(*residual, a.res_strides);
  }
  a.scale = static_cast<float>(scale);
  C10_CUDA_CHECK(cuda::attention(a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("ddpm_step", &ddpm_fast::ddpm_step_cuda);
  m.impl("q_sample", &ddpm_fast::q_sample_cuda);
  m.impl("keyed_normal", &ddpm_fast::keyed_normal_cuda);
  m.impl("group_norm_silu", &ddpm_fast::group_norm_silu_cuda);
  m.impl("attention", &ddpm_fast::attention_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddpm_fast CUDA kernels (ops registered under torch.ops.ddpm_fast for CUDA tensors)";
}
