"""Reference DPM-Solver++ multistep update (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its third-order and SDE
variants as diffusers' DPMSolverMultistepScheduler runs them), data prediction, orders 1 to 3, no thresholding.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), the step from s0 = t to
the target t' (t_prev; -1 steps to x_0, abar = 1, sigma = 0) with h = lambda_t' - lambda_s0 is, for the ODE
("dpmsolver++"),

    D0      = x_0 predicted from the model output at s0 (epsilon, sample or v)
    order 1 = x_t' = (sigma_t' / sigma_s0) x - alpha_t' (e^{-h} - 1) D0              (DDIM's update, eta = 0)
    order 2 = x_t' = (sigma_t' / sigma_s0) x - alpha_t' (e^{-h} - 1) (D0 + (D0 - D1) / (2 r0))     ("midpoint")
              x_t' = (sigma_t' / sigma_s0) x - alpha_t' (e^{-h} - 1) D0
                     + alpha_t' ((e^{-h} - 1) / h + 1) (D0 - D1) / r0                               ("heun")
    order 3 = x_t' = (sigma_t' / sigma_s0) x - alpha_t' (e^{-h} - 1) D0 + c_1 E1 + c_2 E2                 ("3M")
              with c_1 = alpha_t' ((e^{-h} - 1) / h + 1), c_2 = -alpha_t' ((e^{-h} - 1 + h) / h^2 - 1/2),
              F0 = (D0 - D1) / r0, F1 = (D1 - D2) / r1, E1 = F0 + r0 / (r0 + r1) (F0 - F1), E2 = (F0 - F1) / (r0 + r1)

where D1, D2 are the x_0 predicted at the previous steps s1 = t_last, s2 = t_last2, r0 = h_0 / h, r1 = h_1 / h,
h_0 = lambda_s0 - lambda_s1, h_1 = lambda_s1 - lambda_s2. The SDE ("sde-dpmsolver++") keeps the forms with
e^{-h} - 1 -> -(1 - e^{-2h}) in the D0 and midpoint terms, a_x = (sigma_t' / sigma_s0) e^{-h}, heun's and 3M's
c_1 = alpha_t' ((1 - e^{-2h}) / (-2h) + 1), 3M's c_2 = alpha_t' ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2), and adds
sigma_t' sqrt(1 - e^{-2h}) z, z standard normal (given, or keyed: stream 0 at step t). A step to x_0
(sigma_t' = 0, h infinite) is first order and noiseless (diffusers' final step does the same).

Every form is linear in (x, D0, D0 - D1, D1 - D2, z), with D0 = (px x + pm m) q. Order 3 is written over the
first difference D0 - D1 and the second difference G = (D0 - D1) - rho (D1 - D2), rho = r0 / r1, as diffusers
forms F0 - F1 = G / r0:

    c_1 E1 + c_2 E2 = (c_1 / r0) (D0 - D1) + (c_1 r0 + c_2) / ((r0 + r1) r0) G

The fused kernels take the (B, 14) coefficient row [px, pm, q, a_x, a_0, a_d, a_e, rho, a_z, c_l, c_1, c_d, c_e, c_f]
and compute x_t' = a_x x + a_0 D0 + a_d (D0 - D1) + a_e G + a_z z in one pass, writing D0 beside x_t' for the next
step (the c_* columns are UniPC's corrector, zero here). The differences are formed in the kernel, as diffusers forms
them: folded into separate D0, D1, D2 terms, the coefficients grow large and opposite where r0 is small, and their
roundings no longer cancel (G keeps diffusers' grouping of 3M's F0 - F1). Rows of 6
([..., a_d]) and 9 ([..., a_e, rho, a_z]) columns are the same row with the rest zero.
"""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .ddpm_step import step_coefficients
from .noise import STREAM_STEP, keyed_normal

SOLVER_TYPES = ("midpoint", "heun")


def _alpha_sigma_lambda(abar: torch.Tensor):
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return alpha, sigma, alpha.log() - sigma.log()


def _abar(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """abar at t (float64); 1 where t < 0 (x_0)."""
    abar_all = schedule.alphas_cumprod.to(t.device)
    return torch.where(t >= 0, abar_all[t.clamp(min=0)], torch.ones(t.shape, dtype=abar_all.dtype, device=t.device))


COLUMNS = ("px", "pm", "q", "a_x", "a_0", "a_d", "a_e", "rho", "a_z", "c_l", "c_1", "c_d", "c_e", "c_f")
ROW = len(COLUMNS)


def history_read(k: torch.Tensor, corrected: bool) -> int:
    """How many earlier data predictions (D1, D2, D3) the (B, 14) rows read: D1 where a_d or a corrector is there,
    D2 where a_e (or the corrector's c_e), D3 where the corrector's c_f is nonzero for some sample."""
    if corrected and bool((k[:, 13] != 0).any()):
        return 3
    if bool((k[:, 6] != 0).any()) or (corrected and bool((k[:, 12] != 0).any())):
        return 2
    return 1 if corrected or bool((k[:, 5] != 0).any()) else 0


def full_row(k: torch.Tensor) -> torch.Tensor:
    """A (B, 6), (B, 9) or (B, 14) coefficient table as (B, 14), the missing columns zero."""
    if k.shape[1] == ROW:
        return k
    return torch.cat([k, k.new_zeros(k.shape[0], ROW - k.shape[1])], dim=1)


def _order3(c1, c2, r0, r1):
    """(a_d, a_e, rho) of c1 E1 + c2 E2 (3M, above) over D0 - D1 and G = (D0 - D1) - rho (D1 - D2)."""
    return c1 / r0, (c1 * r0 + c2) / ((r0 + r1) * r0), r0 / r1


def dpmpp_coefficients(
    t,
    t_prev,
    schedule: NoiseSchedule,
    prediction_type: str,
    t_last=None,
    solver_type: str = "midpoint",
    t_last2=None,
    sde: bool = False,
) -> torch.Tensor:
    """(B, 9) float64 [px, pm, q, a_x, a_0, a_d, a_e, rho, a_z]: D0 = (px x + pm m) q,
    x_{t_prev} = a_x x + a_0 D0 + a_d (D0 - D1) + a_e ((D0 - D1) - rho (D1 - D2)) + a_z z.

    t_last=None: first order (a_d = a_e = 0); t_last only: second order from the previous step at t_last (> t);
    t_last and t_last2 (> t_last): third order. ``sde``: the SDE variant (a_z != 0 except at a step to x_0).
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    if t_last2 is not None and t_last is None:
        raise ValueError("t_last: the third-order step needs t_last beside t_last2")
    base = step_coefficients(t, t_prev, schedule, prediction_type, "fixed_small")
    px, pm, q = base[:, 0], base[:, 1], base[:, 2]
    alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(_abar(schedule, t))
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(_abar(schedule, t_prev))
    h = lambda_t - lambda_s0
    zero = torch.zeros_like(h)
    inner = t_prev >= 0  # h finite: the higher-order and noise terms exist
    if sde:
        em = torch.expm1(-2 * h)  # e^{-2h} - 1, -1 where h is infinite
        a_x = sigma_t / sigma_s0 * torch.exp(-h)
        a_0 = -alpha_t * em  # alpha_t' (1 - e^{-2h})
        a_z = sigma_t * (-em).sqrt()
        mid = -0.5 * alpha_t * em  # midpoint: + 1/2 alpha_t' (1 - e^{-2h}) (D0 - D1) / r0
        hk = torch.where(inner, em / (2 * h) + 1, zero)  # (1 - e^{-2h}) / (-2h) + 1
        c2 = torch.where(inner, (-em - 2 * h) / (2 * h) ** 2 - 0.5, zero)
    else:
        em = torch.expm1(-h)  # e^{-h} - 1, -1 where h is infinite
        a_x, a_0, a_z = sigma_t / sigma_s0, -alpha_t * em, zero
        mid = -0.5 * alpha_t * em  # midpoint: - 1/2 alpha_t' (e^{-h} - 1) (D0 - D1) / r0
        hk = torch.where(inner, em / h + 1, zero)  # (e^{-h} - 1) / h + 1
        c2 = -torch.where(inner, (em + h) / h**2 - 0.5, zero)
    a_d, a_e, rho = zero, zero, zero
    if t_last is not None:
        _, _, lambda_s1 = _alpha_sigma_lambda(_abar(schedule, t_last))
        r0 = torch.where(inner, (lambda_s0 - lambda_s1) / h, torch.ones_like(h))
        if t_last2 is None:
            a_d = torch.where(inner, (mid if solver_type == "midpoint" else alpha_t * hk) / r0, zero)
        else:
            _, _, lambda_s2 = _alpha_sigma_lambda(_abar(schedule, t_last2))
            r1 = torch.where(inner, (lambda_s1 - lambda_s2) / h, torch.ones_like(h))
            a_d, a_e, rho = (torch.where(inner, v, zero) for v in _order3(alpha_t * hk, alpha_t * c2, r0, r1))
    return torch.stack([px, pm, q, a_x, a_0, a_d, a_e, rho, a_z], dim=1)


def apply_row(k, x_t, model_output, history=(), noise=None, last_sample=None):
    """The row form the kernels run, in x_t's dtype: returns (x_next, D0, y) with y = x_t, or the corrected sample
    where ``last_sample`` is given (UniPC). ``history``: (D1, D2, D3), newest first, as many as the row reads."""
    k = full_row(k).to(x_t.dtype).view(-1, ROW, *([1] * (x_t.dim() - 1)))
    d0 = (k[:, 0] * x_t + k[:, 1] * model_output) * k[:, 2]
    d = [d0, *history]
    diff = [d[j] - d[j + 1] for j in range(min(len(d) - 1, 2))]  # D0 - D1, D1 - D2
    y = x_t
    if last_sample is not None:  # the corrector: differences from D1 (UniC's m0), as diffusers forms them
        y = k[:, 9] * last_sample + k[:, 10] * d[1]
        for j, dj in enumerate([*diff, d[1] - d[3]] if len(d) > 3 else diff):  # D0 - D1, D1 - D2, D1 - D3
            y = y + k[:, 11 + j] * dj
    out = k[:, 3] * y + k[:, 4] * d0
    if diff:
        out = out + k[:, 5] * diff[0]
    if len(diff) > 1:
        out = out + k[:, 6] * (diff[0] - k[:, 7] * diff[1])
    if noise is not None:
        out = out + k[:, 8] * noise
    return out, d0, y


def dpmpp_step(
    x_t,
    model_output,
    t,
    t_prev,
    schedule: NoiseSchedule,
    x0_last=None,
    t_last=None,
    *,
    x0_last2=None,
    t_last2=None,
    sde=False,
    noise=None,
    seed=None,
    sample_offset=0,
    prediction_type="epsilon",
    solver_type="midpoint",
    coefficients=None,
):
    """One DPM-Solver++ step x_t -> x_{t_prev}; returns (x_{t_prev}, D0). t, t_prev, t_last, t_last2: (B,) int64.

    Written as the formulas above (order 3 as E1, E2; the SDE's z is ``noise``, or keyed from ``seed``, stream 0 at
    step t). ``coefficients`` (B, 6/9/14) instead evaluates the row form the kernels run (a scheduler's own
    numbers); the history is then needed where its terms are non-zero, and ``noise`` where a_z is.
    """
    if coefficients is not None:
        history = [h for h in (x0_last, x0_last2) if h is not None]
        out, x0, _ = apply_row(coefficients, x_t, model_output, history, noise)
        return out, x0
    if (x0_last is None) != (t_last is None):
        raise ValueError("x0_last, t_last: give both (second order) or neither (first order)")
    if (x0_last2 is None) != (t_last2 is None) or (x0_last2 is not None and x0_last is None):
        raise ValueError("x0_last2, t_last2: give both, beside x0_last and t_last (third order), or neither")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    base = step_coefficients(t, t_prev, schedule, prediction_type, "fixed_small")

    def per_sample(v):
        return v.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))

    x0 = (per_sample(base[:, 0]) * x_t + per_sample(base[:, 1]) * model_output) * per_sample(base[:, 2])
    alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(_abar(schedule, t))
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(_abar(schedule, t_prev))
    h = lambda_t - lambda_s0
    inner = t_prev >= 0
    safe_h = torch.where(inner, h, torch.ones_like(h))
    if sde:
        one_minus = -torch.expm1(-2 * h)  # 1 - e^{-2h}
        out = per_sample(sigma_t / sigma_s0 * torch.exp(-h)) * x_t + per_sample(alpha_t * one_minus) * x0
        mid = 0.5 * alpha_t * one_minus
        heun = alpha_t * (one_minus / (-2 * safe_h) + 1)
        third = alpha_t * ((one_minus - 2 * safe_h) / (2 * safe_h) ** 2 - 0.5)
        if noise is None:
            noise = keyed_normal(x_t.shape, seed, t, STREAM_STEP, sample_offset, x_t.device).to(x_t.dtype)
        out = out + per_sample(torch.where(inner, sigma_t * one_minus.sqrt(), torch.zeros_like(h))) * noise
    else:
        em = torch.expm1(-h)
        out = per_sample(sigma_t / sigma_s0) * x_t - per_sample(alpha_t * em) * x0
        mid, heun = -0.5 * alpha_t * em, alpha_t * (em / safe_h + 1)
        third = -alpha_t * ((em + safe_h) / safe_h**2 - 0.5)
    if x0_last is not None:
        _, _, lambda_s1 = _alpha_sigma_lambda(_abar(schedule, t_last))
        r0 = per_sample(torch.where(inner, (lambda_s0 - lambda_s1) / safe_h, torch.ones_like(h)))
        f0 = (x0 - x0_last) / r0
        if x0_last2 is None:
            corr = per_sample(mid if solver_type == "midpoint" else heun) * f0
        else:
            _, _, lambda_s2 = _alpha_sigma_lambda(_abar(schedule, t_last2))
            r1 = per_sample(torch.where(inner, (lambda_s1 - lambda_s2) / safe_h, torch.ones_like(h)))
            f1 = (x0_last - x0_last2) / r1
            e1 = f0 + r0 / (r0 + r1) * (f0 - f1)
            e2 = (f0 - f1) / (r0 + r1)
            corr = per_sample(heun) * e1 + per_sample(third) * e2
        out = out + per_sample(inner.to(h.dtype)) * corr
    return out, x0
