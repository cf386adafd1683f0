"""Reference reverse step p(x_{t-1} | x_t) of DDPM (Ho et al. 2020, Algorithm 2 and eq. 6-7, 15)."""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .noise import STREAM_STEP, keyed_normal


def step_coefficients(t, t_prev, schedule: NoiseSchedule, prediction_type: str, variance_type: str) -> torch.Tensor:
    """(B, 7) float64 [px, pm, q, c0, c1, cm, sigma]: x_0 = (px x_t + pm m) q and
    x_{t-1} = c0 clip(x_0) + c1 x_t + cm m + sigma z (cm = 0 for DDPM).

    From abar_t and abar_prev = abar at t_prev (1 where t_prev < 0; t_prev = t - 1 unless respaced), so that
    alpha_t = abar_t / abar_prev and beta_t = 1 - alpha_t are the step's own (eq. 7 for any subsequence of steps).
    """
    abar_all = schedule.alphas_cumprod.to(t.device)
    abar = abar_all[t]
    t_prev = t - 1 if t_prev is None else t_prev
    abar_prev = torch.where(t_prev >= 0, abar_all[t_prev.clamp(min=0)], torch.ones_like(abar))
    alpha, beta = abar / abar_prev, 1 - abar / abar_prev
    one, zero = torch.ones_like(abar), torch.zeros_like(abar)
    if prediction_type == "epsilon":  # eq. 15: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        px, pm, q = one, -(1 - abar).sqrt(), 1 / abar.sqrt()
    elif prediction_type == "sample":
        px, pm, q = zero, one, one
    elif prediction_type == "v_prediction":  # Salimans & Ho 2022: x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
        px, pm, q = abar.sqrt(), -(1 - abar).sqrt(), one
    else:
        raise ValueError(f"prediction_type: unknown {prediction_type!r}")
    c0 = abar_prev.sqrt() * beta / (1 - abar)  # eq. 7, posterior mean
    c1 = alpha.sqrt() * (1 - abar_prev) / (1 - abar)
    if variance_type == "fixed_small":  # beta~_t of eq. 7
        variance = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
    elif variance_type == "fixed_large":
        variance = beta
    else:
        raise ValueError(f"variance_type: unknown {variance_type!r}")
    sigma = variance.sqrt() * (t > 0)  # no noise at the last step
    return torch.stack([px, pm, q, c0, c1, zero, sigma], dim=1)


def predict_x0(x_t, model_output, coefficients):
    """x_0 = (px x_t + pm m) q, per sample (coefficients from :func:`step_coefficients`)."""
    k = coefficients.to(x_t.dtype).view(-1, 7, *([1] * (x_t.dim() - 1)))
    return (k[:, 0] * x_t + k[:, 1] * model_output) * k[:, 2]


def ddpm_step(
    x_t,
    model_output,
    t,
    schedule: NoiseSchedule,
    noise=None,
    *,
    seed=None,
    sample_offset=0,
    variance_type="fixed_small",
    prediction_type="epsilon",
    clip_sample=False,
    clip_range=1.0,
    t_prev=None,
    coefficients=None,
    return_x0=False,
):
    """x_{t-1} = mu~_t(x_t, x_0) + sigma_t z, with z = 0 where t == 0; t (and t_prev) are (B,) int64 tensors.

    mu~_t = c0 x_0 + c1 x_t (eq. 7), x_0 predicted from model_output and optionally clamped to
    [-clip_range, clip_range]. sigma_t^2 = beta~_t ("fixed_small") or beta_t ("fixed_large").
    z is ``noise`` if given, else drawn from the keyed generator (stream 0) with ``seed``.
    ``coefficients`` (B, 7) overrides the schedule's [px, pm, q, c0, c1, cm, sigma] (a scheduler's own numbers).
    """
    if coefficients is None:
        coefficients = step_coefficients(t, t_prev, schedule, prediction_type, variance_type)
    else:
        coefficients = coefficients.clone()
        coefficients[:, 6] *= (t > 0).to(coefficients)
    x0 = predict_x0(x_t, model_output, coefficients)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    k = coefficients.to(x_t.dtype).view(-1, 7, *([1] * (x_t.dim() - 1)))
    if noise is None:
        noise = keyed_normal(x_t.shape, seed, t, STREAM_STEP, sample_offset, x_t.device).to(x_t.dtype)
    out = k[:, 3] * x0 + k[:, 4] * x_t + k[:, 5] * model_output + k[:, 6] * noise
    return (out, x0) if return_x0 else out
