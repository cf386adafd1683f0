"""The diffusers drop-ins: FusedDDPMScheduler against DDPMScheduler, accelerate() on a real pipeline.

Each drop-in check asserts through ``ddpm_fast.ops.trace()`` that the fused path served it (the scheduler's step ran
ddpm_step on a fused backend, the accelerated U-Net's ops ran there), before it compares numbers: the reference or
diffusers' own code gives the same numbers, so only the trace tells them apart. The tests at the end break the
fused path on purpose and show those checks then fail.
"""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import ops
from ddpm_fast.integrations import diffusers as integration
from tests.helpers import OPTIONS, needs_cpu

diffusers = pytest.importorskip("diffusers")
UNET_OPS = ["conv2d", "linear", "group_norm_silu", "attention"]


def _rel_err(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _pair(**config):
    return diffusers.DDPMScheduler(**config), df.FusedDDPMScheduler(**config)


def _steps_match_diffusers(pt, vt, clip, spacing):
    theirs, ours = _pair(prediction_type=pt, variance_type=vt, clip_sample=clip, clip_sample_range=1.5)
    if spacing == 50:
        theirs.set_timesteps(50)
        ours.set_timesteps(50)
    elif spacing == "custom":
        theirs.set_timesteps(timesteps=[900, 640, 300, 20, 0])
        ours.set_timesteps(timesteps=[900, 640, 300, 20, 0])
    ts = [999, 500, 1, 0] if spacing is None else [int(t) for t in theirs.timesteps]
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 3, 8, 8, generator=g) * 1.5, torch.randn(2, 3, 8, 8, generator=g)
    pairs, worst = [], 0.0
    with ops.trace() as calls:
        for t in ts:
            a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(t))
            pairs.append((a, ours.step(m, t, x, generator=torch.Generator().manual_seed(t))))
    calls.require_fused("FusedDDPMScheduler.step", ops=["ddpm_step"])
    assert len(calls) == len(ts)  # every step, not some
    for a, b in pairs:
        assert type(b) is type(a)
        worst = max(
            worst, _rel_err(b.prev_sample, a.prev_sample), _rel_err(b.pred_original_sample, a.pred_original_sample)
        )
    print(f"{pt} {vt} clip={clip} spacing={spacing}: {calls.summary()}; max err {worst:.3g} relative to max(1, |ref|)")
    assert worst <= 1e-6


@needs_cpu
@pytest.mark.parametrize("pt, vt, clip", OPTIONS)
@pytest.mark.parametrize("spacing", [None, 50, "custom"])
def test_step_equals_diffusers(pt, vt, clip, spacing):
    _steps_match_diffusers(pt, vt, clip, spacing)


@needs_cpu
def test_full_loop_and_tuple_return_match_diffusers():
    theirs, ours = _pair(clip_sample=True)
    x_a = x_b = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    g_a, g_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    with ops.trace() as calls:
        for t in range(999, -1, -1):
            x_a = theirs.step(x_a * t / (t + 1), t, x_a, generator=g_a).prev_sample
            x_b = ours.step(x_b * t / (t + 1), t, x_b, generator=g_b, return_dict=False)[0]
    calls.require_fused("FusedDDPMScheduler loop", ops=["ddpm_step"])
    assert len(calls) == 1000
    err = (x_a - x_b).abs().max().item()
    print(f"1000-step loop: sum {x_b.abs().sum():.4f} vs diffusers {x_a.abs().sum():.4f}, max err {err:.3g}")
    assert abs(x_b.abs().sum() - x_a.abs().sum()) < 1e-2 and err < 1e-4


def test_unfusable_configs_run_diffusers_code():
    for config, why in (
        (dict(thresholding=True), "thresholding"),
        (dict(variance_type="fixed_small_log"), "variance_type='fixed_small_log'"),
        (dict(variance_type="learned_range"), "variance_type='learned_range'"),
    ):
        theirs, ours = _pair(**config)
        C = 6 if config.get("variance_type") == "learned_range" else 3
        x, m = torch.randn(1, 3, 4, 4), torch.randn(1, C, 4, 4)
        assert why in ours.unfused_reason(m, x, 500), config
        with ops.trace() as calls:
            a = theirs.step(m, 500, x, generator=torch.Generator().manual_seed(1)).prev_sample
            b = ours.step(m, 500, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert not calls, calls.summary()  # diffusers' code: no ddpm_fast op
        assert torch.equal(a, b), config


def test_unfused_reason_names_the_tensor():
    ours = df.FusedDDPMScheduler()
    x = torch.randn(2, 3, 4, 4)
    assert ours.unfused_reason(x, x) is None and ours.unfused_reason(x, x, 999) is None
    assert ours.unfused_reason(x[:1], x).startswith("model_output: shape (1, 3, 4, 4)")
    assert ours.unfused_reason(x.half(), x).startswith("model_output: dtype torch.float16")
    assert ours.unfused_reason(x.double(), x.double()).startswith("sample: dtype torch.float64")


@needs_cpu
def test_add_noise_equals_diffusers():
    theirs, ours = _pair()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    with ops.trace() as calls:
        got = ours.add_noise(x0, noise, t)
    calls.require_fused("FusedDDPMScheduler.add_noise", ops=["q_sample"])
    err = (got - theirs.add_noise(x0, noise, t)).abs().max().item()
    print(f"add_noise max err {err:.3g}")
    assert err <= 1e-6


def test_config_round_trips(tmp_path):
    ours = df.FusedDDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    ours.save_pretrained(tmp_path)
    again = df.FusedDDPMScheduler.from_pretrained(tmp_path)
    assert type(again) is df.FusedDDPMScheduler and again.config.prediction_type == "v_prediction"
    theirs = diffusers.DDPMScheduler.from_config(ours.config)
    torch.testing.assert_close(theirs.alphas_cumprod, ours.alphas_cumprod)
    assert type(df.FusedDDPMScheduler.from_config(diffusers.DDPMScheduler().config)) is df.FusedDDPMScheduler
    assert ours.previous_timestep(10) == 9 and ours.scale_model_input(torch.ones(1), 3).item() == 1


@needs_cpu
def test_keyed_noise_option_is_batch_independent():
    ours = df.FusedDDPMScheduler().use_keyed_noise(7)
    x, m = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with ops.trace() as calls:
        full = ours.step(m, 500, x).prev_sample
        ours.use_keyed_noise(7, sample_offset=2)
        part = ours.step(m[2:], 500, x[2:]).prev_sample
    calls.require_fused("keyed FusedDDPMScheduler.step", ops=["ddpm_step"])
    torch.testing.assert_close(part, full[2:], rtol=0, atol=0)


SMALL_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    attention_head_dim=None,
)


def _saved_pipeline(tmp_path):
    torch.manual_seed(0)
    pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**SMALL_UNET), scheduler=diffusers.DDPMScheduler())
    pipe.save_pretrained(tmp_path)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _accelerated_pipeline_matches(pipe, strict=True):
    """The drop-in's promise: accelerate() swaps the U-Net and the scheduler, the fused kernels serve the whole
    sampling loop, the images equal the original's, and deaccelerate() brings the original back."""
    kw = dict(batch_size=2, num_inference_steps=20, output_type="np")
    with ops.trace() as calls:
        original = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    assert not calls  # diffusers' own pipeline runs no ddpm_fast op
    report = df.accelerate(pipe, strict=strict)
    with ops.trace() as calls:
        fast = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    print(f"{report}: {calls.summary()}")
    calls.require_fused("accelerated DDPMPipeline", ops=UNET_OPS + ["ddpm_step"])
    assert sum(c.op == "ddpm_step" for c in calls) == 20  # every step fused
    assert report.obj is pipe and report.accelerated and set(report.swapped) == {"unet", "scheduler"}
    assert isinstance(pipe.scheduler, df.FusedDDPMScheduler)
    err = abs(fast - original).max()
    print(f"accelerated DDPMPipeline vs original: max err {err:.3g}")
    assert err <= 1e-3
    df.deaccelerate(pipe)
    assert type(pipe.scheduler) is diffusers.DDPMScheduler and "forward" not in pipe.unet.__dict__
    with ops.trace() as calls:
        again = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    assert not calls and abs(again - original).max() == 0


@needs_cpu
def test_accelerated_pipeline_from_disk_gives_the_same_images(tmp_path):
    _accelerated_pipeline_matches(_saved_pipeline(tmp_path))


@needs_cpu
def test_accelerate_unet_in_place_shares_weights():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**SMALL_UNET).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    with torch.no_grad():
        expected = unet(x, t).sample
        report = df.accelerate(unet)
        assert report.swapped == {"unet": "ddpm_fast.UNet"} and not report.left
        with ops.trace() as calls:
            got = unet(x, t).sample
        calls.require_fused("accelerated UNet2DModel", backend="cpu", ops=UNET_OPS)
        assert (got - expected).abs().max() <= 1e-4
        unet.conv_in.weight.mul_(2)  # the same Parameter objects: the accelerated model sees the change
        changed = unet(x, t).sample
        assert df.accelerate(unet).swapped == {"unet": "ddpm_fast.UNet (accelerated before)"}
        df.deaccelerate(unet)
        assert (changed - unet(x, t).sample).abs().max() <= 1e-4
    assert not any(k.startswith("_ddpm_fast") for k in unet.state_dict())


@needs_cpu
def test_accelerate_a_bf16_pipeline_runs_its_loop_fused_in_bf16():
    """A pipeline cast to bf16 (diffusers' own __call__ cannot hand bf16 images to numpy, so the loop is written out
    as it runs it): accelerate() swaps both parts, every U-Net op and every step runs on the cpu kernels in bf16,
    and the images stay within the bf16 bound of DESIGN.md (2x diffusers' own bf16 error against its fp32 loop,
    plus 1e-2)."""
    torch.manual_seed(0)
    pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**SMALL_UNET), scheduler=diffusers.DDPMScheduler(50))

    def loop():
        g = torch.Generator().manual_seed(0)
        dtype = pipe.unet.dtype
        x = torch.randn(2, 3, 16, 16, generator=g).to(dtype)
        pipe.scheduler.set_timesteps(5)
        with torch.no_grad():
            for t in pipe.scheduler.timesteps:
                x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x, generator=g).prev_sample
        assert x.dtype == dtype
        return x.float()

    fp32 = loop()
    pipe.to(torch.bfloat16)
    diffusers_bf16 = loop()
    report = df.accelerate(pipe)
    with ops.trace() as calls:
        fast = loop()
    calls.require_fused("accelerated bf16 DDPMPipeline", backend="cpu", ops=UNET_OPS + ["ddpm_step"])
    assert set(report.swapped) == {"unet", "scheduler"}
    assert pipe.scheduler.config.num_train_timesteps == 50  # given positionally: kept by the swap
    err, torch_err = (fast - fp32).abs().max().item(), (diffusers_bf16 - fp32).abs().max().item()
    print(f"accelerated bf16 pipeline: max err vs the fp32 loop {err:.3g}, diffusers' own bf16 {torch_err:.3g}")
    assert err <= 2 * torch_err + 1e-2


def test_accelerate_refuses_unsupported_models_unless_told():
    unet = diffusers.UNet2DModel(**{**SMALL_UNET, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(df.AccelerateError, match="unet: UNet2DModel cannot run as ddpm_fast.UNet: .*scale_shift"):
        df.accelerate(unet)
    assert "forward" not in unet.__dict__
    with pytest.warns(UserWarning, match="ddpm_fast.accelerate: unet left as it is"):
        report = df.accelerate(unet, strict=False)
    assert not report.accelerated and not report.swapped and "scale_shift" in report.left["unet"]
    assert "forward" not in unet.__dict__
    assert issubclass(df.AccelerateError, ValueError)
    with pytest.raises(TypeError, match="obj"):
        df.accelerate(object())


@needs_cpu
@pytest.mark.parametrize(
    "scheduler, why",
    [
        (
            lambda: diffusers.PNDMScheduler(),
            "PNDMScheduler: ddpm_fast's drop-ins replace DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler and "
            "UniPCMultistepScheduler only",
        ),
        (lambda: diffusers.DDIMScheduler(thresholding=True), "DDIMScheduler: thresholding=True"),
        (
            lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
            "DPMSolverMultistepScheduler: algorithm_type='dpmsolver'",
        ),
        (lambda: diffusers.UniPCMultistepScheduler(predict_x0=False), "UniPCMultistepScheduler: predict_x0=False"),
        (lambda: diffusers.DDPMScheduler(thresholding=True), "DDPMScheduler: thresholding=True"),
        (lambda: diffusers.DDPMScheduler(variance_type="learned"), "DDPMScheduler: variance_type='learned'"),
    ],
)
def test_accelerate_refuses_schedulers_it_cannot_fuse(scheduler, why):
    pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**SMALL_UNET), scheduler=scheduler())
    original = pipe.scheduler
    with pytest.raises(df.AccelerateError, match=f"scheduler: {why}"):
        df.accelerate(pipe)
    assert pipe.scheduler is original and "forward" not in pipe.unet.__dict__  # nothing changed
    with pytest.warns(UserWarning, match="scheduler left as it is"):
        report = df.accelerate(pipe, strict=False)
    assert pipe.scheduler is original and report.left["scheduler"].startswith(why)
    assert report.swapped == {"unet": "ddpm_fast.UNet"}


# ----------------------------------------------------------- the checks above fail when the fused path does not serve
@needs_cpu
def test_a_hidden_cpu_extension_fails_accelerate_and_the_step_check(monkeypatch, tmp_path):
    """With the cpu extension looking absent, auto dispatch quietly runs the reference: accelerate() refuses, and
    the step check fails on its trace before it compares any number."""
    monkeypatch.setattr(ops._cpu, "unavailable", lambda: "hidden for this test")
    pipe = _saved_pipeline(tmp_path)
    with pytest.raises(df.AccelerateError, match=r"no fused backend for cpu tensors \(cpu: hidden for this test\)"):
        _accelerated_pipeline_matches(pipe)
    with pytest.warns(UserWarning), pytest.raises(ops.FusedPathError, match="no ddpm_fast op ran"):
        _accelerated_pipeline_matches(pipe, strict=False)  # left as it was: diffusers' code
    with pytest.raises(ops.FusedPathError, match="expected every op on a fused backend, but ddpm_step torch/reference"):
        _steps_match_diffusers("epsilon", "fixed_small", True, None)


@needs_cpu
def test_a_step_that_never_fuses_fails_the_checks(monkeypatch, tmp_path):
    """unfused_reason always saying no: every step runs diffusers' code, same numbers; the traces catch it."""
    monkeypatch.setattr(df.FusedDDPMScheduler, "unfused_reason", lambda self, *a, **k: "broken for this test")
    with pytest.raises(ops.FusedPathError, match="FusedDDPMScheduler.step: no ddpm_fast op ran"):
        _steps_match_diffusers("epsilon", "fixed_small", True, None)
    with pytest.raises(ops.FusedPathError, match="accelerated DDPMPipeline: expected ddpm_step to run"):
        _accelerated_pipeline_matches(_saved_pipeline(tmp_path))


@needs_cpu
def test_a_unet_that_is_never_swapped_fails_the_pipeline_check(monkeypatch, tmp_path):
    monkeypatch.setattr(integration, "_install_unet", lambda unet2d, ours: None)
    with pytest.raises(ops.FusedPathError, match="expected attention, conv2d, group_norm_silu, linear to run"):
        _accelerated_pipeline_matches(_saved_pipeline(tmp_path))


@needs_cpu
def test_the_step_runs_the_cpu_kernel(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cpu ddpm_step broken for this test")

    monkeypatch.setattr(ops._cpu, "ddpm_step", broken)
    with pytest.raises(RuntimeError, match="cpu ddpm_step broken"):
        _steps_match_diffusers("epsilon", "fixed_small", True, None)


@pytest.mark.parametrize("t", [2**40, 2**63 - 1, torch.tensor(2**40), torch.tensor(2**63 + 5, dtype=torch.uint64), -1])
def test_scheduler_out_of_range_timestep_is_a_value_error(t):
    """Not an IndexError from indexing the schedule, nor a wrapped uint64: a ValueError naming the timestep."""
    sched = df.FusedDDPMScheduler()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="^timestep: expected values in"):
        sched.step(x, t, x)
    with pytest.raises(ValueError, match="^timesteps: expected values in"):
        sched.add_noise(x, x, t)


def test_scheduler_timestep_of_unsigned_dtype_or_on_meta():
    sched = df.FusedDDPMScheduler()
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    want = sched.step(m, 37, x, generator=torch.Generator().manual_seed(0)).prev_sample
    got = sched.step(m, torch.tensor(37, dtype=torch.uint16), x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="^timestep: on the meta device"):
        sched.step(m, torch.tensor(37, device="meta"), x)
