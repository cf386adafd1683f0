"""The cuda backend: ddpm_fast's CUDA kernels (csrc/cuda, registered under the same ``torch.ops.ddpm_fast``
schemas as the CPU kernels, so the glue is the cpu backend's); attention on the tensor cores for float16/bfloat16
with head dims 64, 128 or 256; convolutions and linear layers in cuDNN and cuBLAS through ATen."""

from __future__ import annotations

import functools
import math

import torch

from .. import _ext
from . import _cpu, _triton
from ._layout import finish
from ._trace import record

NAME = "cuda"
# The ops csrc/cuda_bindings.cpp registers CUDA kernels for; conv2d and linear run in cuDNN/cuBLAS through ATen.
NATIVE_OPS = frozenset({"q_sample", "ddpm_step", "keyed_normal", "group_norm_silu", "attention"})
OPS = NATIVE_OPS | {"conv2d", "linear"}
ATTENTION_HEAD_DIMS = (64, 128, 256)


def unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no GPU: torch.cuda.is_available() is False"
    return _ext.cuda_unavailable_reason()


def describe() -> str:
    return "available"


def _attention_fits(q, k, v, residual) -> bool:
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[3] not in ATTENTION_HEAD_DIMS:
        return False
    if v.shape[3] != q.shape[3]:
        return False
    return all(
        t.stride(-1) == 1 and t.stride(2) % 2 == 0 and t.data_ptr() % 4 == 0
        for t in (q, k, v) + (() if residual is None else (residual,))
    )


def refuses(op: str, dtype=None, q=None, k=None, v=None, residual=None, **facts) -> str | None:
    """The tensor-core attention takes float16/bfloat16, head dims 64/128/256 (v's equal to q's) and rows with
    even strides (after the unit-stride copy the op makes); the others go to Triton or the reference (auto)."""
    if op == "attention" and q is not None:
        r = [_triton_rows(x) for x in (q, k, v)]
        if not _attention_fits(*r, None if residual is None else _triton_rows(residual)):
            return (
                "q: the cuda attention kernel runs float16/bfloat16 with head dims 64, 128 or 256 (v's equal to q's) "
                f"and even row strides; got {q.dtype}, head dims {q.shape[3]}/{v.shape[3]}"
            )
    return None


def _triton_rows(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def check_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")


def timestep_device(t, device: torch.device):
    return "cpu"  # the kernels' glue reads t on the host


q_sample = functools.partial(_cpu.q_sample, _name=NAME)
ddpm_step = functools.partial(_cpu.ddpm_step, _name=NAME)
keyed_normal = functools.partial(_cpu.keyed_normal, _name=NAME)
group_norm_silu = functools.partial(_cpu.group_norm_silu, _name=NAME)
conv2d = functools.partial(_triton.conv2d, _name=NAME)
linear = functools.partial(_triton.linear, _name=NAME)


def attention(q, k, v, scale, residual, out):
    record("attention", NAME, "tensor_core")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qr, kr, vr = (_triton_rows(x) for x in (q, k, v))
    rr = None if residual is None else _triton_rows(residual)
    B, H, N, _ = q.shape
    Dv = v.shape[3]
    fits = out is not None and out.stride(-1) == 1 and out.stride(2) % 2 == 0 and out.data_ptr() % 4 == 0
    result = out if fits else q.new_empty(B, N, H, Dv).transpose(1, 2)
    torch.ops.ddpm_fast.attention(qr, kr, vr, float(scale), rr, result)
    return finish(result, out)
