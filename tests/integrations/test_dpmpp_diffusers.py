"""FusedDPMSolverMultistepScheduler against diffusers' DPMSolverMultistepScheduler: whole sampling loops."""

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


def _loop(scheduler, steps, x, dtype=torch.float32):
    scheduler.set_timesteps(steps)
    x = x.to(dtype)
    fused = []
    for t in scheduler.timesteps:
        x = scheduler.step(_dummy(x, t), t, x).prev_sample
        fused.append(getattr(scheduler, "fused", None))
    return x, fused


def _pair(**config):
    return diffusers.DPMSolverMultistepScheduler(**config), df.FusedDPMSolverMultistepScheduler(**config)


CONFIGS = [
    dict(),  # diffusers' defaults: dpmsolver++, order 2, midpoint, epsilon, lower_order_final, final sigma zero
    dict(solver_order=1),
    dict(solver_type="heun"),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample", solver_type="heun"),
    dict(lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(use_karras_sigmas=True),
    dict(beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1),
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
    err = (got - expected).abs().max().item()
    print(f"{backend} {config} {steps} steps: max err {err:.3g} (max |x| {expected.abs().max().item():.3g})")
    assert ours.config_unfused_reason() is None and all(fused)
    calls.require_fused("FusedDPMSolverMultistepScheduler.step", backend=backend, ops={"dpmpp_step"})
    assert len(calls) == steps
    assert err <= 1e-6 * max(1.0, expected.abs().max().item())


# Triton's interpreter (CPU tests) casts fp32 to bf16 by truncation, not rounding to nearest as the GPU does: over a
# chain that bias grows past the bound, so bf16 loops are checked on the cpu kernels
LOWP = [("triton", torch.float16), pytest.param("cpu", torch.float16, marks=needs_cpu)]
LOWP += [pytest.param("cpu", torch.bfloat16, marks=needs_cpu)]


@pytest.mark.parametrize("backend, dtype", LOWP)
def test_low_precision_loop_close_to_diffusers(backend, dtype):
    theirs, ours = _pair()
    ours.backend = backend
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, _ = _loop(theirs, 20, x, dtype)
    got, fused = _loop(ours, 20, x, dtype)
    r32, _ = _loop(diffusers.DPMSolverMultistepScheduler(), 20, x)
    err, torch_err = (got.float() - r32).abs().max().item(), (expected.float() - r32).abs().max().item()
    print(f"{backend} {dtype} 20 steps: max err vs fp32 {err:.3g}, diffusers in {dtype} {torch_err:.3g}")
    assert all(fused) and got.dtype == dtype
    assert err <= 2 * torch_err + {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize(
    "config, reason",
    [
        (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
        (dict(solver_order=3), "solver_order"),
        (dict(thresholding=True), "thresholding"),
    ],
)
def test_falls_back_to_diffusers_and_says_why(config, reason, caplog):
    theirs, ours = _pair(**config)
    ours.backend = "triton"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, _ = _loop(theirs, 10, x)
    with df.ops.trace() as calls, caplog.at_level(logging.DEBUG, logger="ddpm_fast"):
        torch.manual_seed(1)
        got, fused = _loop(ours, 10, x)
    assert not any(fused) and reason in ours.config_unfused_reason()
    assert "runs diffusers' code" in caplog.text and reason in caplog.text
    assert "dpmpp_step" not in calls.ops()
    if "sde" not in config.get("algorithm_type", ""):  # the SDE solver draws noise: same maths, other draws
        assert torch.equal(got, expected)


def test_float64_sample_and_bad_timestep():
    theirs, ours = _pair()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    expected, _ = _loop(theirs, 10, x, torch.float64)
    got, fused = _loop(ours, 10, x, torch.float64)
    assert not any(fused) and torch.equal(got, expected)
    assert "dtype torch.float64" in ours.unfused_reason(x, x) and ours.config_unfused_reason() is None
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        ours.step(torch.zeros(1, 3, 4, 4), 1000, torch.zeros(1, 3, 4, 4))


def test_save_load_round_trip(tmp_path):
    ours = df.FusedDPMSolverMultistepScheduler(solver_type="heun")
    ours.save_pretrained(tmp_path)
    back = df.FusedDPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert back.config.solver_type == "heun"
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(back.config)
    assert isinstance(theirs, diffusers.DPMSolverMultistepScheduler)


@needs_cpu
def test_accelerated_pipeline_with_dpm_solver_gives_the_same_images():
    from tests.integrations.test_diffusers import SMALL_UNET

    torch.manual_seed(0)
    scheduler = diffusers.DPMSolverMultistepScheduler()
    pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**SMALL_UNET).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=10, output_type="np")
    original = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    report = df.accelerate(pipe)
    assert report.swapped["scheduler"] == "FusedDPMSolverMultistepScheduler"
    assert isinstance(pipe.scheduler, df.FusedDPMSolverMultistepScheduler)
    with df.ops.trace() as calls:
        fast = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    calls.require_fused("accelerated DDPMPipeline with DPM-Solver++", ops={"dpmpp_step"})
    err = abs(fast - original).max()
    print(f"accelerated DDPMPipeline (DPM-Solver++ 2M, 10 steps) vs original: max err {err:.3g}")
    assert err <= 1e-3
    df.deaccelerate(pipe)
    assert pipe.scheduler is scheduler


def test_step_before_set_timesteps_raises_as_diffusers_does():
    ours = df.FusedDPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(torch.zeros(1, 3, 4, 4), 999, torch.zeros(1, 3, 4, 4))
    assert ours.fused is False


def test_bad_input_is_named_before_any_step():
    """What diffusers would take silently or fail on obscurely: an order it has no update for, more steps than the
    training schedule, a model output of another shape, a step other than the next one."""
    with pytest.raises(ValueError, match="^solver_order: DPM-Solver"):
        df.FusedDPMSolverMultistepScheduler(solver_order=4).set_timesteps(10)
    s = df.FusedDPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match=r"^num_inference_steps: expected an int in \[1, 1000\]"):
        s.set_timesteps(1001)
    s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="^model_output: expected the sample's shape"):
        s.step(torch.randn(2, 3, 4, 4), s.timesteps[0], x)
    x = s.step(torch.randn_like(x), s.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="^timestep: the next step is"):
        s.step(torch.randn_like(x), s.timesteps[2], x)  # skips one: the history would be another step's
    s.step(torch.randn_like(x), s.timesteps[1], x)  # the next one runs
    s.set_timesteps(10)  # starts over; a first step may start mid-schedule, as diffusers allows
    s.step(torch.randn_like(x), s.timesteps[4], x)
