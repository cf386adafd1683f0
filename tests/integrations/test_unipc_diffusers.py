"""FusedUniPCMultistepScheduler against diffusers' UniPCMultistepScheduler: whole sampling loops, fallbacks, bad input,
accelerate()."""

import logging

import pytest
import torch

import ddpm_fast as df

diffusers = pytest.importorskip("diffusers")
needs_cpu = pytest.mark.skipif(not df.backends()["cpu"].startswith("available"), reason="cpu extension not built")
FUSED = ["triton", pytest.param("cpu", marks=needs_cpu)]


def _dummy(x, t):
    """diffusers' scheduler-test model: output = x * t / (t + 1)."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return x * t / (t + 1)


def _loop(scheduler, steps, x, dtype=torch.float32, float64_sigmas=False):
    scheduler.set_timesteps(steps)
    if float64_sigmas:  # diffusers' UniPC step computes in the sample's dtype: float64 sigmas and data, its oracle
        scheduler.sigmas = scheduler.sigmas.double()
    x = x.to(dtype)
    fused = []
    for t in scheduler.timesteps:
        x = scheduler.step(_dummy(x, t), t, x).prev_sample
        fused.append(getattr(scheduler, "fused", None))
    return x, fused


def _pair(**config):
    return diffusers.UniPCMultistepScheduler(**config), df.FusedUniPCMultistepScheduler(**config)


CONFIGS = [
    dict(),  # diffusers' defaults: bh2, order 2, epsilon, lower_order_final, final sigma zero
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_order=3, solver_type="bh1", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    dict(prediction_type="sample", timestep_spacing="trailing"),
    dict(solver_order=3, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
    dict(lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(use_karras_sigmas=True, solver_order=3),
    dict(use_karras_sigmas=True, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(disable_corrector=[0, 3]),
    dict(beta_schedule="scaled_linear", solver_order=3),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_loop_equals_diffusers(backend, config, steps):
    theirs, ours = _pair(**config)
    ours.backend = backend
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, _ = _loop(theirs, steps, x)
    with df.ops.trace() as calls:
        got, fused = _loop(ours, steps, x)
    oracle, _ = _loop(diffusers.UniPCMultistepScheduler(**config), steps, x, torch.float64, float64_sigmas=True)
    err = (got - expected).abs().max().item()
    ours_err, their_err = ((a.double() - oracle).abs().max().item() for a in (got, expected))
    bound = 1e-6 * max(1.0, expected.abs().max().item())
    print(
        f"{backend} {config} {steps} steps: max err vs diffusers {err:.3g}; vs the float64 oracle {ours_err:.3g}, "
        f"diffusers' own {their_err:.3g} (max |x| {expected.abs().max().item():.3g})"
    )
    assert ours.config_unfused_reason() is None and all(fused)
    calls.require_fused("FusedUniPCMultistepScheduler.step", backend=backend, ops={"dpmpp_step"})
    assert len(calls) == steps
    # within 1e-6 (relative) of diffusers' fp32 loop, or else no further from the float64 oracle than 1e-6 or twice
    # diffusers' own fp32 loop: a third-order last step to sigma_min weighs the history's accumulated rounding by ~9,
    # and both fp32 loops land ~1e-6 from the oracle there (each step before it: ours no further than diffusers')
    assert err <= bound or ours_err <= max(bound, 2 * their_err), (err, ours_err, their_err)
    assert their_err <= 1e-5 * max(1.0, expected.abs().max().item())


def test_corrector_runs_and_matters():
    """The corrected sample is what diffusers keeps as last_sample, step by step; without the corrector the loop
    differs (the test above would notice a missing UniC)."""
    theirs, ours = _pair(solver_order=3)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = x.clone(), x.clone()
    for t in theirs.timesteps:
        a = theirs.step(_dummy(a, t), t, a).prev_sample
        b = ours.step(_dummy(b, t), t, b).prev_sample
        err = (ours.last_sample - theirs.last_sample).abs().max().item()
        assert err <= 1e-6 * max(1.0, theirs.last_sample.abs().max().item()), err
        assert ours.this_order == theirs.this_order and ours.lower_order_nums == theirs.lower_order_nums
    plain, _ = _loop(diffusers.UniPCMultistepScheduler(solver_order=3, disable_corrector=list(range(10))), 10, x)
    assert (plain - a).abs().max() > 1e-4


LOWP = [("triton", torch.float16), pytest.param("cpu", torch.float16, marks=needs_cpu)]
LOWP += [pytest.param("cpu", torch.bfloat16, marks=needs_cpu)]


@pytest.mark.parametrize("backend, dtype", LOWP)
def test_low_precision_loop_close_to_diffusers(backend, dtype):
    theirs, ours = _pair(solver_order=3)
    ours.backend = backend
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, _ = _loop(theirs, 20, x, dtype)
    got, fused = _loop(ours, 20, x, dtype)
    r32, _ = _loop(diffusers.UniPCMultistepScheduler(solver_order=3), 20, x)
    err, torch_err = (got.float() - r32).abs().max().item(), (expected.float() - r32).abs().max().item()
    print(f"{backend} {dtype} 20 steps: max err vs fp32 {err:.3g}, diffusers in {dtype} {torch_err:.3g}")
    assert all(fused) and got.dtype == dtype
    assert err <= 2 * torch_err + {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize(
    "config, reason",
    [
        (dict(predict_x0=False), "predict_x0"),
        (dict(thresholding=True), "thresholding"),
        (dict(solver_type="bh1"), "bh1 to a final sigma of zero"),  # diffusers' own maths gives NaN there
    ],
)
def test_falls_back_to_diffusers_and_says_why(config, reason, caplog):
    theirs, ours = _pair(**config)
    ours.backend = "triton"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, _ = _loop(theirs, 10, x)
    with df.ops.trace() as calls, caplog.at_level(logging.DEBUG, logger="ddpm_fast"):
        got, fused = _loop(ours, 10, x)
    assert "runs diffusers' code" in caplog.text and reason in caplog.text
    if reason.startswith("bh1"):  # only the last step
        assert all(fused[:-1]) and not fused[-1] and ours.config_unfused_reason() is None
        assert got.isnan().any() == expected.isnan().any()
    else:
        assert not any(fused) and reason in ours.config_unfused_reason()
        assert "dpmpp_step" not in calls.ops()
        assert torch.allclose(got, expected, rtol=0, atol=0, equal_nan=True)  # diffusers' own numbers, NaN or not


def test_bad_input_is_named_before_any_step():
    with pytest.raises(ValueError, match="^solver_order: the fused UniPC"):
        df.FusedUniPCMultistepScheduler(solver_order=4).set_timesteps(10)
    s = df.FusedUniPCMultistepScheduler()
    with pytest.raises(ValueError, match=r"^num_inference_steps: expected an int in \[1, 1000\]"):
        s.set_timesteps(1001)
    s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="^model_output: expected the sample's shape"):
        s.step(torch.randn(2, 3, 4, 4), s.timesteps[0], x)
    x = s.step(torch.randn_like(x), s.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="^timestep: the next step is"):
        s.step(torch.randn_like(x), s.timesteps[2], x)
    s.step(torch.randn_like(x), s.timesteps[1], x)
    with pytest.raises(ValueError, match="set_timesteps"):
        df.FusedUniPCMultistepScheduler().step(torch.zeros(1, 3, 4, 4), 999, torch.zeros(1, 3, 4, 4))


def test_save_load_round_trip(tmp_path):
    ours = df.FusedUniPCMultistepScheduler(solver_type="bh1", solver_order=3)
    ours.save_pretrained(tmp_path)
    back = df.FusedUniPCMultistepScheduler.from_pretrained(tmp_path)
    assert type(back) is df.FusedUniPCMultistepScheduler and back.config.solver_type == "bh1"
    assert isinstance(diffusers.UniPCMultistepScheduler.from_config(back.config), diffusers.UniPCMultistepScheduler)


def _pipeline_loop(pipe, steps, x):
    """A pipeline's denoising loop written out (diffusers' DDPMPipeline passes a generator to step, which
    UniPCMultistepScheduler.step does not take)."""
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x).prev_sample
    return x


@needs_cpu
def test_accelerate_swaps_unipc_and_gives_the_same_images():
    from tests.integrations.test_diffusers import SMALL_UNET

    torch.manual_seed(0)
    scheduler = diffusers.UniPCMultistepScheduler(solver_order=3)
    pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**SMALL_UNET).eval(), scheduler=scheduler)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    original = _pipeline_loop(pipe, 10, x)
    report = df.accelerate(pipe)
    assert report.swapped["scheduler"] == "FusedUniPCMultistepScheduler"
    assert isinstance(pipe.scheduler, df.FusedUniPCMultistepScheduler) and pipe.scheduler.config.solver_order == 3
    with df.ops.trace() as calls:
        fast = _pipeline_loop(pipe, 10, x)
    calls.require_fused("accelerated pipeline with UniPC", ops={"dpmpp_step"})
    err = (fast - original).abs().max().item()
    print(f"accelerated UNet2DModel + UniPC (order 3, 10 steps) vs original: max err {err:.3g}")
    assert err <= 1e-3
    df.deaccelerate(pipe)
    assert pipe.scheduler is scheduler
    other = diffusers.DDPMPipeline(unet=pipe.unet, scheduler=diffusers.UniPCMultistepScheduler(predict_x0=False))
    with pytest.raises(df.AccelerateError, match="predict_x0"):
        df.accelerate(other)
