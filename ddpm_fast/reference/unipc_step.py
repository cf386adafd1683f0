"""Reference UniPC step (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), data prediction
(predict_x0), B(h) = h ("bh1") or e^h - 1 ("bh2"), orders 1 to 3, as diffusers' UniPCMultistepScheduler runs it.

With alpha, sigma, lambda = log(alpha / sigma) as in ddpm_fast/reference/dpmpp_step.py, one step at s0 with target t
(h = lambda_t - lambda_s0, hh = -h) and data predictions m0 (at s0) and m_k (at earlier steps s_k) is

    r_k     = (lambda_{s_k} - lambda_s0) / h,  D1s_k = (m_k - m0) / r_k,   r = (r_1, .., r_{p-1}, 1)
    phi     = e^{hh} - 1,  B = hh (bh1) or e^{hh} - 1 (bh2)
    R_ij    = r_j^(i-1),   b_i = i! h phi_{i+1}(hh) / B   (h phi_{k+1} = h phi_k / hh - 1/k!, h phi_1 = phi / hh - 1)
    x_t     = (sigma_t / sigma_s0) x - alpha_t phi m0 - alpha_t B sum_k rho_k D1s_k               (+ corrector term)

The predictor UniP of order p uses rho = 1/2 (p = 2) or R[:-1, :-1]^-1 b[:-1] (p = 3) and no corrector term; the
corrector UniC of order p, run when the model output m_t at the new point t is known, uses rho = 1/2 (p = 1) or
R^-1 b and adds - alpha_t B rho_p (m_t - m0). diffusers' step at t: D0 = x_0 predicted from (x, model output);
the corrected sample y = UniC(last sample L, from the previous step's s0 to t, m0 = D1, m_k = D2, D3, m_t = D0);
then x_next = UniP(y, from t to t_next, m0 = D0, m_k = D1, D2); y is kept as the next step's L.

Both are linear in (x, L, D0, D1, D2, D3): the fused kernel's (B, 14) row (ddpm_fast/reference/dpmpp_step.py)
carries them as y = c_l L + c_1 D1 + c_d (D0 - D1) + c_e (D1 - D2) + c_f (D1 - D3) and
x_next = a_x y + a_0 D0 + a_d (D0 - D1) + a_e (D0 - D2) (its G with rho = -1: diffusers' D1s are differences from
m0, formed in the kernel).
"""

from __future__ import annotations

import math

import torch

from .ddpm_step import step_coefficients
from .dpmpp_step import ROW, _abar, _alpha_sigma_lambda

SOLVER_TYPES = ("bh1", "bh2")


def _rhos(h, lambda_s0, lambdas, order, solver_type, corrector):
    """(phi, B, rho, r): UniP's (corrector=False) or UniC's rho over the D1s of ``lambdas`` (the earlier steps),
    each computed as diffusers computes it, in the dtype of its inputs."""
    rks = [(lam - lambda_s0) / h for lam in lambdas] + [torch.ones_like(h)]
    hh = -h
    phi = torch.expm1(hh)
    h_phi_k = phi / hh - 1
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    R, b, factorial = [], [], 1
    rks_t = torch.stack(rks)
    for i in range(1, order + 1):
        R.append(torch.pow(rks_t, i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(R), torch.stack(b)
    if corrector:
        rho = torch.full((1,), 0.5, dtype=h.dtype) if order == 1 else torch.linalg.solve(R, b)
    elif order == 1:
        rho = torch.zeros(0, dtype=h.dtype)
    else:
        rho = torch.full((1,), 0.5, dtype=h.dtype) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    return phi, B_h, rho, rks


def predictor_terms(alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambdas, order, solver_type):
    """[a_x, a_0, a_d, a_e] (float64) of UniP from s0 to t with m0 = D0 and m_k = D1, D2 at ``lambdas``:
    x_t = a_x x + a_0 D0 + a_d (D0 - D1) + a_e (D0 - D2). Scalars (0-d tensors); the terms are computed in their
    dtype as diffusers computes them, the products folded in float64."""
    h = lambda_t - lambda_s0
    phi, B_h, rho, rks = _rhos(h, lambda_s0, lambdas[: order - 1], order, solver_type, corrector=False)
    K = (alpha_t * B_h).double()
    zero = torch.zeros((), dtype=torch.float64)
    a = [(sigma_t / sigma_s0).double(), (-(alpha_t * phi)).double(), zero, zero]
    for k in range(order - 1):  # - K rho_k (D_{k+1} - D0) / r_k
        a[2 + k] = K * rho[k].double() / rks[k].double()
    return a


def corrector_terms(alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambdas, order, solver_type):
    """[c_l, c_1, c_d, c_e, c_f] (float64) of UniC from s0 (the previous step, m0 = D1) to t (m_t = D0) with
    m_k = D2, D3 at ``lambdas``: y = c_l L + c_1 D1 + c_d (D0 - D1) + c_e (D1 - D2) + c_f (D1 - D3)."""
    h = lambda_t - lambda_s0
    phi, B_h, rho, rks = _rhos(h, lambda_s0, lambdas[: order - 1], order, solver_type, corrector=True)
    K = (alpha_t * B_h).double()
    zero = torch.zeros((), dtype=torch.float64)
    c = [(sigma_t / sigma_s0).double(), (-(alpha_t * phi)).double(), -K * rho[-1].double(), zero, zero]
    # - K rho_k (D_{k+2} - D1) / r_k: + K rho_0 / r_0 (D1 - D2) + K rho_1 / r_1 (D1 - D3)
    for k in range(order - 1):
        c[3 + k] = K * rho[k].double() / rks[k].double()
    return c


def unipc_coefficients(
    t, t_next, schedule, prediction_type, t_history=(), order=1, corrector_order=0, solver_type="bh2"
) -> torch.Tensor:
    """(B, 14) float64 rows of one UniPC step at t (B,) to t_next (-1: x_0) of a schedule: D0 from the model output
    at t (prediction_type), UniC of ``corrector_order`` (0: none) from the previous step t_history[0] to t, UniP of
    ``order`` from t to t_next. ``t_history``: the earlier steps' timesteps, newest first (D1, D2, D3's), as many as
    the orders need (max(order - 1, corrector_order))."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    base = step_coefficients(t, t_next, schedule, prediction_type, "fixed_small")
    B = t.shape[0]
    rows = torch.zeros(B, ROW, dtype=torch.float64)
    rows[:, :3] = base[:, :3]
    asl = [_alpha_sigma_lambda(_abar(schedule, v)) for v in (t_next, t, *t_history)]
    for i in range(B):
        (al_n, sg_n, lm_n), (al_t, sg_t, lm_t), *hist = ((a[i], s[i], m[i]) for a, s, m in asl)
        if t_next[i] < 0:  # to x_0: first order, as diffusers' last step (lower_order_final)
            p = predictor_terms(al_n, sg_n, sg_t, torch.tensor(math.inf, dtype=torch.float64), lm_t, [], 1, solver_type)
            p[0] = torch.zeros((), dtype=torch.float64)
        else:
            p = predictor_terms(al_n, sg_n, sg_t, lm_n, lm_t, [h[2] for h in hist], order, solver_type)
        rows[i, 3], rows[i, 4], rows[i, 5], rows[i, 6], rows[i, 7] = p[0], p[1], p[2], p[3], -1.0
        if corrector_order:
            (_, sg_s0, lm_s0), *older = hist
            c = corrector_terms(al_t, sg_t, sg_s0, lm_t, lm_s0, [h[2] for h in older], corrector_order, solver_type)
            rows[i, 9:14] = torch.stack(c)
    return rows


def unipc_step(x, d0, last_sample, history, terms_p, terms_c=None):
    """The two UniPC updates written as diffusers writes them, from their rho and r (for tests of the rows):
    ``terms_p`` = (sigma_t / sigma_s0, alpha_t, phi, B, rho, r) of UniP, ``terms_c`` likewise of UniC (or None).
    ``history``: D1, D2, D3 newest first. Returns (x_next, y)."""
    y = x
    if terms_c is not None:
        ratio, alpha_t, phi, B_h, rho, r = terms_c
        m0 = history[0]
        d1s = [(history[k + 1] - m0) / r[k] for k in range(len(rho) - 1)]
        corr = sum((rho[k] * d1s[k] for k in range(len(d1s))), torch.zeros_like(x))
        y = ratio * last_sample - alpha_t * phi * m0 - alpha_t * B_h * (corr + rho[-1] * (d0 - m0))
    ratio, alpha_t, phi, B_h, rho, r = terms_p
    d1s = [(history[k] - d0) / r[k] for k in range(len(rho))]
    pred = sum((rho[k] * d1s[k] for k in range(len(d1s))), torch.zeros_like(x))
    return ratio * y - alpha_t * phi * d0 - alpha_t * B_h * pred, y
