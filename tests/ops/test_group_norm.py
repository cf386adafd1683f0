"""group_norm_silu: the reference's semantics, and the fused CPU kernel against it."""

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import assert_fp32_close, assert_lowp_close, needs_cpu

FUSED_SHAPES = [
    ((2, 64, 8, 8), 32),
    ((1, 6, 1, 1), 3),
    ((3, 12, 5, 7), 4),
    ((2, 8, 10), 2),
    ((1, 96, 15, 15), 32),
    ((2, 32, 64, 70), 8),
]


def _gn_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g) + 1).to(dtype)
    w, b = torch.randn(shape[1], generator=g).to(dtype), torch.randn(shape[1], generator=g).to(dtype)
    add = torch.randn(shape[:2], generator=g).to(dtype)
    return x, w, b, add


@needs_cpu
@pytest.mark.parametrize("shape, groups", FUSED_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("silu, with_add", [(True, False), (True, True), (False, False)])
def test_fused_cpu_matches_reference(shape, groups, layout, silu, with_add):
    if layout == "channels_last" and len(shape) != 4:
        shape = (*shape, 1)
    x, w, b, add = _gn_inputs(shape, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]
    add = add if with_add else None
    out = df.ops.group_norm_silu(x, groups, w, b, 1e-6, silu=silu, add=add, backend="cpu")
    expected = ref.group_norm_silu(x, groups, w, b, 1e-6, silu=silu, add=add)
    assert_fp32_close(f"group_norm_silu {shape} {layout} silu={silu} add={with_add}", out, expected, atol=2e-5)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_cpu_low_precision(dtype, channels_last):
    x, w, b, add = _gn_inputs((2, 64, 9, 9), dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = df.ops.group_norm_silu(x, 32, w, b, 1e-6, add=add, backend="cpu")
    r32 = ref.group_norm_silu(x.float(), 32, w.float(), b.float(), 1e-6, add=add.float())
    rlow = ref.group_norm_silu(x, 32, w, b, 1e-6, add=add)
    assert out.dtype == dtype
    assert_lowp_close(f"group_norm_silu {dtype} channels_last={channels_last}", out, r32, rlow)


@needs_cpu
@pytest.mark.parametrize("aligned", [True, False])
def test_fused_cpu_streamed_output(aligned):
    """channels_last outputs of 16 MB and more are written with non-temporal stores (group_norm.cpp); an output
    not aligned to the vector falls back to plain stores. 33 samples: the whole-sample split, odd per thread."""
    x, w, b, add = _gn_inputs((33, 128, 32, 32), torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() * 4 >= 16 << 20
    buf = torch.empty(x.numel() + 1)
    out = buf[: x.numel()] if aligned else buf[1:]
    out = out.view(33, 32, 32, 128).permute(0, 3, 1, 2)  # channels_last strides over the buffer
    got = df.ops.group_norm_silu(x, 32, w, b, add=add, backend="cpu", out=out)
    assert got.data_ptr() == out.data_ptr()
    expected = ref.group_norm_silu(x, 32, w, b, add=add)
    assert_fp32_close(
        f"group_norm_silu 33x128x32x32 channels_last streamed, aligned={aligned}", got, expected, atol=2e-5
    )


@needs_cpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_statistics_survive_an_outlier_first_element(channels_last):
    """The statistics are shifted sums; with the first element of every group and chunk as the shift, an outlier
    there cancelled digits away (60 std: 3.5e-4 NCHW, 2e-3 NHWC off float64, torch 2e-6)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 16, 16, generator=g)
    x[:, :, 0, 0] = 60.0
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    got = df.ops.group_norm_silu(x.contiguous(memory_format=fmt), 32, w, b, silu=False, backend="cpu")
    exact = ref.group_norm_silu(x.double(), 32, w.double(), b.double(), silu=False)
    assert_fp32_close(
        f"group_norm outlier first element, channels_last={channels_last}", got.double(), exact, atol=2e-5
    )


@needs_cpu
def test_fused_statistics_survive_a_large_mean():
    """Welford merges: a large offset does not cancel the variance away (sum-of-squares would)."""
    x, w, b, _ = _gn_inputs((2, 32, 16, 16), torch.float32)
    x = x + 1000.0
    out = df.ops.group_norm_silu(x, 8, w, b, 1e-6, backend="cpu")
    expected = ref.group_norm_silu(x.double(), 8, w.double(), b.double(), 1e-6)
    assert_fp32_close("offset 1000", out, expected.float(), atol=1e-3)


@needs_cpu
def test_fused_in_place_and_nan():
    x, w, b, add = _gn_inputs((2, 16, 4, 4), torch.float32)
    expected = ref.group_norm_silu(x, 4, w, b, add=add)
    y = x.clone()
    df.ops.group_norm_silu(y, 4, w, b, add=add, backend="cpu", out=y)
    assert_fp32_close("in place", y, expected, atol=2e-5)
    x[0, 0, 0, 0] = float("nan")
    out = df.ops.group_norm_silu(x, 4, w, b, backend="cpu")
    assert torch.isnan(out[0, :4]).all() and torch.isfinite(out[0, 4:]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("shape, groups", [((2, 64, 8, 8), 32), ((1, 6, 1, 1), 3), ((3, 12, 5, 7), 4), ((2, 8, 10), 2)])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_add", [False, True])
def test_reference_semantics(shape, groups, silu, with_add):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    add = torch.randn(shape[:2], generator=g) if with_add else None
    out = df.ops.group_norm_silu(x, groups, w, b, 1e-6, silu=silu, add=add)
    h = x if add is None else x + add.view(*shape[:2], *([1] * (len(shape) - 2)))
    # written out from the definition: statistics per (sample, group)
    hg = h.reshape(shape[0], groups, -1)
    y = ((hg - hg.mean(-1, keepdim=True)) / torch.sqrt(hg.var(-1, unbiased=False, keepdim=True) + 1e-6)).reshape(shape)
    y = y * w.view(1, -1, *([1] * (len(shape) - 2))) + b.view(1, -1, *([1] * (len(shape) - 2)))
    assert_fp32_close("group_norm_silu", out, F.silu(y) if silu else y, atol=2e-5)


def test_out_and_channels_last():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    out = torch.empty(2, 8, 4, 4)
    assert df.ops.group_norm_silu(x, 4, None, None, out=out) is out
    assert_fp32_close("out=", out, F.silu(F.group_norm(x, 4)), atol=2e-5)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(num_groups=3), ValueError, "num_groups"),
        (dict(num_groups=0), ValueError, "num_groups"),
        (dict(weight=torch.ones(5)), ValueError, "weight"),
        (dict(bias=[0.0] * 8), TypeError, "bias"),
        (dict(add=torch.zeros(2, 8, 1)), ValueError, "add"),
        (dict(x=torch.zeros(2, 8, 4, 4, dtype=torch.int32)), TypeError, "x"),
        (dict(x=torch.zeros(8)), ValueError, "x"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(backend="cuda"), RuntimeError, "cuda"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(x=torch.zeros(2, 8, 4, 4), num_groups=4, weight=torch.ones(8), bias=torch.zeros(8))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        df.ops.group_norm_silu(args.pop("x"), args.pop("num_groups"), args.pop("weight"), args.pop("bias"), **args)


@needs_cpu
def test_fused_cpu_large_weights_flush_denormals_only_inside():
    """Weights of 300 send SiLU's denominators to 2^126 and their reciprocals to the denormals, which the kernel
    clamps and flushes in its threads (a microcode assist each on x86 otherwise: benchmarks/bench_group_norm.py
    reports the time against weights of 1). The result still matches float64, and the thread's floating-point mode
    is restored, so denormals still exist for the caller."""
    x = torch.randn(4, 64, 32, 32, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last
    )
    b = torch.zeros(64)
    # outputs reach 1.4e3, where one fp32 ulp is 1.2e-4: against float64, within 1e-6 of the largest output (the
    # fp32 reference itself is 4e-7 of it away; the fused kernel 6e-7 at this seed)
    w = torch.full((64,), 300.0)
    exact = ref.group_norm_silu(x.double(), 32, w.double(), b.double())
    err = (df.ops.group_norm_silu(x, 32, w, b, backend="cpu").double() - exact).abs().max().item()
    err_ref = (ref.group_norm_silu(x, 32, w, b).double() - exact).abs().max().item()
    print(f"max err vs float64: fused {err:.2e}, fp32 reference {err_ref:.2e}, max |out| {exact.abs().max():.0f}")
    assert err <= 1e-6 * exact.abs().max().item() + 1e-5
    assert torch.tensor([1e-39]).mul(1.0).item() != 0.0
