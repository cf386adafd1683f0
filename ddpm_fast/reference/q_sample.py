"""Reference forward process q(x_t | x_0) in closed form (Ho et al. 2020, eq. 4)."""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .noise import STREAM_Q_SAMPLE, keyed_normal


def gather(schedule: NoiseSchedule, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """schedule.<name>[t], cast to like's dtype and shaped (B, 1, 1, ...) to broadcast over a batch."""
    values = getattr(schedule, name).to(like.device)[t.to(like.device)]
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0, t, noise, schedule: NoiseSchedule, *, seed=None, sample_offset=0):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with t a (B,) int64 tensor.

    With noise=None, eps is drawn from the keyed generator (stream 1) and ``(x_t, eps)`` is returned.
    """
    drawn = noise is None
    if drawn:
        noise = keyed_normal(x0.shape, seed, t, STREAM_Q_SAMPLE, sample_offset, x0.device).to(x0.dtype)
    x_t = (
        gather(schedule, "sqrt_alphas_cumprod", t, x0) * x0
        + gather(schedule, "sqrt_one_minus_alphas_cumprod", t, x0) * noise
    )
    return (x_t, noise) if drawn else x_t
