"""Reference forward process q(x_t | x_0) in closed form (Ho et al. 2020, eq. 4)."""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .noise import STREAM_Q_SAMPLE, keyed_normal


def gather(schedule: NoiseSchedule, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """schedule.<name>[t], cast to like's dtype and shaped (B, 1, 1, ...) to broadcast over a batch."""
    values = getattr(schedule, name).to(like.device)[t.to(like.device)]
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0, t, noise, schedule: NoiseSchedule, *, seed=None, sample_offset=0, coefficients=None):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with t a (B,) int64 tensor.

    With noise=None, eps is drawn from the keyed generator (stream 1) and ``(x_t, eps)`` is returned.
    ``coefficients`` (B, 2) overrides [sqrt(abar_t), sqrt(1 - abar_t)] (a drop-in scheduler's own numbers).
    """
    drawn = noise is None
    if drawn:
        noise = keyed_normal(x0.shape, seed, t, STREAM_Q_SAMPLE, sample_offset, x0.device).to(x0.dtype)
    if coefficients is None:
        a = gather(schedule, "sqrt_alphas_cumprod", t, x0)
        b = gather(schedule, "sqrt_one_minus_alphas_cumprod", t, x0)
    else:
        a, b = (coefficients[:, i].to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1))) for i in (0, 1))
    x_t = a * x0 + b * noise
    return (x_t, noise) if drawn else x_t
