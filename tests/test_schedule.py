import math

import pytest
import torch

import ddpm_fast as df

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "ours, config",
    [
        (lambda: df.NoiseSchedule.linear(1000, 1e-4, 0.02), dict(beta_schedule="linear")),
        (lambda: df.NoiseSchedule.linear(10, 1e-3, 0.2), dict(num_train_timesteps=10, beta_start=1e-3, beta_end=0.2)),
        (lambda: df.NoiseSchedule.cosine(1000), dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_matches_diffusers_alphas_cumprod(ours, config):
    s = ours()
    ref = diffusers.DDPMScheduler(**config)
    err = (s.alphas_cumprod - ref.alphas_cumprod.double()).abs().max().item()
    print(f"alphas_cumprod max err vs diffusers (float32): {err:.3g}")
    assert s.alphas_cumprod.dtype == torch.float64
    assert err < 1e-6  # diffusers keeps float32; ours is float64


def test_variance_values_of_diffusers_test():
    s = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
    # diffusers' DDPMSchedulerTest.test_variance
    assert abs(s.variance(0) - 0.0) < 1e-5
    assert abs(s.variance(487) - 0.00979) < 1e-5
    assert abs(s.variance(999) - 0.02) < 1e-5
    assert s.variance(999, "fixed_large") == pytest.approx(0.02)


def test_derived_terms_follow_the_paper():
    s = df.NoiseSchedule.linear(100, 1e-4, 0.05)
    abar = torch.cumprod(1 - s.betas, 0)
    torch.testing.assert_close(s.alphas_cumprod, abar, rtol=0, atol=0)
    torch.testing.assert_close(
        s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod, torch.ones(100, dtype=torch.float64)
    )
    # posterior mean coefficients of eq. 7 recombine mu~ = x_t/sqrt(alpha) - beta/(sqrt(alpha) sqrt(1-abar)) eps
    k_eps = -s.posterior_mean_coef1 * s.sqrt_recipm1_alphas_cumprod
    torch.testing.assert_close(k_eps, -s.betas / (s.alphas.sqrt() * (1 - abar).sqrt()))
    assert s.posterior_variance[0] == 0
    assert math.isfinite(s.posterior_log_variance_clipped[0].item())
    assert len(s) == 100 and "T=100" in repr(s)


def test_from_betas_round_trip():
    betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
    torch.testing.assert_close(df.NoiseSchedule.from_betas(betas.tolist()).betas, betas)


@pytest.mark.parametrize(
    "make, err",
    [
        (lambda: df.NoiseSchedule.from_betas([0.1, float("nan")]), ValueError),
        (lambda: df.NoiseSchedule.from_betas([0.1, float("inf")]), ValueError),
        (lambda: df.NoiseSchedule.from_betas([0.1, -0.1]), ValueError),
        (lambda: df.NoiseSchedule.from_betas([]), ValueError),
        (lambda: df.NoiseSchedule.from_betas("abc"), TypeError),
        (lambda: df.NoiseSchedule.linear(0), ValueError),
        (lambda: df.NoiseSchedule.linear(10, 0.1, 0.01), ValueError),
    ],
)
def test_bad_schedules(make, err):
    with pytest.raises(err, match="betas|num_timesteps|beta_start"):
        make()
