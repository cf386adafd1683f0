"""The reference backend ("torch"): ddpm_fast/reference, the specification, behind the ops' signatures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as ref
from ..reference.dpmpp_step import apply_row
from ..reference.noise import STREAM_STEP
from ._layout import finish
from ._trace import record

NAME = "torch"
OPS = frozenset(
    {
        "q_sample",
        "ddpm_step",
        "dpmpp_step",
        "keyed_normal",
        "group_norm_silu",
        "attention",
        "conv3x3",
        "conv2d",
        "linear",
    }
)


def unavailable() -> str | None:
    return None


def describe() -> str:
    return "available"


def refuses(op: str, **facts) -> str | None:
    return None


def check_device(device: torch.device) -> None:
    pass


def timestep_device(t, device: torch.device):
    return device


def q_sample(x0, t, noise, s, seed, sample_offset, coefficients, out):
    record("q_sample", NAME, "reference")
    result = ref.q_sample(x0, t, noise, s, seed=seed, sample_offset=sample_offset, coefficients=coefficients)
    if noise is None:
        return finish(result[0], out), result[1]
    return finish(result, out)


def ddpm_step(
    x_t,
    model_output,
    noise,
    t,
    t_prev,
    s,
    *,
    seed,
    sample_offset,
    variance_type,
    prediction_type,
    clip_sample,
    clip_range,
    coefficients,
    out,
    x0_out,
):
    record("ddpm_step", NAME, "reference")
    result, x0 = ref.ddpm_step(
        x_t,
        model_output,
        t,
        s,
        noise,
        seed=seed,
        sample_offset=sample_offset,
        variance_type=variance_type,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_range=clip_range,
        t_prev=t_prev,
        coefficients=None if coefficients is None else coefficients.to(torch.float64),
        return_x0=True,
    )
    if x0_out is not None:
        x0_out.copy_(x0)
    return finish(result, out)


def dpmpp_step(
    x_t, model_output, history, coefficients, out, x0_out, *, last_sample=None, sample_out=None, noise=None, t=None,
    seed=0, sample_offset=0,
):  # fmt: skip
    record("dpmpp_step", NAME, "reference")
    if noise is None and t is not None:
        noise = ref.keyed_normal(x_t.shape, seed, t, STREAM_STEP, sample_offset, x_t.device).to(x_t.dtype)
    result, x0, y = apply_row(coefficients.to(torch.float64), x_t, model_output, history, noise, last_sample)
    if last_sample is not None:
        return finish(result, out), finish(x0, x0_out), finish(y, sample_out)
    return finish(result, out), finish(x0, x0_out)


def keyed_normal(shape, t, seed, stream, sample_offset, dtype, device, memory_format, out):
    record("keyed_normal", NAME, "reference")
    z = ref.keyed_normal(shape, seed, t, stream, sample_offset, device).to(dtype)
    if memory_format is not torch.contiguous_format:
        z = z.contiguous(memory_format=memory_format)
    return finish(z, out)


def group_norm_silu(x, num_groups, weight, bias, eps, silu, add, out):
    record("group_norm_silu", NAME, "reference")
    if x.device.type != "cpu":  # fp32 parameters beside an fp16/bf16 x: F.group_norm mixes types on CPU only
        weight, bias = (None if p is None else p.to(x.dtype) for p in (weight, bias))
    return finish(ref.group_norm_silu(x, num_groups, weight, bias, eps, silu=silu, add=add), out)


def attention(q, k, v, scale, residual, out):
    record("attention", NAME, "reference")
    return finish(ref.attention(q, k, v, scale=scale, residual=residual), out)


def conv3x3(x, weight, bias, residual, packed, out):
    record("conv3x3", NAME, "reference")
    return finish(ref.conv3x3(x, weight, bias, residual), out)


def conv2d(x, weight, bias, residual, stride, padding, dilation, groups, prepared, out):
    record("conv2d", NAME, "reference")
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return finish(y if residual is None else y + residual, out)


def linear(x, weight, bias, residual, prepared, out):
    record("linear", NAME, "reference")
    y = F.linear(x, weight, bias)
    return finish(y if residual is None else y + residual, out)
