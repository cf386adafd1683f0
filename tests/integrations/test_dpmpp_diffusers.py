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


def _loop(scheduler, steps, x, dtype=torch.float32, seed=None):
    """A whole loop; ``seed``: the SDE's noise from a generator of that seed (diffusers' randn_tensor draws)."""
    scheduler.set_timesteps(steps)
    x = x.to(dtype)
    fused = []
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(_dummy(x, t), t, x, generator=generator).prev_sample
        fused.append(getattr(scheduler, "fused", None))
    return x, fused


def _loop_float64(config, steps, x, seed=None):
    """The float64 oracle: diffusers' own update methods (convert_model_output and the first-, second- and
    third-order updates) on float64 data and float64 sigmas, in the order DPMSolverMultistepScheduler.step runs
    them (its step casts the sample to float32, so the loop is driven here), with the same generator noise."""
    from diffusers.utils.torch_utils import randn_tensor

    s = diffusers.DPMSolverMultistepScheduler(**config)
    s.set_timesteps(steps)
    s.sigmas = s.sigmas.double()
    x = x.double()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    c, n = s.config, len(s.timesteps)
    for t in s.timesteps:
        if s.step_index is None:
            s._init_step_index(t)
        i = s.step_index
        final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        second = i == n - 2 and c.lower_order_final and n < 15
        m = s.convert_model_output(_dummy(x, t), sample=x)
        s.model_outputs = s.model_outputs[1:] + [m]
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(m.shape, generator=generator, device=m.device, dtype=torch.float32).double()
        if c.solver_order == 1 or s.lower_order_nums < 1 or final:
            x = s.dpm_solver_first_order_update(m, sample=x, noise=noise)
        elif c.solver_order == 2 or s.lower_order_nums < 2 or second:
            x = s.multistep_dpm_solver_second_order_update(s.model_outputs, sample=x, noise=noise)
        else:
            x = s.multistep_dpm_solver_third_order_update(s.model_outputs, sample=x, noise=noise)
        s.lower_order_nums = min(s.lower_order_nums + 1, c.solver_order)
        s._step_index += 1
    return x


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
    # third order ("3M"): warm-up through orders 1 and 2, lower_order_final's last two steps below 15
    dict(solver_order=3),
    dict(solver_order=3, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(solver_order=3, prediction_type="sample", use_karras_sigmas=True),
    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(solver_order=3, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1),
    # SDE-DPM-Solver++ with diffusers' generator noise
    dict(algorithm_type="sde-dpmsolver++"),
    dict(algorithm_type="sde-dpmsolver++", solver_order=1),
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun", prediction_type="v_prediction"),
    dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, timestep_spacing="trailing"),
    dict(algorithm_type="sde-dpmsolver++", lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(algorithm_type="sde-dpmsolver++", solver_order=3, prediction_type="sample"),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_loop_equals_diffusers(backend, config, steps):
    theirs, ours = _pair(**config)
    ours.backend = backend
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, _ = _loop(theirs, steps, x, seed=5)
    with df.ops.trace() as calls:
        got, fused = _loop(ours, steps, x, seed=5)
    err = (got - expected).abs().max().item()
    oracle = _loop_float64(config, steps, x, seed=5)
    ours_err, their_err = ((a.double() - oracle).abs().max().item() for a in (got, expected))
    bound = 1e-6 * max(1.0, expected.abs().max().item())
    print(
        f"{backend} {config} {steps} steps: max err vs diffusers {err:.3g}; vs the float64 oracle {ours_err:.3g}, "
        f"diffusers' own {their_err:.3g} (max |x| {expected.abs().max().item():.3g})"
    )
    assert ours.config_unfused_reason() is None and all(fused)
    calls.require_fused("FusedDPMSolverMultistepScheduler.step", backend=backend, ops={"dpmpp_step"})
    assert len(calls) == steps
    # within 1e-6 (relative) of diffusers' fp32 loop, or else no further from the float64 oracle than 1e-6 or twice
    # diffusers' own fp32 loop: a third-order last step to sigma_min weighs the history's accumulated rounding by ~9,
    # and both fp32 loops land ~1e-6 from the oracle there (each step before it: ours no further than diffusers')
    assert err <= bound or ours_err <= max(bound, 2 * their_err), (err, ours_err, their_err)
    assert their_err <= 1e-5 * max(1.0, expected.abs().max().item())  # the oracle is diffusers' maths


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
        (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
        (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
        (dict(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
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


def _sde_loop(scheduler, steps, x, noises=None):
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        kw = {} if noises is None else dict(variance_noise=noises[i])
        x = scheduler.step(_dummy(x, t), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("backend", FUSED)
def test_sde_variance_noise_and_keyed_noise(backend):
    """The SDE's z given as variance_noise runs fused and equals diffusers with the same noise; use_keyed_noise(seed)
    draws z in the kernel: a batch split in two (sample_offset) gives the whole batch's samples, the cpu and Triton
    kernels the same ones, and another seed others."""
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(10)]
    theirs, ours = _pair(**config)
    ours.backend = backend
    expected = _sde_loop(theirs, 10, x, noises)
    got = _sde_loop(ours, 10, x, noises)
    err = (got - expected).abs().max().item()
    print(f"{backend} sde 3M with variance_noise: max err {err:.3g}")
    assert ours.fused and err <= 1e-6 * max(1.0, expected.abs().max().item())

    def keyed(seed, xs, offset=0, be=backend):
        s = df.FusedDPMSolverMultistepScheduler(**config).use_keyed_noise(seed, offset)
        s.backend = be
        return _sde_loop(s, 10, xs)

    whole = keyed(5, x)
    assert torch.allclose(keyed(5, x[2:], offset=2), whole[2:], rtol=0, atol=1e-6)
    assert torch.allclose(keyed(5, x[:2]), whole[:2], rtol=0, atol=1e-6)
    assert torch.allclose(keyed(5, x, be="torch"), whole, rtol=1e-5, atol=1e-5)
    assert (keyed(6, x) - whole).abs().max() > 1e-2
    assert (expected - whole).abs().max() > 1e-2  # keyed noise is not the generator's
