"""Reference DDIM update (Song, Meng & Ermon 2021, eq. 12 and 16) in the reverse-step coefficient form.

    x_{t'} = sqrt(abar_{t'}) x_0 + sqrt(1 - abar_{t'} - sigma^2) eps + sigma z,
    sigma  = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})

with t' the previous timestep of the (respaced) schedule, x_0 predicted as for DDPM and optionally clipped, and
eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) from the unclipped x_0 (diffusers' default) or from the clipped
one (use_clipped_model_output, as in GLIDE). Both are linear in (clip(x_0), x_t, m), so DDIM runs on the fused
reverse-step kernels with its own coefficient table.
"""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .ddpm_step import ddpm_step, step_coefficients


def ddim_coefficients(
    t, t_prev, schedule: NoiseSchedule, prediction_type: str, eta: float, use_clipped_model_output: bool = False
) -> torch.Tensor:
    """(B, 7) float64 [px, pm, q, c0, c1, cm, sigma] of the DDIM update from t to t_prev (-1: to x_0, abar = 1)."""
    base = step_coefficients(t, t_prev, schedule, prediction_type, "fixed_small")
    px, pm, q = base[:, 0], base[:, 1], base[:, 2]
    abar_all = schedule.alphas_cumprod.to(t.device)
    abar = abar_all[t]
    abar_prev = torch.where(t_prev >= 0, abar_all[t_prev.clamp(min=0)], torch.ones_like(abar))
    a, s = abar.sqrt(), (1 - abar).sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    if use_clipped_model_output:  # eps from the clipped x_0
        c0, c1, cm = abar_prev.sqrt() - direction * a / s, direction / s, torch.zeros_like(a)
    else:  # eps from the unclipped x_0 = (px x + pm m) q
        c0 = abar_prev.sqrt()
        c1 = direction / s - direction * a * q * px / s
        cm = -direction * a * q * pm / s
    return torch.stack([px, pm, q, c0, c1, cm, sigma * (t > 0)], dim=1)


def ddim_step(
    x_t,
    model_output,
    t,
    t_prev,
    schedule: NoiseSchedule,
    noise=None,
    *,
    eta=0.0,
    seed=None,
    sample_offset=0,
    prediction_type="epsilon",
    clip_sample=False,
    clip_range=1.0,
    use_clipped_model_output=False,
):
    """One DDIM step x_t -> x_{t_prev}; t and t_prev are (B,) int64 tensors."""
    k = ddim_coefficients(t, t_prev, schedule, prediction_type, eta, use_clipped_model_output)
    return ddpm_step(
        x_t,
        model_output,
        t,
        schedule,
        noise,
        seed=seed,
        sample_offset=sample_offset,
        clip_sample=clip_sample,
        clip_range=clip_range,
        coefficients=k,
    )
