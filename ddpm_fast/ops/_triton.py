"""The triton backend: ddpm_fast's Triton kernels (kernels/) on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (the interpreter: numerics only, see tests/triton_aot.py for the compile check).

The kernels read per-sample coefficient tables from device memory. A table is computed where t lies: on the host
for host timesteps (then sent through pinned memory asynchronously), on the device for device timesteps (a gather
from the whole schedule's table, cached beside the schedule); no launch reads a device value on the host, which on
a GPU would make the host wait for the device at every step. Convolutions and linear layers, for which ddpm_fast
has no GPU kernel, run in the vendor libraries through ATen (cuDNN and cuBLAS on a GPU).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .. import reference as ref
from ..reference.dpmpp_step import history_read
from ._layout import dense, finish, memory_format, result_buffer, rows
from ._trace import record

NAME = "triton"
OPS = frozenset(
    {"q_sample", "ddpm_step", "dpmpp_step", "keyed_normal", "group_norm_silu", "attention", "conv2d", "linear"}
)


def unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no GPU: triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
    return None


def describe() -> str:
    return "available"


def refuses(op: str, **facts) -> str | None:
    return None


def check_device(device: torch.device) -> None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1; use CUDA tensors")


def timestep_device(t, device: torch.device):
    """An int or a CPU t stays on the host (coefficients computed there, sent without a synchronisation); a GPU
    t stays on the GPU and is never read back."""
    return device if isinstance(t, torch.Tensor) and t.device.type != "cpu" else "cpu"


# ----------------------------------------------------------------------------------------------- tables
def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x (a small host table) on ``device``. To a GPU through pinned memory and an asynchronous copy: a copy
    from pageable memory makes the host wait for the device's queue, once per step."""
    if x.device == device:
        return x
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def cached(schedule, key, device: torch.device, build) -> torch.Tensor:
    """A whole-schedule table ``build()`` (computed once on the host in float64, cast to fp32) kept on ``device``
    beside the schedule's other cached tables, so per-step lookups are a gather on the device."""
    cache = schedule.__dict__.setdefault("_tables", {})
    full_key = (key, str(device))
    if full_key not in cache:
        cache[full_key] = to_device(build().contiguous(), device)
    return cache[full_key]


def _q_sample_rows(s) -> torch.Tensor:
    abar = s.alphas_cumprod
    return torch.stack([abar.sqrt(), (1 - abar).sqrt()], dim=1).float()


def _step_table(t, t_prev, coefficients, s, prediction_type, variance_type, noise):
    """The (B, 9) coefficient table of a reverse step and its noise mode."""
    from ..kernels import ddpm_step as tk

    if coefficients is not None:  # sigma only where t > 0, as the schedule's own rows
        k = to_device(coefficients, t.device).to(torch.float64)
        table = tk.coefficient_table(torch.cat([k[:, :6], k[:, 6:] * (t > 0).unsqueeze(1)], dim=1))
    elif t_prev is None and t.device.type != "cpu":
        key = ("ddpm_step", prediction_type, variance_type)

        def rows_():
            return tk.coefficient_table(
                ref.step_coefficients(torch.arange(len(s)), None, s, prediction_type, variance_type)
            )

        table = cached(s, key, t.device, rows_).index_select(0, t)
    else:
        table = tk.coefficient_table(ref.step_coefficients(t, t_prev, s, prediction_type, variance_type))
    if noise is not None:
        return table, tk.NOISE_GIVEN
    if table.device.type == "cpu" and not bool((table[:, 8] != 0).any()):  # a host table: free to read
        return table, tk.NOISE_NONE
    return table, tk.NOISE_KEYED  # rows with sigma = 0 add 0 * z


# ----------------------------------------------------------------------------------------------- DDPM ops
def q_sample(x0, t, noise, s, seed, sample_offset, coefficients, out):
    from ..kernels import q_sample as tk

    record("q_sample", NAME, "triton")
    drawn = noise is None
    fmt = memory_format(x0)
    x0d = dense(x0, fmt)
    eps = torch.empty_like(x0d, memory_format=fmt) if drawn else dense(noise, fmt)
    x_t = result_buffer(out, x0d, fmt)
    t = to_device(t, x0.device)
    if coefficients is None:  # the schedule's [sqrt(abar), sqrt(1 - abar)] for every t, gathered on the device
        table = cached(s, ("q_sample",), x0.device, lambda: _q_sample_rows(s)).index_select(0, t)
    else:
        table = to_device(coefficients, x0.device)
    tk.q_sample(x0d, eps, x_t, table, t, drawn, seed, sample_offset, fmt == torch.channels_last)
    x_t = finish(x_t, out)
    return (x_t, eps) if drawn else x_t


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
    from ..kernels import ddpm_step as tk

    record("ddpm_step", NAME, "triton")
    fmt = memory_format(x_t)
    xd = dense(x_t, fmt)
    result = result_buffer(out, xd, fmt)
    x0_result = None if x0_out is None else result_buffer(x0_out, xd, fmt)
    table, noise_mode = _step_table(t, t_prev, coefficients, s, prediction_type, variance_type, noise)
    tk.ddpm_step(
        xd,
        dense(model_output, fmt),
        None if noise is None else dense(noise, fmt),
        result,
        x0_result,
        to_device(table, x_t.device),
        to_device(t, x_t.device),
        seed,
        sample_offset,
        clip_sample,
        clip_range,
        fmt == torch.channels_last,
        noise_mode=noise_mode,
    )
    if x0_out is not None:
        finish(x0_result, x0_out)
    return finish(result, out)


def dpmpp_step(
    x_t, model_output, history, coefficients, out, x0_out, *, last_sample=None, sample_out=None, noise=None, t=None,
    seed=0, sample_offset=0,
):  # fmt: skip
    from ..kernels import dpmpp_step as tk

    record("dpmpp_step", NAME, "triton")
    fmt = memory_format(x_t)
    xd = dense(x_t, fmt)
    result = result_buffer(out, xd, fmt)
    x0 = result_buffer(x0_out, xd, fmt)
    corrected = last_sample is not None
    # the history the rows read (a host table: free to read), as the cpu kernel picks per sample
    k = coefficients
    need = history_read(k, corrected)
    y = result_buffer(sample_out, xd, fmt) if corrected else None
    if noise is not None:
        mode = tk.NOISE_GIVEN
    elif t is not None and bool((k[:, 8] != 0).any()):
        mode = tk.NOISE_KEYED
    else:
        mode = tk.NOISE_NONE
    tk.dpmpp_step(
        xd,
        dense(model_output, fmt),
        [dense(h, fmt) for h in history[:need]],
        result,
        x0,
        to_device(coefficients, x_t.device),
        last=dense(last_sample, fmt) if corrected else None,
        y=y,
        noise=dense(noise, fmt) if mode == tk.NOISE_GIVEN else None,
        t=to_device(t, x_t.device) if mode == tk.NOISE_KEYED else None,
        seed=seed,
        sample_offset=sample_offset,
        nhwc=fmt == torch.channels_last,
        noise_mode=mode,
    )
    if corrected:
        return finish(result, out), finish(x0, x0_out), finish(y, sample_out)
    return finish(result, out), finish(x0, x0_out)


def keyed_normal(shape, t, seed, stream, sample_offset, dtype, device, memory_format_, out):
    from ..kernels import q_sample as tk

    record("keyed_normal", NAME, "triton")
    if out is not None:
        result = result_buffer(out, out, memory_format(out))
    else:
        result = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format_)
    tk.keyed_normal(result, t, seed, sample_offset, int(stream), memory_format(result) == torch.channels_last)
    return finish(result, out)


# ----------------------------------------------------------------------------------------------- U-Net ops
def group_norm_silu(x, num_groups, weight, bias, eps, silu, add, out):
    from ..kernels import group_norm as tk

    record("group_norm_silu", NAME, "triton")
    fmt = memory_format(x)
    xd = dense(x, fmt)
    result = result_buffer(out, xd, fmt)
    tk.group_norm_silu(xd, result, num_groups, weight, bias, add, eps, bool(silu), fmt == torch.channels_last)
    return finish(result, out)


def attention(q, k, v, scale, residual, out):
    """Any of the fused dtypes, fp32 accumulation inside; writes (B, N, H, Dv) memory unless out has unit
    last-dim stride."""
    from ..kernels import attention as tk

    record("attention", NAME, "triton")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, H, N, _ = q.shape
    Dv = v.shape[3]
    result = out if out is not None and out.stride(-1) == 1 else q.new_empty(B, N, H, Dv).transpose(1, 2)
    tk.attention(rows(q), rows(k), rows(v), None if residual is None else rows(residual), result, scale)
    return finish(result, out)


def _library(x: torch.Tensor, gpu_name: str) -> str:
    return gpu_name if x.device.type == "cuda" else "aten"


def conv2d(x, weight, bias, residual, stride, padding, dilation, groups, prepared, out, _name=NAME):
    record("conv2d", _name, _library(x, "cudnn"))
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return finish(y if residual is None else y.add_(residual), out)


def linear(x, weight, bias, residual, scratch, out, _name=NAME):
    record("linear", _name, _library(x, "cublas"))
    if residual is not None:
        K = weight.shape[0]
        y = torch.addmm(residual.reshape(-1, K) + (0 if bias is None else bias), x.reshape(-1, x.shape[-1]), weight.t())
        return finish(y.view(*x.shape[:-1], K), out)
    return finish(F.linear(x, weight, bias), out)
