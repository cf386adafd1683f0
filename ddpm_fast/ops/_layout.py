"""Dense layouts and result buffers shared by the backends."""

from __future__ import annotations

import torch

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the fused kernels take (fp32 maths inside)
REFERENCE_DTYPES = FUSED_DTYPES + (torch.float64,)
MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The dense layout the fused kernels run in: x's own if it has one, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


def result_buffer(out, like: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """Where a kernel writes: ``out`` itself when it has the layout, else a fresh tensor copied into out later."""
    if out is not None and out.is_contiguous(memory_format=fmt):
        return out
    return torch.empty_like(like, memory_format=fmt)


def finish(result: torch.Tensor, out) -> torch.Tensor:
    """The op's return value: ``result``, or ``out`` holding it."""
    if out is None or out is result:
        return result if out is None else out
    return out.copy_(result)


def rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride in its last dim (the attention kernels read rows through any outer strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def signed64(seed: int) -> int:
    """A uint64 seed as the int64 an op schema carries (same bits)."""
    return seed - 2**64 if seed >= 2**63 else seed
