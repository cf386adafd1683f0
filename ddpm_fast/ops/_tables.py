"""Per-sample coefficient tables in the layout the GPU kernels (Triton and CUDA) read from device memory."""

from __future__ import annotations

import torch


def step_table(step_coeffs: torch.Tensor) -> torch.Tensor:
    """(B, 7) [px, pm, q, c0, c1, cm, sigma] -> (B, 9) fp32 [px, pm, q, c0, c1, cm, kx, km, sigma], with the
    no-clip path's kx = c0 q px + c1 and km = c0 q pm + cm folded in float64."""
    c = step_coeffs.to(torch.float64)
    px, pm, q, c0, c1, cm, sigma = c.unbind(1)
    return torch.stack([px, pm, q, c0, c1, cm, c0 * q * px + c1, c0 * q * pm + cm, sigma], dim=1).to(torch.float32)
