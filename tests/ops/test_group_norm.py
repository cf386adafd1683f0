"""group_norm_silu: the reference is the spec (no fused CPU kernel yet: see the CPU U-Net issue)."""

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from tests.helpers import assert_fp32_close


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
        (dict(backend="cpu"), NotImplementedError, "group_norm_silu"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(x=torch.zeros(2, 8, 4, 4), num_groups=4, weight=torch.ones(8), bias=torch.zeros(8))
    args.update(kwargs)
    if kwargs.get("backend") == "cpu" and not df.backends()["cpu"].startswith("available"):
        err, match = RuntimeError, "cpu"
    with pytest.raises(err, match=match):
        df.ops.group_norm_silu(args.pop("x"), args.pop("num_groups"), args.pop("weight"), args.pop("bias"), **args)
