"""attention: the reference is the spec (no fused CPU kernel yet: see the CPU U-Net issue)."""

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from tests.helpers import assert_fp32_close


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
