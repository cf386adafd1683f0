"""The CUDA kernels (csrc/cuda through ddpm_fast._C_cuda) against the reference and the Triton kernels.

They need a GPU and a CUDA build of torch: skipped elsewhere (benchmarks/gpu_check.sh runs them on a GPU
machine). On this repository's CPU machines the same sources are compiled for sm_80/sm_90 and the glue is
type-checked against torch's headers (tests/test_cuda_sources.py).
"""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import OPTIONS, assert_fp32_close, assert_lowp_close, needs_cuda

pytestmark = needs_cuda
S = df.NoiseSchedule.linear(1000, 1e-4, 0.02)


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(1.5 * torch.randn(shape, generator=g)).to(dtype).cuda() for _ in range(3)]


@pytest.mark.parametrize("pt, vt, clip", OPTIONS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_ddpm_step(pt, vt, clip, channels_last):
    x, m, z = _inputs((3, 5, 7, 9))
    if channels_last:
        x, m, z = (a.contiguous(memory_format=torch.channels_last) for a in (x, m, z))
    t = torch.tensor([0, 500, 999])
    kw = dict(prediction_type=pt, variance_type=vt, clip_sample=clip, clip_range=1.5)
    out = df.ops.ddpm_step(x, m, t, S, z, backend="cuda", **kw)
    want = ref.ddpm_step(x.cpu(), m.cpu(), t, S, z.cpu(), **kw)
    assert_fp32_close(f"cuda ddpm_step {pt} {vt} clip={clip} cl={channels_last}", out.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ddpm_step_low_precision(dtype):
    x, m, z = _inputs((2, 3, 8, 8), dtype)
    out = df.ops.ddpm_step(x, m, 400, S, z, backend="cuda", clip_sample=True)
    want = ref.ddpm_step(x.float().cpu(), m.float().cpu(), 400, S, z.float().cpu(), clip_sample=True)
    low = ref.ddpm_step(x.cpu(), m.cpu(), 400, S, z.cpu(), clip_sample=True)
    assert_lowp_close(f"cuda ddpm_step {dtype}", out.float().cpu(), want, low.float())


@pytest.mark.parametrize("channels_last", [False, True])
def test_keyed_noise_equals_the_other_backends(channels_last):
    shape = (3, 4, 6, 10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for stream in (0, 1, 2):
        cuda = df.ops.keyed_normal(
            shape, seed=77, t=321, stream=stream, sample_offset=5, device="cuda", memory_format=fmt, backend="cuda"
        )
        want = ref.keyed_normal(shape, 77, torch.full((3,), 321), stream, 5)
        err = (cuda.cpu() - want).abs().max().item()
        print(f"cuda keyed noise stream {stream} cl={channels_last}: max err vs reference {err:.2e}")
        assert err <= 1e-5
    x, m, _ = _inputs(shape)
    a = df.ops.ddpm_step(x, m, 700, S, seed=9, backend="cuda")
    b = df.ops.ddpm_step(x, m, 700, S, seed=9, backend="triton")
    assert (a - b).abs().max().item() <= 1e-5


def test_q_sample_given_and_keyed():
    x0, eps, _ = _inputs((4, 3, 9, 5))
    t = torch.tensor([0, 10, 500, 999])
    out = df.ops.q_sample(x0, t, eps, S, backend="cuda")
    assert_fp32_close("cuda q_sample", out.cpu(), ref.q_sample(x0.cpu(), t, eps.cpu(), S))
    x_t, drawn = df.ops.q_sample(x0, t, None, S, seed=3, backend="cuda")
    assert_fp32_close("cuda q_sample keyed", x_t.cpu(), ref.q_sample(x0.cpu(), t, drawn.cpu(), S))
    assert (drawn.cpu() - ref.keyed_normal(x0.shape, 3, t, 1, 0)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "shape, groups", [((2, 64, 8, 8), 32), ((3, 96, 15, 15), 32), ((1, 12, 1, 1), 4), ((2, 256, 64, 64), 32)]
)  # the last takes the two-pass path
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_add", [False, True])
def test_group_norm_silu(shape, groups, channels_last, with_add):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).cuda()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w, b = torch.randn(C, generator=g).cuda(), torch.randn(C, generator=g).cuda()
    add = torch.randn(shape[:2], generator=g).cuda() if with_add else None
    out = df.ops.group_norm_silu(x, groups, w, b, 1e-6, add=add, backend="cuda")
    want = ref.group_norm_silu(x.cpu(), groups, w.cpu(), b.cpu(), 1e-6, add=None if add is None else add.cpu())
    assert_fp32_close(f"cuda group_norm_silu {shape} cl={channels_last} add={with_add}", out.cpu(), want, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, d", [(1, 256), (4, 64), (2, 128)])
@pytest.mark.parametrize("n, m", [(256, 256), (100, 77), (1, 33)])
def test_attention_tensor_cores(dtype, heads, d, n, m):
    """The U-Net's layout: q, k, v strided views of one (B, N, 3C) projection; residual in the epilogue."""
    g = torch.Generator().manual_seed(0)
    B, C = 2, heads * d
    qkv = torch.randn(B, max(n, m), 3 * C, generator=g).to(dtype).cuda()
    q = qkv[:, :n, :C].view(B, n, heads, d).transpose(1, 2)
    k = qkv[:, :m, C : 2 * C].view(B, m, heads, d).transpose(1, 2)
    v = qkv[:, :m, 2 * C :].view(B, m, heads, d).transpose(1, 2)
    res = torch.randn(B, heads, n, d, generator=g).to(dtype).cuda()
    out = df.ops.attention(q, k, v, residual=res, backend="cuda")
    want = ref.attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), residual=res.float().cpu())
    low = ref.attention(q.cpu(), k.cpu(), v.cpu(), residual=res.cpu())
    assert_lowp_close(f"cuda attention {dtype} {heads}x{d} n={n} m={m}", out.float().cpu(), want, low.float())


def test_attention_outside_the_kernel_goes_to_triton_or_raises():
    q = torch.randn(1, 1, 16, 64, device="cuda")  # fp32: tensor cores would miss fp32's tolerance
    with pytest.raises(TypeError, match="float16/bfloat16"):
        df.ops.attention(q, q, q, backend="cuda")
    auto = df.ops.attention(q, q, q)
    assert (auto.cpu() - ref.attention(q.cpu(), q.cpu(), q.cpu())).abs().max().item() < 2e-5
