"""Reference DPM-Solver++ multistep update (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction, orders
1 and 2, no thresholding.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), the step from s0 = t to
the target t' (t_prev; -1 steps to x_0, abar = 1, sigma = 0) with h = lambda_t' - lambda_s0 is

    D0      = x_0 predicted from the model output at s0 (epsilon, sample or v)
    order 1 = x_t' = (sigma_t' / sigma_s0) x - alpha_t' (e^{-h} - 1) D0              (DDIM's update, eta = 0)
    order 2 = x_t' = (sigma_t' / sigma_s0) x - alpha_t' (e^{-h} - 1) (D0 + (D0 - D1) / (2 r0))     ("midpoint")
              x_t' = (sigma_t' / sigma_s0) x - alpha_t' (e^{-h} - 1) D0
                     + alpha_t' ((e^{-h} - 1) / h + 1) (D0 - D1) / r0                               ("heun")

where D1 is the x_0 predicted at the previous step s1 = t_last and r0 = h_0 / h, h_0 = lambda_s0 - lambda_s1. A
step to x_0 (sigma_t' = 0, h infinite) is first order (r0 = 0 there; diffusers' final step does the same).

Every form is linear in (x, D0, D0 - D1), with D0 = (px x + pm m) q: the fused kernels take the (B, 6) coefficient
row [px, pm, q, a_x, a_0, a_d] and compute x_t' = a_x x + a_0 D0 + a_d (D0 - D1) in one pass, writing D0 beside x_t'
for the next step. The difference D0 - D1 is formed in the kernel, as diffusers forms it: folded into separate D0
and D1 terms, a_0 and a_1 grow large and opposite where r0 is small, and their roundings no longer cancel.
"""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .ddpm_step import step_coefficients

SOLVER_TYPES = ("midpoint", "heun")


def _alpha_sigma_lambda(abar: torch.Tensor):
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return alpha, sigma, alpha.log() - sigma.log()


def _abar(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """abar at t (float64); 1 where t < 0 (x_0)."""
    abar_all = schedule.alphas_cumprod.to(t.device)
    return torch.where(t >= 0, abar_all[t.clamp(min=0)], torch.ones(t.shape, dtype=abar_all.dtype, device=t.device))


def dpmpp_coefficients(
    t, t_prev, schedule: NoiseSchedule, prediction_type: str, t_last=None, solver_type: str = "midpoint"
) -> torch.Tensor:
    """(B, 6) float64 [px, pm, q, a_x, a_0, a_d]: D0 = (px x + pm m) q, x_{t_prev} = a_x x + a_0 D0 + a_d (D0 - D1).

    t_last=None: first order (a_d = 0); else second order from the previous step at t_last (> t).
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    base = step_coefficients(t, t_prev, schedule, prediction_type, "fixed_small")
    px, pm, q = base[:, 0], base[:, 1], base[:, 2]
    alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(_abar(schedule, t))
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(_abar(schedule, t_prev))
    h = lambda_t - lambda_s0
    e = alpha_t * torch.expm1(-h)  # alpha_t' (e^{-h} - 1), -alpha_t' where h is infinite
    a_x, a_0, a_d = sigma_t / sigma_s0, -e, torch.zeros_like(e)
    if t_last is not None:
        _, _, lambda_s1 = _alpha_sigma_lambda(_abar(schedule, t_last))
        second = t_prev >= 0
        inv_r0 = torch.where(second, h / (lambda_s0 - lambda_s1), torch.zeros_like(h))
        if solver_type == "midpoint":  # - e (D0 + (D0 - D1) / (2 r0))
            a_d = -0.5 * e * inv_r0
        else:  # + alpha_t' ((e^{-h} - 1) / h + 1) (D0 - D1) / r0
            a_d = torch.where(second, alpha_t * (torch.expm1(-h) / h + 1) * inv_r0, torch.zeros_like(h))
    return torch.stack([px, pm, q, a_x, a_0, a_d], dim=1)


def dpmpp_step(
    x_t,
    model_output,
    t,
    t_prev,
    schedule: NoiseSchedule,
    x0_last=None,
    t_last=None,
    *,
    prediction_type="epsilon",
    solver_type="midpoint",
    coefficients=None,
):
    """One DPM-Solver++ step x_t -> x_{t_prev}; returns (x_{t_prev}, D0). t, t_prev, t_last: (B,) int64 tensors.

    Written as the formulas above. ``coefficients`` (B, 6) instead evaluates the row form the kernels run (a
    scheduler's own numbers); x0_last is then needed where a_d != 0.
    """
    if coefficients is not None:
        k = coefficients.to(x_t.dtype).view(-1, 6, *([1] * (x_t.dim() - 1)))
        x0 = (k[:, 0] * x_t + k[:, 1] * model_output) * k[:, 2]
        out = k[:, 3] * x_t + k[:, 4] * x0
        if x0_last is not None:
            out = out + k[:, 5] * (x0 - x0_last)
        return out, x0
    if (x0_last is None) != (t_last is None):
        raise ValueError("x0_last, t_last: give both (second order) or neither (first order)")
    base = step_coefficients(t, t_prev, schedule, prediction_type, "fixed_small")

    def per_sample(v):
        return v.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))

    x0 = (per_sample(base[:, 0]) * x_t + per_sample(base[:, 1]) * model_output) * per_sample(base[:, 2])
    alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(_abar(schedule, t))
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(_abar(schedule, t_prev))
    h = lambda_t - lambda_s0
    out = per_sample(sigma_t / sigma_s0) * x_t - per_sample(alpha_t * torch.expm1(-h)) * x0
    if x0_last is not None:
        _, _, lambda_s1 = _alpha_sigma_lambda(_abar(schedule, t_last))
        second = t_prev >= 0
        r0 = (lambda_s0 - lambda_s1) / h
        d1 = (x0 - x0_last) / per_sample(torch.where(second, r0, torch.ones_like(r0)))
        if solver_type == "midpoint":
            corr = -0.5 * alpha_t * torch.expm1(-h)
        elif solver_type == "heun":
            corr = alpha_t * (torch.expm1(-h) / h + 1)
        else:
            raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
        out = out + per_sample(torch.where(second, corr, torch.zeros_like(corr))) * d1
    return out, x0
