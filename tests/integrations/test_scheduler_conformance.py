"""FusedDDPMScheduler through the behaviours diffusers' own DDPMScheduler test-suite checks, with diffusers'
DDPMScheduler as the oracle: every config its suite sweeps (each declaring whether its steps run the fused kernel or
hand back to diffusers' code, asserted through ops.trace()), save/load, the public API, custom timesteps errors,
trained betas, attribute access, compatibles, and its three full loops side by side."""

import collections
import inspect
import warnings

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast import ops
from tests.helpers import needs_cpu

diffusers = pytest.importorskip("diffusers")

BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_small",
    clip_sample=True,
)
# the sweeps of diffusers' DDPM scheduler tests, plus learned variances and a clip range, each with the path its steps
# are expected to take: FUSED (every step runs ddpm_step on a fused backend), FALLBACK (every step runs diffusers'
# code: thresholding, log or learned variances, betas that are no schedule) or PARTIAL (fused but for the steps
# whose coefficients are not finite: abar underflows at 1000 steps of betas up to 0.2)
FUSED, PARTIAL, FALLBACK = "fused", "partial", "fallback"
CONFIGS = (
    [(dict(num_train_timesteps=n), FUSED) for n in (1, 5, 100, 1000)]
    + [
        (dict(beta_start=s, beta_end=e), path)
        for s, e, path in zip([0.0001, 0.001, 0.01, 0.1], [0.002, 0.02, 0.2, 2], [FUSED, FUSED, PARTIAL, FALLBACK])
    ]
    + [(dict(beta_schedule=s), FUSED) for s in ("linear", "squaredcos_cap_v2", "scaled_linear", "sigmoid")]
    + [(dict(variance_type=v), FUSED) for v in ("fixed_small", "fixed_large")]
    + [(dict(variance_type=v), FALLBACK) for v in ("fixed_small_log", "fixed_large_log", "other")]
    + [(dict(variance_type=v), FALLBACK) for v in ("learned", "learned_range")]
    + [(dict(clip_sample=c, clip_sample_range=r), FUSED) for c in (True, False) for r in (1.0, 0.5)]
    + [(dict(thresholding=False), FUSED)]
    + [
        (dict(thresholding=True, prediction_type=p, sample_max_value=v), FALLBACK)
        for v in (0.5, 1.0, 2.0)
        for p in ("epsilon", "sample", "v_prediction")
    ]
    + [(dict(prediction_type=p), FUSED) for p in ("epsilon", "sample", "v_prediction")]
    + [(dict(timestep_spacing=s, steps_offset=1), FUSED) for s in ("leading", "trailing", "linspace")]
)
IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c, _ in CONFIGS]


def _pair(**config):
    cfg = {**BASE, **config}
    return diffusers.DDPMScheduler(**cfg), df.FusedDDPMScheduler(**cfg)


def _sample():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 8, 8, generator=g)


def _close(a, b, tol=1e-6):
    """|a - b| <= tol * max(1, |b|) elementwise; NaN only where diffusers has NaN (its degenerate configs)."""
    return bool(torch.isclose(a, b, rtol=tol, atol=tol, equal_nan=True).all())


def test_every_config_declares_its_path():
    counts = collections.Counter(path for _, path in CONFIGS)
    print(f"{len(CONFIGS)} configs: {counts[FUSED]} fused, {counts[PARTIAL]} partial, {counts[FALLBACK]} fallback")
    assert (counts[FUSED], counts[PARTIAL], counts[FALLBACK]) == (23, 1, 15)
    for config, path in CONFIGS:  # a whole-config fallback is the configuration's, and says so without tensors
        why = df.FusedDDPMScheduler(**{**BASE, **config}).config_unfused_reason()
        assert (why is not None) == (path == FALLBACK), (config, why)


@needs_cpu
@pytest.mark.parametrize("config, path", CONFIGS, ids=IDS)
def test_step_equals_diffusers_for_every_config(config, path, tmp_path):
    """Each step matches diffusers and takes the declared path: a fused step records ddpm_step on a fused backend,
    a fallback step records no ddpm_fast op and unfused_reason says why."""
    theirs, ours = _pair(**config)
    T = ours.config.num_train_timesteps
    sample = _sample()
    residual = 0.1 * sample
    if ours.config.variance_type in ("learned", "learned_range"):
        residual = torch.cat([residual, residual.flip(0) * 0.3], dim=1)
    fused, reasons = [], set()
    for spacing in (None, min(T, 10)):
        if spacing:
            theirs.set_timesteps(spacing)
            ours.set_timesteps(spacing)
        ts = [int(t) for t in ours.timesteps[:: max(1, len(ours.timesteps) // 4)]] + [int(ours.timesteps[-1])]
        for t in ts:
            a = theirs.step(residual, t, sample, generator=torch.manual_seed(t))
            with ops.trace() as calls:
                b = ours.step(residual, t, sample, generator=torch.manual_seed(t))
            why = ours.unfused_reason(residual, sample, t)
            if why is None:
                calls.require_fused(f"t={t}", ops=["ddpm_step"])
            else:
                assert not calls, f"t={t} runs diffusers' code ({why}) but {calls.summary()}"
                reasons.add(why)
            fused.append(why is None)
            assert type(a) is type(b)
            assert _close(b.prev_sample, a.prev_sample), f"t={t}: {(b.prev_sample - a.prev_sample).abs().max()}"
            assert _close(b.pred_original_sample, a.pred_original_sample)
    print(f"{path}: {sum(fused)} of {len(fused)} steps fused; fallback: {sorted(reasons) or '-'}")
    expected = {FUSED: all(fused), FALLBACK: not any(fused), PARTIAL: any(fused) and not all(fused)}[path]
    assert expected, f"declared {path}, but {sum(fused)} of {len(fused)} steps fused ({sorted(reasons)})"
    # save / load keeps the class and the outputs (diffusers' check_over_configs)
    ours = df.FusedDDPMScheduler(**{**BASE, **config})
    ours.save_config(tmp_path)
    loaded = df.FusedDDPMScheduler.from_pretrained(tmp_path)
    assert type(loaded) is df.FusedDDPMScheduler
    for t in (0, T - 1):
        o1 = ours.step(residual, t, sample, generator=torch.manual_seed(0)).prev_sample
        o2 = loaded.step(residual, t, sample, generator=torch.manual_seed(0)).prev_sample
        assert _close(o2, o1, tol=0)


@needs_cpu
@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_time_indices_and_tuple_output(t):
    theirs, ours = _pair()
    sample = _sample()
    a = theirs.step(0.1 * sample, t, sample, generator=torch.manual_seed(0), return_dict=False)
    b = ours.step(0.1 * sample, t, sample, generator=torch.manual_seed(0), return_dict=False)
    assert isinstance(b, tuple) and len(b) == len(a) == 2
    assert all(_close(y, x) for x, y in zip(a, b))
    assert b[0].shape == sample.shape
    # a timestep given as the 0-d tensor of scheduler.timesteps
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    tt = ours.timesteps[10]
    a = theirs.step(0.1 * sample, tt, sample, generator=torch.manual_seed(0)).prev_sample
    assert _close(ours.step(0.1 * sample, tt, sample, generator=torch.manual_seed(0)).prev_sample, a)


def test_variance_values():
    _, ours = _pair()
    for t, v in ((0, 0.0), (487, 0.00979), (999, 0.02)):
        assert abs(float(ours._get_variance(t)) - v) < 1e-5


def test_custom_timesteps_and_their_errors():
    _, ours = _pair()
    ours.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    prev = [int(ours.previous_timestep(t)) for t in ours.timesteps]
    assert prev == [87, 50, 1, 0, -1]
    with pytest.raises(ValueError):
        ours.set_timesteps(timesteps=[100, 87, 50, 51, 0])
    with pytest.raises(ValueError):
        ours.set_timesteps(num_inference_steps=5, timesteps=[100, 87, 50, 1, 0])
    with pytest.raises(ValueError):
        ours.set_timesteps(timesteps=[ours.config.num_train_timesteps])


def test_public_api_config_and_compatibles(tmp_path):
    _, ours = _pair()
    sample = _sample()
    assert ours.init_noise_sigma == 1.0
    assert torch.equal(ours.scale_model_input(sample, 0.0), sample)
    ours.save_pretrained(tmp_path / "s")
    loaded = df.FusedDDPMScheduler.from_pretrained(tmp_path / "s")
    cfg = dict(ours.config)
    cfg.pop("_use_default_values", None)
    assert cfg == dict(loaded.config)
    # both ways between the classes
    assert isinstance(diffusers.DDPMScheduler.from_config(ours.config), diffusers.DDPMScheduler)
    assert type(df.FusedDDPMScheduler.from_config(diffusers.DDPMScheduler(**BASE).config)) is df.FusedDDPMScheduler
    assert all(c is not None for c in ours.compatibles)
    for comp in ours.compatibles:
        try:
            other = comp.from_config(ours.config)
        except ImportError:  # a compatible scheduler whose optional dependency is missing here (torchsde)
            continue
        back = df.FusedDDPMScheduler.from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in ours.config} == dict(ours.config)
    # diffusers' rule for **kwargs in __init__
    has_kwargs = "kwargs" in inspect.signature(df.FusedDDPMScheduler.__init__).parameters
    assert has_kwargs == (len(df.FusedDDPMScheduler._deprecated_kwargs) > 0)


def test_trained_betas_and_attribute_access(tmp_path):
    ours = df.FusedDDPMScheduler(**BASE, trained_betas=np.array([0.1, 0.3]))
    ours.save_pretrained(tmp_path)
    assert df.FusedDDPMScheduler.from_pretrained(tmp_path).betas.tolist() == ours.betas.tolist()
    ours.dummy_attribute = 5
    ours.register_to_config(test_attribute=5)
    assert ours.dummy_attribute == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.save_pretrained  # noqa: B018 - attribute access must not warn
    with pytest.warns(FutureWarning):
        assert ours.test_attribute == 5
    with pytest.raises(AttributeError, match="'FusedDDPMScheduler' object has no attribute 'does_not_exist'"):
        ours.does_not_exist  # noqa: B018


@needs_cpu
def test_add_noise_equals_diffusers():
    theirs, ours = _pair()
    ours.set_timesteps(100)
    theirs.set_timesteps(100)
    sample = _sample()
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
    for t in (ours.timesteps[5][None], ours.timesteps[:4], torch.tensor(999)):
        a, b = theirs.add_noise(sample, noise, t), ours.add_noise(sample, noise, t)
        assert b.shape == sample.shape and _close(b, a)


@needs_cpu
@pytest.mark.parametrize("loop", ["no_noise", "v_prediction", "with_noise"])
def test_full_loops_match_diffusers(loop):
    """diffusers' three full loops (its dummy model x * t / (t + 1) on a deterministic sample), side by side."""
    theirs, ours = _pair(prediction_type="v_prediction" if loop == "v_prediction" else "epsilon")
    n = 4 * 3 * 8 * 8
    start = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
    if loop == "with_noise":
        noise = torch.arange(n).reshape(3, 8, 8, 4).permute(3, 0, 1, 2).flip(-1) / n * 0.5 - 0.1
        ts = theirs.timesteps[998:]
        start = theirs.add_noise(start, noise, ts[:1])
    else:
        ts = theirs.timesteps
    out = []
    with ops.trace() as calls:  # diffusers' scheduler runs no ddpm_fast op: every call is ours
        for sched in (theirs, ours):
            x, g = start.clone(), torch.manual_seed(0)
            for t in ts:
                x = sched.step(x * t / (t + 1), t, x, generator=g).prev_sample
            out.append(x)
    calls.require_fused(f"{loop} loop", ops=["ddpm_step"])
    assert len(calls) == len(ts)
    err = (out[1] - out[0]).abs().max().item()
    print(f"{loop}: sum |x| {out[1].abs().sum():.4f} (diffusers {out[0].abs().sum():.4f}), max err {err:.2e}")
    assert err < 1e-4 and abs(out[1].abs().sum() - out[0].abs().sum()) < 1e-2
