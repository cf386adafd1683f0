import pytest
import torch

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import OPTIONS, assert_fp32_close, assert_lowp_close, diffusers_float64, layout_cases, needs_cpu

S = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPES = [(5, 3, 17, 9), (1, 1, 1, 1), (2, 7, 1, 1), (3, 40), (4, 3, 32, 32)]


def _inputs(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]


def _opts(pt, vt, clip):
    return dict(prediction_type=pt, variance_type=vt, clip_sample=clip, clip_range=1.5)


@needs_cpu
@pytest.mark.parametrize("pt, vt, clip", OPTIONS)
@pytest.mark.parametrize("t", [999, 500, 1, 0, "mixed"])
def test_fp32_every_option_matches_reference(pt, vt, clip, t):
    x, m, z = _inputs((6, 3, 9, 11), scale=2.0)
    if t == "mixed":
        t = torch.tensor([0, 1, 2, 500, 998, 999])
    expected = ref.ddpm_step(x, m, torch.as_tensor(t).expand(6), S, z, **_opts(pt, vt, clip))
    out = df.ops.ddpm_step(x, m, t, S, z, backend="cpu", **_opts(pt, vt, clip))
    assert_fp32_close(f"ddpm_step {pt} {vt} clip={clip} t={t}", out, expected)


@needs_cpu
@pytest.mark.parametrize("shape, layout", layout_cases(SHAPES))
@pytest.mark.parametrize("keyed", [False, True])
def test_shapes_and_layouts(shape, layout, keyed):
    x, m, z = _inputs(shape)
    if layout == "channels_last":
        x, m, z = (a.contiguous(memory_format=torch.channels_last) for a in (x, m, z))
    if layout == "strided":
        m = torch.cat([m, m], dim=-1)[..., : shape[-1]]
    noise = None if keyed else z
    expected = ref.ddpm_step(x, m, torch.full((shape[0],), 700), S, noise, seed=5, clip_sample=True)
    out = df.ops.ddpm_step(x, m, 700, S, noise, seed=5, clip_sample=True, backend="cpu")
    assert_fp32_close(f"ddpm_step {shape} {layout} keyed={keyed}", out, expected, atol=2e-5)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pt, vt, clip", OPTIONS[::3])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 3, 32, 32)])
def test_low_precision(dtype, pt, vt, clip, shape):
    x, m, z = _inputs(shape, dtype)
    t = torch.tensor([900, 20, 1][: shape[0]])
    out = df.ops.ddpm_step(x, m, t, S, z, backend="cpu", **_opts(pt, vt, clip))
    assert out.dtype == dtype
    r32 = ref.ddpm_step(x.float(), m.float(), t, S, z.float(), **_opts(pt, vt, clip))
    rlow = ref.ddpm_step(x, m, t, S, z, **_opts(pt, vt, clip))
    assert_lowp_close(f"ddpm_step {dtype} {pt} {vt} clip={clip}", out, r32, rlow)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_keyed_noise_matches_reference(dtype):
    x, m, _ = _inputs((4, 3, 8, 8), dtype)
    out = df.ops.ddpm_step(x, m, 321, S, seed=2**40 + 3, sample_offset=7, backend="cpu")
    r32 = ref.ddpm_step(x.float(), m.float(), torch.full((4,), 321), S, seed=2**40 + 3, sample_offset=7)
    if dtype == torch.float32:
        assert_fp32_close("keyed ddpm_step", out, r32, atol=2e-5)
    else:
        rlow = ref.ddpm_step(x, m, torch.full((4,), 321), S, seed=2**40 + 3, sample_offset=7)
        assert_lowp_close("keyed ddpm_step fp16", out, r32, rlow)


@needs_cpu
def test_no_noise_at_t0_and_seed_irrelevant_there():
    x, m, _ = _inputs((2, 3, 4, 4))
    a = df.ops.ddpm_step(x, m, 0, S, seed=1, backend="cpu")
    b = df.ops.ddpm_step(x, m, 0, S, seed=2, backend="cpu")
    assert torch.equal(a, b)
    assert_fp32_close("t=0", a, ref.ddpm_step(x, m, torch.zeros(2, dtype=torch.int64), S, torch.zeros_like(x)))


@needs_cpu
def test_out_in_place_and_nan():
    x, m, z = _inputs((3, 3, 8, 8))
    expected = ref.ddpm_step(x, m, torch.full((3,), 50), S, z, clip_sample=True)
    y = x.clone()
    assert df.ops.ddpm_step(y, m, 50, S, z, clip_sample=True, backend="cpu", out=y) is y
    assert_fp32_close("in place", y, expected)
    x[0, 0, 0, 0] = float("nan")
    out = df.ops.ddpm_step(x, m, 50, S, z, clip_sample=True, backend="cpu")
    assert torch.isnan(out[0, 0, 0, 0]) and torch.isfinite(out[1:]).all()


# ---------------------------------------------------------------------------------- diffusers as the oracle
diffusers = pytest.importorskip("diffusers")


def _diffusers_float64(**config):
    return diffusers_float64(diffusers.DDPMScheduler, **config)


@needs_cpu
@pytest.mark.parametrize("pt, vt, clip", OPTIONS)
@pytest.mark.parametrize("t", [999, 600, 1, 0])
def test_matches_diffusers_step_in_float64(pt, vt, clip, t, monkeypatch):
    sched = _diffusers_float64(prediction_type=pt, variance_type=vt, clip_sample=clip, clip_sample_range=1.5)
    x, m, z = _inputs((2, 3, 8, 8), scale=1.5)
    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: z.double())
    expected = sched.step(m.double(), t, x.double()).prev_sample
    out = df.ops.ddpm_step(x, m, t, df.NoiseSchedule.linear(), z, backend="cpu", **_opts(pt, vt, clip))
    err = ((out.double() - expected).abs() / expected.abs().clamp(min=1)).max().item()
    print(f"vs diffusers float64 {pt} {vt} clip={clip} t={t}: max err {err:.3g} (relative to max(1, |ref|))")
    assert err <= 1e-6


def _dummy_sample_deter():  # diffusers' SchedulerCommonTest.dummy_sample_deter
    num_elems = 4 * 3 * 8 * 8
    sample = torch.arange(num_elems).flip(-1).reshape(3, 8, 8, 4) / num_elems
    return sample.permute(3, 0, 1, 2)


def _dummy_model(sample, t):  # diffusers' SchedulerCommonTest.dummy_model
    return sample * t / (t + 1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
def test_full_loop_reproduces_diffusers(backend):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_sample=True)
    s = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
    g_ref, g_ours = torch.manual_seed(0), torch.Generator().manual_seed(0)
    sample_ref = _dummy_sample_deter()
    for t in range(999, -1, -1):
        sample_ref = sched.step(_dummy_model(sample_ref, t), t, sample_ref, generator=g_ref).prev_sample
    sample = _dummy_sample_deter().contiguous()
    for t in range(999, -1, -1):
        noise = torch.randn(sample.shape, generator=g_ours) if t > 0 else None
        sample = df.ops.ddpm_step(
            sample,
            _dummy_model(sample, t),
            t,
            s,
            noise if t > 0 else torch.zeros_like(sample),
            clip_sample=True,
            backend=backend,
        )
    ours, theirs = sample.abs().sum().item(), sample_ref.abs().sum().item()
    # diffusers' own test pins 258.9606 / 0.3372, drawn with an older torch RNG; this torch's normal_ gives
    # other numbers (diffusers itself sums to ~258.99 here), so the oracle is diffusers' loop run side by side.
    print(f"{backend}: result_sum {ours:.4f} vs diffusers {theirs:.4f}")
    assert abs(ours - theirs) < 1e-2
    assert abs(sample.abs().mean().item() - sample_ref.abs().mean().item()) < 1e-3


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x_t=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "x_t"),
        (dict(x_t=[1.0, 2.0]), TypeError, "x_t"),
        (dict(x_t=torch.zeros(0, 3), model_output=torch.zeros(0, 3)), ValueError, "x_t"),
        (dict(model_output=torch.zeros(2, 4)), ValueError, "model_output"),
        (dict(model_output=torch.zeros(2, 3, dtype=torch.float16)), TypeError, "model_output"),
        (dict(model_output=torch.zeros(2, 3, device="meta")), ValueError, "model_output"),
        (dict(noise=torch.zeros(3, 3)), ValueError, "noise"),
        (dict(t=1000), ValueError, "t"),
        (dict(t=torch.tensor([3, -1])), ValueError, "t"),
        (dict(t=torch.zeros(5, dtype=torch.int64)), ValueError, "t"),
        (dict(t=2.0), TypeError, "t"),
        (dict(schedule=None), TypeError, "schedule"),
        (dict(variance_type="learned"), ValueError, "variance_type"),
        (dict(prediction_type="eps"), ValueError, "prediction_type"),
        (dict(clip_sample="yes"), TypeError, "clip_sample"),
        (dict(clip_range=0.0), ValueError, "clip_range"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(out=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "out"),
        (dict(backend=3), TypeError, "backend"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
def test_bad_input(kwargs, err, match, backend):
    args = dict(x_t=torch.zeros(2, 3), model_output=torch.zeros(2, 3), t=5, schedule=S, noise=None, backend=backend)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        df.ops.ddpm_step(args.pop("x_t"), args.pop("model_output"), args.pop("t"), args.pop("schedule"), **args)


@needs_cpu
def test_cpu_backend_rejects_float64_by_name():
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="x_t"):
        df.ops.ddpm_step(x, x, 5, S, x, backend="cpu")
    # auto falls back to the reference for float64
    assert df.ops.ddpm_step(x, x, 5, S, x).dtype == torch.float64
