"""Tolerances of shared/DESIGN.md, with the error printed before every assertion."""

from __future__ import annotations

import torch

LOWP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (out.double() - ref.double()).abs()
    return d.max().item(), d.mean().item()


def assert_fp32_close(name: str, out, ref, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """max |out - ref| <= atol + rtol * |ref|, elementwise."""
    mx, mean = errors(out, ref)
    bound = atol + rtol * ref.double().abs()
    worst = ((out.double() - ref.double()).abs() - bound).max().item()
    print(f"{name}: max err {mx:.3g}, mean err {mean:.3g}")
    assert out.shape == ref.shape
    assert worst <= 0, f"{name}: error exceeds {atol} + {rtol}*|ref| by {worst:.3g}"


def assert_lowp_close(name: str, out, ref_fp32, ref_lowp) -> None:
    """Low precision: error vs the fp32 reference <= 2x PyTorch's own error in that dtype + atol."""
    mx, mean = errors(out, ref_fp32)
    torch_mx, _ = errors(ref_lowp, ref_fp32)
    bound = 2 * torch_mx + LOWP_ATOL[out.dtype]
    print(f"{name}: max err {mx:.3g} (mean {mean:.3g}), torch {out.dtype} max err {torch_mx:.3g}, bound {bound:.3g}")
    assert mx <= bound, f"{name}: {mx:.3g} > {bound:.3g}"


def layout_cases(shapes):
    """(shape, layout) pairs: every shape contiguous and strided, 4-D shapes also channels_last."""
    return [
        (s, lay)
        for s in shapes
        for lay in ("contiguous", "channels_last", "strided")
        if len(s) == 4 or lay != "channels_last"
    ]
