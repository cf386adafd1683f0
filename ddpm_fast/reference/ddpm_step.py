"""Reference reverse step p(x_{t-1} | x_t) of DDPM (Ho et al. 2020, Algorithm 2 and eq. 6-7, 15)."""

from __future__ import annotations

from ..schedule import NoiseSchedule
from .noise import STREAM_STEP, keyed_normal
from .q_sample import gather


def predict_x0(x_t, model_output, t, schedule: NoiseSchedule, prediction_type: str):
    """x_0 from the model's output: eq. 15 for epsilon, identity for sample, Salimans & Ho (2022) for v."""
    if prediction_type == "epsilon":
        return (
            gather(schedule, "sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - gather(schedule, "sqrt_recipm1_alphas_cumprod", t, x_t) * model_output
        )
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return (
            gather(schedule, "sqrt_alphas_cumprod", t, x_t) * x_t
            - gather(schedule, "sqrt_one_minus_alphas_cumprod", t, x_t) * model_output
        )
    raise ValueError(f"prediction_type: unknown {prediction_type!r}")


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
):
    """x_{t-1} = mu~_t(x_t, x_0) + sigma_t z, with z = 0 where t == 0; t is a (B,) int64 tensor.

    mu~_t = coef1_t x_0 + coef2_t x_t (eq. 7), x_0 predicted from model_output and optionally clamped to
    [-clip_range, clip_range]. sigma_t^2 = beta~_t ("fixed_small") or beta_t ("fixed_large").
    z is ``noise`` if given, else drawn from the keyed generator (stream 0) with ``seed``.
    """
    x0 = predict_x0(x_t, model_output, t, schedule, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    mean = (
        gather(schedule, "posterior_mean_coef1", t, x_t) * x0 + gather(schedule, "posterior_mean_coef2", t, x_t) * x_t
    )
    if variance_type == "fixed_small":
        var_name = "posterior_variance"
    elif variance_type == "fixed_large":
        var_name = "betas"
    else:
        raise ValueError(f"variance_type: unknown {variance_type!r}")
    if noise is None:
        noise = keyed_normal(x_t.shape, seed, t, STREAM_STEP, sample_offset, x_t.device).to(x_t.dtype)
    variance = gather(schedule, var_name, t, x_t)
    sigma = variance.sqrt() * (t > 0).to(variance).view_as(variance)  # no noise at the last step
    return mean + sigma * noise
