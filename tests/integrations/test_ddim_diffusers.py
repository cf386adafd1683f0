"""FusedDDIMScheduler against diffusers' DDIMScheduler (fp32): every step of whole 10/20/50-step loops with a dummy
model, over spacings, eta, prediction types, set_alpha_to_one, steps_offset, clipping; diffusers' pinned full loops;
generator and variance_noise; the fallback for thresholding; bad input; accelerate() on a DDIMPipeline. And the
native sampler, GaussianDiffusion.sample(method="ddim"), against a whole DDIMScheduler chain in float64."""

import itertools
import logging

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import ops
from tests.helpers import diffusers_float64, needs_cpu

diffusers = pytest.importorskip("diffusers")
BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=True)


def _dummy(x, t):
    """diffusers' scheduler-test model: output = x * t / (t + 1)."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return x * t / (t + 1)


def _pair(**config):
    cfg = {**BASE, **config}
    return diffusers.DDIMScheduler(**cfg), df.FusedDDIMScheduler(**cfg)


def _err(a, b, *inputs):
    """max |a - b| relative to max(1, |b|, |inputs|): x0 is a difference of terms as large as x_t."""
    scale = max([1.0, b.abs().max().item()] + [x.abs().max().item() for x in inputs])
    return (a - b).abs().max().item() / scale


def _loop_steps(theirs, ours, steps, eta, use_clipped=False):
    """Both schedulers step from diffusers' x at every step (same inputs, same generator draws); returns the worst
    per-step error, the chain's error when ours runs on its own output, and the trace of our steps."""
    for s in (theirs, ours):
        s.set_timesteps(steps)
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x, y = start.clone(), start.clone()
    ga, gb, gc = (torch.Generator().manual_seed(1) for _ in range(3))
    worst, kw = 0.0, dict(eta=eta, use_clipped_model_output=use_clipped)
    with ops.trace() as calls:
        for t in theirs.timesteps:
            m = _dummy(x, t)
            a = theirs.step(m, t, x, generator=ga, **kw)
            b = ours.step(m, t, x, generator=gb, **kw)
            assert ours.fused and type(b) is type(a)
            worst = max(
                worst, _err(b.prev_sample, a.prev_sample, x), _err(b.pred_original_sample, a.pred_original_sample, x)
            )
            y = ours.step(_dummy(y, t), t, y, generator=gc, **kw).prev_sample
            x = a.prev_sample
    return worst, _err(y, x), calls


SWEEP = list(
    itertools.product(
        ["leading", "trailing", "linspace"], [0.0, 1.0], ["epsilon", "sample", "v_prediction"], [True, False], [0, 1]
    )
)


@needs_cpu
@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("spacing, eta, pt, alpha_to_one, offset", SWEEP, ids=lambda v: str(v))
def test_every_step_of_the_loop_equals_diffusers(steps, spacing, eta, pt, alpha_to_one, offset):
    cfg = dict(timestep_spacing=spacing, prediction_type=pt, set_alpha_to_one=alpha_to_one, steps_offset=offset)
    theirs, ours = _pair(**cfg)
    worst, chain, calls = _loop_steps(theirs, ours, steps, eta)
    print(f"{cfg} eta={eta} {steps} steps: worst step err {worst:.3g}, chain err {chain:.3g}; {calls.summary()}")
    calls.require_fused("FusedDDIMScheduler.step", backend="cpu", ops=["ddpm_step"])
    assert len(calls) == 2 * steps
    assert worst <= 1e-6 and chain <= 1e-5


@needs_cpu
@pytest.mark.parametrize("clip, clip_range, use_clipped", [(True, 1.0, True), (True, 0.5, False), (False, 1.0, True)])
@pytest.mark.parametrize("pt", ["epsilon", "sample", "v_prediction"])
def test_clipping_and_clipped_model_output_equal_diffusers(clip, clip_range, use_clipped, pt):
    theirs, ours = _pair(prediction_type=pt, clip_sample=clip, clip_sample_range=clip_range)
    worst, chain, calls = _loop_steps(theirs, ours, 20, 0.5, use_clipped)
    print(f"{pt} clip={clip} range={clip_range} use_clipped={use_clipped}: worst {worst:.3g}, chain {chain:.3g}")
    calls.require_fused("FusedDDIMScheduler.step", ops=["ddpm_step"])
    assert worst <= 1e-6 and chain <= 1e-5


@needs_cpu
@pytest.mark.parametrize(
    "config, result_sum, result_mean",
    [
        (dict(), 172.0067, 0.223967),
        (dict(prediction_type="v_prediction"), 52.5302, 0.0684),
        (dict(set_alpha_to_one=True, beta_start=0.01), 149.8295, 0.1951),
        (dict(set_alpha_to_one=False, beta_start=0.01), 149.0784, 0.1941),
    ],
)
def test_diffusers_pinned_full_loops(config, result_sum, result_mean):
    """diffusers' own DDIM full loops (10 steps, eta 0, its deterministic sample), their pinned sums and means."""
    _, ours = _pair(**config)
    n = 4 * 3 * 8 * 8
    x = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
    ours.set_timesteps(10)
    with ops.trace() as calls:
        for t in ours.timesteps:
            x = ours.step(_dummy(x, t), t, x, 0.0).prev_sample
    calls.require_fused("full loop", ops=["ddpm_step"])
    print(f"{config}: sum {x.abs().sum():.4f} (pinned {result_sum}), mean {x.abs().mean():.6f}")
    assert abs(x.abs().sum().item() - result_sum) < 1e-2 and abs(x.abs().mean().item() - result_mean) < 1e-3


@needs_cpu
def test_noise_drawn_as_diffusers_draws_it():
    theirs, ours = _pair()
    for s in (theirs, ours):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m, t = _dummy(x, 501), ours.timesteps[5]
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    a = theirs.step(m, t, x, eta=1.0, variance_noise=z).prev_sample
    assert _err(ours.step(m, t, x, eta=1.0, variance_noise=z).prev_sample, a) <= 1e-6 and ours.fused
    torch.manual_seed(7)  # no generator: both draw from torch's default generator
    a = theirs.step(m, t, x, eta=1.0).prev_sample
    torch.manual_seed(7)
    b = ours.step(m, t, x, eta=1.0).prev_sample
    assert _err(b, a) <= 1e-6
    state = torch.get_rng_state()  # eta = 0 draws nothing, as diffusers
    ours.step(m, t, x, eta=0.0)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="generator, variance_noise"):
        ours.step(m, t, x, eta=1.0, generator=torch.Generator(), variance_noise=z)
    bad = z[:1]  # broadcast by diffusers' code: that step runs it
    a = theirs.step(m, t, x, eta=1.0, variance_noise=bad).prev_sample
    assert torch.equal(ours.step(m, t, x, eta=1.0, variance_noise=bad).prev_sample, a) and not ours.fused


@needs_cpu
def test_thresholding_runs_diffusers_code_and_says_why(caplog):
    theirs, ours = _pair(thresholding=True, prediction_type="v_prediction", sample_max_value=0.5)
    assert "thresholding" in ours.config_unfused_reason()
    for s in (theirs, ours):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with ops.trace() as calls, caplog.at_level(logging.DEBUG, logger="ddpm_fast"):
        b = ours.step(_dummy(x, 901), ours.timesteps[0], x).prev_sample
    a = theirs.step(_dummy(x, 901), theirs.timesteps[0], x).prev_sample
    assert not calls and not ours.fused and torch.equal(a, b)
    assert "runs diffusers' code" in caplog.text and "thresholding" in caplog.text


def test_bad_input_names_the_argument():
    ours = df.FusedDDIMScheduler()
    ours.set_timesteps(10)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="^eta"):
        ours.step(x, 901, x, eta=-1.0)
    with pytest.raises(ValueError, match="^eta"):
        ours.step(x, 901, x, eta=float("nan"))
    with pytest.raises(TypeError, match="^eta"):
        ours.step(x, 901, x, eta="1")
    with pytest.raises(TypeError, match="^use_clipped_model_output"):
        ours.step(x, 901, x, use_clipped_model_output="yes")
    with pytest.raises(ValueError, match="^timestep: expected values in"):
        ours.step(x, 1000, x)
    fresh = df.FusedDDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        fresh.step(x, 901, x)
    assert fresh.fused is False


def test_save_load_and_from_config(tmp_path):
    ours = df.FusedDDIMScheduler(**BASE, timestep_spacing="trailing")
    ours.save_pretrained(tmp_path)
    back = df.FusedDDIMScheduler.from_pretrained(tmp_path)
    assert type(back) is df.FusedDDIMScheduler and back.config.timestep_spacing == "trailing"
    assert isinstance(diffusers.DDIMScheduler.from_config(back.config), diffusers.DDIMScheduler)
    assert type(df.FusedDDIMScheduler.from_config(diffusers.DDIMScheduler().config)) is df.FusedDDIMScheduler


@needs_cpu
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_accelerated_ddim_pipeline_gives_the_same_images(eta):
    from tests.integrations.test_diffusers import SMALL_UNET

    torch.manual_seed(0)
    pipe = diffusers.DDIMPipeline(unet=diffusers.UNet2DModel(**SMALL_UNET).eval(), scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    scheduler = pipe.scheduler
    kw = dict(batch_size=2, num_inference_steps=10, eta=eta, output_type="np")
    original = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    report = df.accelerate(pipe)
    assert report.swapped["scheduler"] == "FusedDDIMScheduler" and isinstance(pipe.scheduler, df.FusedDDIMScheduler)
    with ops.trace() as calls:
        fast = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    calls.require_fused("accelerated DDIMPipeline", ops={"ddpm_step"})
    assert sum(c.op == "ddpm_step" for c in calls) == 10
    err = abs(fast - original).max()
    print(f"accelerated DDIMPipeline (10 steps, eta {eta}) vs original: max err {err:.3g}")
    assert err <= 1e-3
    df.deaccelerate(pipe)
    assert pipe.scheduler is scheduler


class _Model(torch.nn.Module):
    """Wraps ``model(x, t)`` for GaussianDiffusion (which reads in_channels and sample_size off the model)."""

    in_channels, sample_size = 3, 8

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t):
        return self.fn(x, t)


def _dummy_per_sample(x, t):
    return _dummy(x, torch.as_tensor(t).view(-1, *([1] * (x.dim() - 1))))


def _tiny_unet():
    torch.manual_seed(0)
    unet = df.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), sample_size=8, num_groups=4)
    return unet.eval()


def _diffusers_chain_float64(model, steps, eta, clip, generator, n):
    """diffusers' DDIMScheduler (leading spacing, no offset, set_alpha_to_one, its schedule rebuilt in float64)
    driving ``model``, from x_T and per-step noise drawn from ``generator`` in the order GaussianDiffusion.sample
    draws them (x_T, then z before each step with t > 0); the model sees float32 input, as the native chain's."""
    config = {**BASE, "clip_sample": clip, "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True}
    sched = diffusers_float64(diffusers.DDIMScheduler, **config)
    sched.set_timesteps(steps)
    x = torch.randn(n, 3, 8, 8, generator=generator).double()
    with torch.no_grad():
        for t in sched.timesteps:
            m = model(x.float(), t.expand(n)).double()
            z = torch.randn(x.shape, generator=generator).double() if t > 0 else torch.zeros_like(x)
            x = sched.step(m, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
    return x, [int(t) for t in sched.timesteps]


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize(
    "model, clip, eta",
    [("dummy", True, 0.0), ("dummy", False, 0.0), ("dummy", True, 1.0), ("unet", False, 0.0), ("unet", False, 0.5)],
)
@pytest.mark.parametrize("steps", [10, 20])
def test_native_ddim_chain_equals_diffusers_float64(backend, model, clip, eta, steps):
    """GaussianDiffusion.sample(steps=k, method="ddim") takes DDIMScheduler's timesteps (leading: T/k * i), steps to
    abar = 1 at the end (set_alpha_to_one) and computes its update: the whole chain, fp32, within 1e-5 of the float64
    one, relative to max(1, |x|). (With clip_sample, a random-weight U-Net's chain amplifies float32 rounding by
    ~1e4, diffusers' own included: the U-Net cases run without clipping; the dummy model's chain stays tame.)"""
    fn = _dummy_per_sample if model == "dummy" else _tiny_unet()
    diffusion = df.GaussianDiffusion(_Model(fn).eval(), df.NoiseSchedule.linear(1000, 1e-4, 0.02), backend=backend)
    diffusion.clip_sample = clip
    ours = diffusion.sample(
        3, generator=torch.Generator().manual_seed(7), steps=steps, method="ddim", eta=eta, progress=False
    )
    expected, timesteps = _diffusers_chain_float64(fn, steps, eta, clip, torch.Generator().manual_seed(7), 3)
    assert timesteps == [i * (1000 // steps) for i in range(steps)][::-1]
    err = (ours.double() - expected).abs()
    scale = max(1.0, expected.abs().max().item())
    print(
        f"{model} clip={clip} eta={eta} {steps} steps ({backend}): native fp32 vs diffusers float64 max err "
        f"{err.max().item():.3g}, mean err {err.mean().item():.3g}, max |x| {expected.abs().max().item():.3g}"
    )
    assert err.max().item() <= 1e-5 * scale
