"""Triton kernels (q_sample, ddpm_step, keyed noise) against the reference and the CPU kernels.

Without a GPU they run through TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py); on a GPU machine the
same tests run on CUDA tensors.
"""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import DEV, OPTIONS, assert_fp32_close, assert_lowp_close, needs_cpu, needs_triton

triton = pytest.importorskip("triton")
S = df.NoiseSchedule.linear(1000, 1e-4, 0.02)


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(1.5 * torch.randn(shape, generator=g)).to(dtype).to(DEV) for _ in range(3)]


@needs_triton
@pytest.mark.parametrize("pt, vt, clip", OPTIONS)
def test_ddpm_step_every_option(pt, vt, clip):
    x, m, z = _inputs((3, 3, 5, 7))
    t = torch.tensor([0, 500, 999])
    kw = dict(prediction_type=pt, variance_type=vt, clip_sample=clip, clip_range=1.5)
    out = df.ops.ddpm_step(x, m, t, S, z, backend="triton", **kw)
    assert_fp32_close(
        f"triton ddpm_step {pt} {vt} clip={clip}", out.cpu(), ref.ddpm_step(x.cpu(), m.cpu(), t, S, z.cpu(), **kw)
    )


@needs_triton
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 3, 3), (2, 3, 33, 17), (3, 40)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ddpm_step_keyed_and_layouts(shape, channels_last):
    if channels_last and len(shape) != 4:
        shape = (*shape, 1, 1)
    x, m, _ = _inputs(shape)
    if channels_last:
        x, m = (a.contiguous(memory_format=torch.channels_last) for a in (x, m))
    x0_out = torch.empty_like(x)
    out = df.ops.ddpm_step(
        x, m, 400, S, seed=2**40 + 5, sample_offset=3, clip_sample=True, backend="triton", x0_out=x0_out
    )
    t = torch.full((shape[0],), 400)
    expected, x0 = ref.ddpm_step(
        x.cpu(), m.cpu(), t, S, seed=2**40 + 5, sample_offset=3, clip_sample=True, return_x0=True
    )
    assert_fp32_close(f"triton keyed {shape} channels_last={channels_last}", out.cpu(), expected, atol=2e-5)
    assert_fp32_close("x0_out", x0_out.cpu(), x0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ddpm_step_low_precision(dtype):
    x, m, z = _inputs((2, 3, 8, 8), dtype)
    out = df.ops.ddpm_step(x, m, 700, S, z, clip_sample=True, backend="triton")
    t = torch.full((2,), 700)
    r32 = ref.ddpm_step(x.cpu().float(), m.cpu().float(), t, S, z.cpu().float(), clip_sample=True)
    rlow = ref.ddpm_step(x.cpu(), m.cpu(), t, S, z.cpu(), clip_sample=True)
    assert out.dtype == dtype
    assert_lowp_close(f"triton ddpm_step {dtype}", out.cpu(), r32, rlow)


@needs_triton
def test_ddpm_step_t_prev_and_coefficient_table():
    x, m, z = _inputs((2, 3, 4, 4))
    t, t_prev = torch.tensor([980, 500]), torch.tensor([960, 0])
    out = df.ops.ddpm_step(x, m, t, S, z, t_prev=t_prev, backend="triton")
    assert_fp32_close("t_prev", out.cpu(), ref.ddpm_step(x.cpu(), m.cpu(), t, S, z.cpu(), t_prev=t_prev))
    coeffs = ref.step_coefficients(t, t_prev, S, "epsilon", "fixed_small").float()
    out2 = df.ops.ddpm_step(x, m, t, S, z, coefficients=coeffs, backend="triton")
    assert_fp32_close("coefficients", out2.cpu(), out.cpu())


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_q_sample_given_and_drawn(channels_last):
    x0, eps, _ = _inputs((3, 4, 6, 5))
    if channels_last:
        x0, eps = (a.contiguous(memory_format=torch.channels_last) for a in (x0, eps))
    t = torch.tensor([0, 10, 999])
    out = df.ops.q_sample(x0, t, eps, S, backend="triton")
    assert_fp32_close("triton q_sample", out.cpu(), ref.q_sample(x0.cpu(), t, eps.cpu(), S))
    x_t, drawn = df.ops.q_sample(x0, t, None, S, seed=11, backend="triton")
    r_xt, r_eps = ref.q_sample(x0.cpu(), t, None, S, seed=11)
    assert_fp32_close("triton drawn eps", drawn.cpu(), r_eps, atol=2e-5)
    assert_fp32_close("triton drawn x_t", x_t.cpu(), r_xt, atol=2e-5)


@needs_triton
@needs_cpu
@pytest.mark.parametrize("stream", [0, 1, 2])
def test_same_key_same_noise_as_the_cpu_backend(stream):
    shape = (3, 5, 7, 9)
    t = torch.tensor([0, 17, 999])
    a = df.ops.keyed_normal(
        shape, seed=2**63 + 12345, t=t.to(DEV), stream=stream, sample_offset=40, backend="triton", device=DEV
    )
    b = df.ops.keyed_normal(shape, seed=2**63 + 12345, t=t, stream=stream, sample_offset=40, backend="cpu")
    err = (a.cpu() - b).abs().max().item()
    print(f"triton vs cpu keyed noise, stream {stream}: max err {err:.3g}")
    assert err <= 1e-5 * max(1.0, b.abs().max().item())


# seeds whose 32-bit halves are 0, 1 and 2**32 - 1: Triton's JIT made an argument equal to 1 a constant, which
# broke the kernels' key (tests/triton_aot.py compiles the same seeds for sm_80/sm_90)
KEY_SEEDS = [0, 1, 2**32, 2**32 + 1, 2**32 - 1, 2**64 - 1, 16, 2**36]


@needs_triton
@pytest.mark.parametrize("seed", KEY_SEEDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_keyed_noise_for_every_half_of_the_seed(seed, channels_last):
    shape = (2, 3, 5, 6)  # 90 elements a sample: the last Philox counter of a sample is partly used
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.tensor([0, 999])
    z = df.ops.keyed_normal(
        shape, seed=seed, t=t.to(DEV), sample_offset=1, backend="triton", device=DEV, memory_format=fmt
    )
    expected = ref.keyed_normal(shape, seed, t, 2, 1, "cpu")
    assert_fp32_close(f"triton keyed noise seed={seed:#x} cl={channels_last}", z.cpu(), expected, atol=2e-5)
    x, m, _ = _inputs(shape)
    x, m = x.contiguous(memory_format=fmt), m.contiguous(memory_format=fmt)
    out = df.ops.ddpm_step(x, m, 400, S, seed=seed, sample_offset=1, backend="triton")
    expected = ref.ddpm_step(x.cpu(), m.cpu(), torch.full((2,), 400), S, seed=seed, sample_offset=1)
    assert_fp32_close(f"triton ddpm_step seed={seed:#x}", out.cpu(), expected, atol=2e-5)
    x_t, eps = df.ops.q_sample(x, t.to(DEV), None, S, seed=seed, sample_offset=1, backend="triton")
    r_xt, r_eps = ref.q_sample(x.cpu(), t, None, S, seed=seed, sample_offset=1)
    assert_fp32_close(f"triton q_sample eps seed={seed:#x}", eps.cpu(), r_eps, atol=2e-5)


@needs_triton
@pytest.mark.parametrize(
    "shape, groups", [((2, 64, 8, 8), 32), ((1, 6, 1, 1), 3), ((3, 12, 5, 7), 4), ((2, 32, 17, 9), 8)]
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu, with_add", [(True, True), (False, False)])
def test_group_norm_silu(shape, groups, channels_last, silu, with_add):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g) + 1).to(DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], generator=g).to(DEV), torch.randn(shape[1], generator=g).to(DEV)
    add = torch.randn(shape[:2], generator=g).to(DEV) if with_add else None
    out = df.ops.group_norm_silu(x, groups, w, b, 1e-6, silu=silu, add=add, backend="triton")
    expected = ref.group_norm_silu(
        x.cpu(), groups, w.cpu(), b.cpu(), 1e-6, silu=silu, add=None if add is None else add.cpu()
    )
    assert_fp32_close(
        f"triton group_norm {shape} cl={channels_last} silu={silu} add={with_add}", out.cpu(), expected, atol=2e-5
    )


@needs_triton
@pytest.mark.parametrize(
    "B, H, N, M, D, Dv", [(2, 1, 16, 16, 32, 32), (1, 4, 7, 5, 3, 3), (2, 2, 70, 130, 24, 40), (1, 1, 33, 40, 256, 256)]
)
def test_attention(B, H, N, M, D, Dv):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(DEV) for n, d in ((N, D), (M, D), (M, Dv)))
    res = torch.randn(B, H, N, Dv, generator=g).to(DEV)
    out = df.ops.attention(q, k, v, residual=res, backend="triton")
    expected = ref.attention(q.cpu(), k.cpu(), v.cpu(), residual=res.cpu())
    assert_fp32_close(f"triton attention {(B, H, N, M, D, Dv)}", out.cpu(), expected, atol=2e-5)


@needs_triton
def test_attention_reads_the_unet_layout_and_low_precision():
    x = torch.randn(2, 64, 3 * 32).to(DEV)
    q, k, v = (x[..., i * 32 : (i + 1) * 32].view(2, 64, 2, 16).transpose(1, 2) for i in range(3))
    out = df.ops.attention(q, k, v, backend="triton")
    assert_fp32_close("triton U-Net layout", out.cpu(), ref.attention(q.cpu(), k.cpu(), v.cpu()), atol=2e-5)
    qh, kh, vh = (t.to(torch.float16) for t in (q, k, v))
    low = df.ops.attention(qh, kh, vh, backend="triton")
    r32 = ref.attention(*(t.cpu().float() for t in (qh, kh, vh)))
    rlow = ref.attention(*(t.cpu() for t in (qh, kh, vh)))
    assert_lowp_close("triton attention fp16", low.cpu(), r32, rlow)
