"""attention: the reference's semantics, and the fused CPU kernel (flash-style, fp32 accumulation) against it."""

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import assert_fp32_close, assert_lowp_close, needs_cpu


def _qkv(B, H, N, M, D, Dv=None, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(B, H, N, D, generator=g)).to(dtype)
    k = (scale * torch.randn(B, H, M, D, generator=g)).to(dtype)
    v = torch.randn(B, H, M, Dv or D, generator=g).to(dtype)
    return q, k, v


@needs_cpu
@pytest.mark.parametrize(
    "B, H, N, M, D, Dv",
    [
        (2, 1, 16, 16, 32, 32),
        (1, 4, 7, 5, 3, 3),
        (3, 2, 1, 9, 8, 5),
        (1, 1, 130, 1100, 16, 16),
        (2, 3, 257, 300, 24, 40),
    ],
)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_cpu_matches_reference(B, H, N, M, D, Dv, with_residual):
    q, k, v = _qkv(B, H, N, M, D, Dv)
    res = torch.randn(B, H, N, Dv) if with_residual else None
    out = df.ops.attention(q, k, v, residual=res, backend="cpu")
    assert_fp32_close(f"attention {(B, H, N, M, D, Dv)}", out, ref.attention(q, k, v, residual=res), atol=2e-5)


@needs_cpu
@pytest.mark.parametrize(
    "B, H, N, M, D, Dv",
    [
        (2, 1, 76, 90, 256, 256),  # the U-Net's one head of 256; a last query block of 12 (panel halves)
        (2, 4, 64, 64, 64, 64),  # four heads of 64
        (1, 2, 9, 513, 7, 13),  # two key blocks, the second of one key; head dims not multiples of 8 or 6
        (3, 1, 8, 6, 1, 1),  # one-wide everything
    ],
)
def test_fused_cpu_tile_shapes(B, H, N, M, D, Dv):
    q, k, v = _qkv(B, H, N, M, D, Dv, seed=1)
    res = torch.randn(B, H, N, Dv)
    out = df.ops.attention(q, k, v, residual=res, backend="cpu")
    assert_fp32_close(f"attention {(B, H, N, M, D, Dv)}", out, ref.attention(q, k, v, residual=res), atol=2e-5)


@needs_cpu
def test_fused_cpu_propagates_nan():
    q, k, v = _qkv(1, 1, 20, 30, 16)
    k[0, 0, 3, 5] = float("nan")  # every query's scores meet a NaN key
    v[0, 0, 7, 2] = float("nan")
    out = df.ops.attention(q, k, v, backend="cpu")
    expected = ref.attention(q, k, v)
    assert torch.isnan(expected).all()
    assert torch.isnan(out).all()


@needs_cpu
def test_fused_cpu_reads_the_unet_layout_in_place():
    x = torch.randn(2, 64, 3 * 32)
    q, k, v = (x[..., i * 32 : (i + 1) * 32].view(2, 64, 2, 16).transpose(1, 2) for i in range(3))
    res = torch.randn(2, 64, 2, 16).transpose(1, 2)
    out = df.ops.attention(q, k, v, scale=0.3, residual=res, backend="cpu")
    assert_fp32_close("U-Net layout", out, ref.attention(q, k, v, scale=0.3, residual=res), atol=2e-5)
    # the result is laid out (B, N, H, D): merging the heads back is a view
    assert out.transpose(1, 2).reshape(2, 64, 32).data_ptr() == out.data_ptr()


@needs_cpu
def test_fused_cpu_large_logits_are_stable():
    q, k, v = _qkv(1, 1, 40, 700, 16, scale=8.0)  # logits in the hundreds: exp would overflow without the max
    out = df.ops.attention(q, k, v, backend="cpu")
    expected = ref.attention(q.double(), k.double(), v.double()).float()
    assert torch.isfinite(out).all()
    assert_fp32_close("large logits", out, expected, atol=1e-4)


@needs_cpu
@pytest.mark.parametrize("M", [300, 1100])  # one key block, and three (the reference carried across blocks)
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_fused_cpu_scores_ramping_over_the_keys(M, direction):
    # Scores that climb (or fall) steadily along the keys, by hundreds over them (the direction flips for a query
    # whose dot product with the mean query is negative): where they climb, a later tile keeps passing the kernel's
    # reference by more than its slack, so the reference is raised, and the rows and sums stored before rescaled,
    # again and again; where they fall, the early keys dominate and the late ones underflow. Against float64: the
    # float32 reference is itself 1e-5..4e-5 off here (logits up to +-400), hence atol 1e-4.
    g = torch.Generator().manual_seed(3)
    D = 16
    q = torch.randn(2, 2, 37, D, generator=g)
    u = q.mean(dim=2, keepdim=True)
    ramp = direction * torch.linspace(0, 100, M).view(1, 1, M, 1) / u.square().sum(-1, keepdim=True) * D**0.5
    k = ramp * u + 0.5 * torch.randn(2, 2, M, D, generator=g)
    v = torch.randn(2, 2, M, D, generator=g)
    out = df.ops.attention(q, k, v, backend="cpu")
    expected = ref.attention(q.double(), k.double(), v.double()).float()
    assert torch.isfinite(out).all()
    assert_fp32_close(f"ramping scores, M={M}, direction {direction:+}", out, expected, atol=1e-4)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_cpu_low_precision(dtype):
    q, k, v = _qkv(2, 2, 33, 40, 16, dtype=dtype)
    out = df.ops.attention(q, k, v, backend="cpu")
    assert out.dtype == dtype
    assert_lowp_close(f"attention {dtype}", out, ref.attention(q.float(), k.float(), v.float()), ref.attention(q, k, v))


@needs_cpu
@pytest.mark.parametrize("kernel", ["native", "sdpa"])
@pytest.mark.parametrize("B, H, N, M, D", [(2, 1, 40, 40, 24), (1, 3, 7, 300, 8), (3, 2, 1, 9, 5)])
def test_bf16_paths(monkeypatch, kernel, B, H, N, M, D):
    """Both bf16 kernels (_cpu.bf16_attention: ATen's flash attention on AMX, the native kernel on fp32 copies
    elsewhere) on every CPU, with a residual, from the U-Net's strided projection layout, into out= aliasing the
    residual (as the U-Net's folded attention block may)."""
    from ddpm_fast.ops import _cpu

    monkeypatch.setattr(_cpu, "bf16_attention", lambda: kernel)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, N, 3 * H * D, generator=g)  # (B, N, 3 H D) rows, as the U-Net's one projection GEMM
    q = qkv[..., : H * D].view(B, N, H, D).transpose(1, 2)
    k, v = _qkv(B, H, M, M, D, seed=2)[1:]
    res = torch.randn(B, H, N, D, generator=g)
    q16, k16, v16, res16 = (t.bfloat16() for t in (q, k, v, res))
    with df.ops.trace() as calls:
        out = df.ops.attention(q16, k16, v16, residual=res16, backend="cpu")
    assert [c.kernel for c in calls] == ["sdpa_bf16" if kernel == "sdpa" else "native"]
    assert out.dtype == torch.bfloat16 and out.shape == (B, H, N, D)
    expected = ref.attention(q16.float(), k16.float(), v16.float()) + res16.float()
    assert_lowp_close(f"attention bf16 {kernel}", out, expected, ref.attention(q16, k16, v16) + res16)
    into = res16.clone()
    assert df.ops.attention(q16, k16, v16, residual=into, backend="cpu", out=into) is into
    assert torch.equal(into, out)


@needs_cpu
def test_fused_cpu_out_argument():
    q, k, v = _qkv(1, 2, 8, 8, 4)
    out = torch.empty(1, 2, 8, 4)
    assert df.ops.attention(q, k, v, backend="cpu", out=out) is out
    assert_fp32_close("out=", out, ref.attention(q, k, v), atol=2e-5)


@pytest.mark.parametrize("B, H, N, M, D", [(2, 1, 16, 16, 32), (1, 4, 7, 5, 3), (3, 2, 1, 9, 8)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_matches_sdpa(B, H, N, M, D, with_residual):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(B, H, N, D, generator=g),
        torch.randn(B, H, M, D, generator=g),
        torch.randn(B, H, M, D, generator=g),
    )
    res = torch.randn(B, H, N, D, generator=g) if with_residual else None
    out = df.ops.attention(q, k, v, residual=res)
    expected = F.scaled_dot_product_attention(q, k, v) + (0 if res is None else res)
    assert_fp32_close("attention", out, expected, atol=2e-5)


def test_strided_views_of_the_unet_layout():
    x = torch.randn(2, 64, 3 * 32)  # (B, HW, 3C) projections, split into (B, heads, HW, d) views
    q, k, v = (x[..., i * 32 : (i + 1) * 32].view(2, 64, 2, 16).transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    assert_fp32_close(
        "strided", df.ops.attention(q, k, v, scale=0.5), F.scaled_dot_product_attention(q, k, v, scale=0.5), atol=2e-5
    )


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(k=torch.zeros(2, 1, 4, 5)), ValueError, "k"),
        (dict(v=torch.zeros(2, 1, 3, 8)), ValueError, "v"),
        (dict(v=torch.zeros(2, 2, 4, 8)), ValueError, "v"),
        (dict(q=torch.zeros(2, 4, 8)), ValueError, "q"),
        (dict(k=torch.zeros(2, 1, 4, 8, dtype=torch.float64)), TypeError, "k"),
        (dict(residual=torch.zeros(2, 1, 4, 7)), ValueError, "residual"),
        (dict(scale=0), ValueError, "scale"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(q=torch.zeros(2, 1, 4, 8), k=torch.zeros(2, 1, 4, 8), v=torch.zeros(2, 1, 4, 8))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        df.ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@needs_cpu
def test_fused_cpu_peaked_softmax_flushes_denormals_only_inside():
    """Logits x30: most softmax weights (and their products with V) fall to the denormals, which the kernel flushes
    to zero in its threads (a microcode assist each on x86 otherwise: benchmarks/bench_attention.py reports the
    time against plain logits). The flushed terms are below 1.2e-38, so the result still matches float64; and the
    thread's floating-point mode is restored, so denormals still exist for the caller."""
    q, k, v = _qkv(2, 4, 64, 256, 64)
    q = 30 * q
    scores = (q @ k.transpose(-1, -2)) / 64**0.5
    weights = torch.softmax(scores.double(), dim=-1)
    tiny = ((weights > 0) & (weights < 1.2e-38)).double().mean().item()
    print(f"{100 * tiny:.0f}% of the softmax weights are denormal in float32")
    assert tiny > 0.1  # the case exercises the flush
    out = torch.empty_like(q)
    assert df.ops.attention(q, k, v, backend="cpu", out=out) is out
    expected = ref.attention(q.double(), k.double(), v.double()).float()
    assert_fp32_close("logits x30", out, expected, atol=1e-4)
    assert torch.tensor([1e-39]).mul(1.0).item() != 0.0
