"""DDIM on the fused reverse-step kernels, against diffusers' DDIMScheduler (recomputed in float64)."""

import itertools

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import assert_fp32_close, diffusers_float64, needs_cpu

diffusers = pytest.importorskip("diffusers")
S = df.NoiseSchedule.linear(1000, 1e-4, 0.02)


def _ddim_float64(**config):
    return diffusers_float64(diffusers.DDIMScheduler, **config)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
@pytest.mark.parametrize(
    "pt, clip, clipped_eps, eta",
    [
        (pt, clip, ce, eta)
        for pt, clip, ce, eta in itertools.product(
            ["epsilon", "sample", "v_prediction"], [False, True], [False, True], [0.0, 1.0]
        )
        if clip or not ce
    ],
)
def test_matches_diffusers_ddim_per_step(backend, pt, clip, clipped_eps, eta):
    sched = _ddim_float64(prediction_type=pt, clip_sample=clip, clip_sample_range=1.5)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, m, z = (1.5 * torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    ts = [int(t) for t in sched.timesteps]
    worst = 0.0
    for i in (0, 1, 25, len(ts) - 1):
        t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        expected = sched.step(
            m.double(),
            t,
            x.double(),
            eta=eta,
            use_clipped_model_output=clipped_eps,
            variance_noise=z.double() if eta > 0 else None,
        ).prev_sample
        out = df.ops.ddim_step(
            x,
            m,
            t,
            t_prev,
            S,
            z,
            eta=eta,
            prediction_type=pt,
            clip_sample=clip,
            clip_range=1.5,
            use_clipped_model_output=clipped_eps,
            backend=backend,
        )
        worst = max(worst, ((out.double() - expected).abs() / expected.abs().clamp(min=1)).max().item())
    print(f"ddim {backend} {pt} clip={clip} clipped_eps={clipped_eps} eta={eta}: max err {worst:.3g}")
    assert worst <= 1e-6


@needs_cpu
def test_fused_ddim_equals_reference_with_keyed_noise():
    x, m = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t, t_prev = torch.full((3,), 500), torch.full((3,), 480)
    out = df.ops.ddim_step(x, m, 500, 480, S, eta=0.5, seed=3, clip_sample=True, backend="cpu")
    expected = ref.ddim_step(x, m, t, t_prev, S, eta=0.5, seed=3, clip_sample=True)
    assert_fp32_close("ddim keyed", out, expected, atol=2e-5)


def test_bad_arguments():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="t_prev"):
        df.ops.ddim_step(x, x, 10, 10, S)
    with pytest.raises(ValueError, match="eta"):
        df.ops.ddim_step(x, x, 10, 5, S, eta=-1.0)
    with pytest.raises(ValueError, match="t_prev"):
        df.ops.ddim_step(x, x, 10, -2, S)
