"""Per-sample coefficient tables in the layout the GPU kernels (Triton and CUDA) read from device memory, and
their transfer to the device without a host synchronisation."""

from __future__ import annotations

import torch


def step_table(step_coeffs: torch.Tensor) -> torch.Tensor:
    """(B, 7) [px, pm, q, c0, c1, cm, sigma] -> (B, 9) fp32 [px, pm, q, c0, c1, cm, kx, km, sigma], with the
    no-clip path's kx = c0 q px + c1 and km = c0 q pm + cm folded in float64."""
    c = step_coeffs.to(torch.float64)
    px, pm, q, c0, c1, cm, sigma = c.unbind(1)
    return torch.stack([px, pm, q, c0, c1, cm, c0 * q * px + c1, c0 * q * pm + cm, sigma], dim=1).to(torch.float32)


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
