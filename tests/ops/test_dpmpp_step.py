import pytest
import torch

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import assert_fp32_close, assert_lowp_close, layout_cases

needs_cpu = pytest.mark.skipif(not df.backends()["cpu"].startswith("available"), reason="cpu extension not built")
FUSED = ["triton", pytest.param("cpu", marks=needs_cpu)]
S = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPES = [(5, 3, 17, 9), (1, 1, 1, 1), (2, 7, 1, 1), (3, 40), (4, 3, 32, 32)]
# (t, t_prev, t_last) per sample: early, middle, the last steps (to t = 0 and to x_0), uneven spacing
STEPS = {
    "early": (980, 940, 999),
    "middle": (500, 450, 600),
    "to_x0": (20, -1, 60),
    "mixed": ([999, 700, 300, 40, 5, 1], [900, 650, 0, -1, 1, 0], [999, 800, 500, 80, 9, 2]),
}  # "mixed": sample 0 (t = 999) has no larger t_last, so order 2 drops it


def _inputs(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]


def _steps(name, batch):
    return tuple(torch.as_tensor(v).expand(batch).clone() for v in STEPS[name])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("pt", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", ["early", "middle", "to_x0", "mixed"])
def test_fp32_matches_reference(backend, pt, solver_type, order, steps):
    x, m, d1 = _inputs((6, 3, 9, 11), scale=2.0)
    t, t_prev, t_last = _steps(steps, 6)
    if steps == "mixed" and order == 2:
        t, t_prev, t_last = t[1:], t_prev[1:], t_last[1:]
        x, m, d1 = x[1:], m[1:], d1[1:]
    hist = (d1, t_last) if order == 2 else (None, None)
    opts = dict(prediction_type=pt, solver_type=solver_type)
    expected, x0_ref = ref.dpmpp_step(x, m, t, t_prev, S, *hist, **opts)
    out, x0 = df.ops.dpmpp_step(x, m, t, t_prev, S, *hist, backend=backend, **opts)
    name = f"dpmpp_step {backend} {pt} {solver_type} order {order} {steps}"
    assert_fp32_close(name, out, expected)
    assert_fp32_close(name + " x0", x0, x0_ref)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape, layout", layout_cases(SHAPES))
def test_shapes_and_layouts(backend, shape, layout):
    x, m, d1 = _inputs(shape)
    if layout == "channels_last":
        x, m, d1 = (a.contiguous(memory_format=torch.channels_last) for a in (x, m, d1))
    if layout == "strided":
        m = torch.cat([m, m], dim=-1)[..., : shape[-1]]
    B = shape[0]
    t, t_prev, t_last = (torch.full((B,), v) for v in (700, 600, 800))
    expected, x0_ref = ref.dpmpp_step(x, m, t, t_prev, S, d1, t_last, prediction_type="v_prediction")
    out, x0 = df.ops.dpmpp_step(x, m, 700, 600, S, d1, 800, prediction_type="v_prediction", backend=backend)
    assert_fp32_close(f"dpmpp_step {backend} {shape} {layout}", out, expected)
    assert_fp32_close(f"dpmpp_step {backend} {shape} {layout} x0", x0, x0_ref)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert x0.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 3, 32, 32)])
def test_low_precision(backend, dtype, pt, shape):
    x, m, d1 = _inputs(shape, dtype)
    B = shape[0]
    t, t_prev, t_last = (torch.tensor(v[:B]) for v in ([900, 300, 40], [800, 250, -1], [950, 400, 60]))
    out, x0 = df.ops.dpmpp_step(x, m, t, t_prev, S, d1, t_last, prediction_type=pt, backend=backend)
    assert out.dtype == x0.dtype == dtype
    r32, r32_x0 = ref.dpmpp_step(x.float(), m.float(), t, t_prev, S, d1.float(), t_last, prediction_type=pt)
    rlow, _ = ref.dpmpp_step(x, m, t, t_prev, S, d1, t_last, prediction_type=pt)
    assert_lowp_close(f"dpmpp_step {backend} {dtype} {pt}", out, r32, rlow)
    # x0 spans a wide range at large t (|x0| ~ 500 for epsilon at t = 900), where one rounding to the dtype can
    # exceed twice PyTorch's max error elsewhere: it is held to the fp32 reference's x0 rounded, within one ulp
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert_fp32_close(f"dpmpp_step {backend} {dtype} {pt} x0", x0.float(), r32_x0.to(dtype).float(), 1e-3, ulp)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", ["early", "middle", "to_x0", "mixed"])
def test_coefficient_rows_are_the_formulas(solver_type, steps):
    """The (B, 6) rows the kernels run reproduce the formulas in float64."""
    x, m, d1 = (a.double() for a in _inputs((6, 4, 5), scale=2.0))
    t, t_prev, t_last = _steps(steps, 6)
    if steps == "mixed":
        t, t_prev, t_last, x, m, d1 = t[1:], t_prev[1:], t_last[1:], x[1:], m[1:], d1[1:]
    for hist in ((None, None), (d1, t_last)):
        expected, x0_ref = ref.dpmpp_step(x, m, t, t_prev, S, *hist, solver_type=solver_type)
        k = ref.dpmpp_coefficients(t, t_prev, S, "epsilon", hist[1], solver_type)
        out, x0 = ref.dpmpp_step(x, m, None, None, None, hist[0], coefficients=k)
        err = (out - expected).abs().max().item()
        print(f"rows vs formulas {solver_type} {steps} order {1 + (hist[0] is not None)}: max err {err:.3g}")
        assert err <= 1e-12 * max(1.0, expected.abs().max().item())
        assert torch.equal(x0, x0_ref)


@pytest.mark.parametrize("pt", ["epsilon", "sample", "v_prediction"])
def test_first_order_is_ddim(pt):
    """DPM-Solver++(1) is DDIM with eta = 0 (Lu et al. 2022, section 4): an independent check of the formulas."""
    x, m, _ = (a.double() for a in _inputs((3, 2, 5, 5)))
    t, t_prev = torch.tensor([999, 500, 30]), torch.tensor([900, 420, -1])
    out, _ = ref.dpmpp_step(x, m, t, t_prev, S, prediction_type=pt)
    expected = ref.ddim_step(x, m, t, t_prev, S, torch.zeros_like(x), prediction_type=pt)
    err = (out - expected).abs().max().item()
    print(f"DPM-Solver++(1) vs DDIM {pt}: max err {err:.3g}")
    assert err <= 1e-12


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_in_place_chain_and_given_coefficients(backend):
    """out=x_t and x0_out=x0_last (one buffer each, as a sampling chain runs) give the out-of-place numbers; a given
    coefficient table is what runs."""
    x, m, d1 = _inputs((2, 3, 6, 6))
    expected, x0_ref = df.ops.dpmpp_step(x, m, 400, 300, S, d1, 500, backend="torch")
    xb, d1b = x.clone(), d1.clone()
    out, x0 = df.ops.dpmpp_step(xb, m, 400, 300, S, d1b, 500, backend=backend, out=xb, x0_out=d1b)
    assert out is xb and x0 is d1b
    assert_fp32_close(f"in place {backend}", out, expected)
    assert_fp32_close(f"in place {backend} x0", x0, x0_ref)
    k = ref.dpmpp_coefficients(torch.tensor([400]), torch.tensor([300]), S, "epsilon", torch.tensor([500])).float()
    given, _ = df.ops.dpmpp_step(x, m, 400, 300, S, d1, coefficients=k[0], backend=backend)
    assert_fp32_close(f"given coefficients {backend}", given, expected)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_nan_propagates(backend):
    x, m, d1 = _inputs((1, 2, 3, 3))
    m[0, 0, 0, 0] = float("nan")
    out, x0 = df.ops.dpmpp_step(x, m, 400, 300, S, d1, 500, backend=backend)
    assert out[0, 0, 0, 0].isnan() and x0[0, 0, 0, 0].isnan()
    assert torch.isfinite(out.flatten()[1:]).all()


@pytest.mark.parametrize("backend", FUSED)
def test_trace_names_the_fused_kernel(backend):
    x, m, d1 = _inputs((2, 3, 4, 4))
    with df.ops.trace() as calls:
        df.ops.dpmpp_step(x, m, 400, 300, S, d1, 500, backend=backend)
    calls.require_fused(ops={"dpmpp_step"}, backend=backend)


def _bad(**change):
    x, m, d1 = _inputs((2, 3, 4, 4))
    args = dict(x_t=x, model_output=m, t=400, t_prev=300, schedule=S, x0_last=d1, t_last=500)
    args.update(change)
    return args


BAD = [
    (dict(model_output=torch.zeros(2, 3, 4, 5)), ValueError, "model_output"),
    (dict(x0_last=torch.zeros(2, 3, 4, 4, dtype=torch.float16)), TypeError, "x0_last"),
    (dict(x0_last=torch.zeros(2, 3, 4, 4, device="meta")), ValueError, "x0_last"),
    (dict(t=1000), ValueError, "t: expected values"),
    (dict(t_prev=400), ValueError, "t_prev"),
    (dict(t_prev=-2), ValueError, "t_prev"),
    (dict(t_last=400), ValueError, "t_last: every last timestep"),
    (dict(t_last=1000), ValueError, "t_last"),
    (dict(t_last=None), ValueError, "t_last: the second-order step"),
    (dict(x0_last=None), ValueError, "x0_last: the second-order step"),
    (dict(t=2.5), TypeError, "t: expected an int"),
    (dict(prediction_type="flow"), ValueError, "prediction_type"),
    (dict(solver_type="bh2"), ValueError, "solver_type"),
    (dict(coefficients=torch.zeros(2, 7)), ValueError, "coefficients"),
    (dict(coefficients=torch.tensor([1.0, 0, 1, 1, 1, float("inf")])), ValueError, "coefficients"),
    (dict(coefficients=torch.ones(6), x0_last=None), ValueError, "x0_last: coefficients has a second-order"),
    (dict(x0_last2=torch.zeros(2, 3, 4, 4)), ValueError, "t_last2: the third-order step"),
    (dict(t_last2=700), ValueError, "x0_last2: the third-order step"),
    (dict(x0_last2=torch.zeros(2, 3, 4, 4), t_last2=500), ValueError, "t_last2: every timestep"),
    (dict(x0_last2=torch.zeros(2, 3, 4, 5), t_last2=700), ValueError, "x0_last2"),
    (dict(x0_last=None, t_last=None, x0_last2=torch.zeros(2, 3, 4, 4), t_last2=700), ValueError, "x0_last: the third"),
    (
        dict(coefficients=torch.tensor([1.0, 0, 1, 1, 1, 0, 1, 0.5, 0])),
        ValueError,
        "x0_last2: coefficients has a third",
    ),
    (dict(sde=1), TypeError, "sde"),
    (dict(sde=True, seed=-1), ValueError, "seed"),
    (dict(sde=True, noise=torch.zeros(2, 3, 4, 5)), ValueError, "noise"),
    (dict(x_t=torch.zeros(0, 3)), ValueError, "x_t"),
    (dict(schedule="linear"), TypeError, "schedule"),
]


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("change, err, match", BAD)
def test_bad_input(change, err, match, backend):
    with pytest.raises(err, match=match):
        df.ops.dpmpp_step(**_bad(**change), backend=backend)


def test_out_must_not_overlap_x0_out_and_cuda_has_no_kernel():
    x, m, d1 = _inputs((2, 3, 4, 4))
    buf = torch.empty_like(x)
    with pytest.raises(ValueError, match="out"):
        df.ops.dpmpp_step(x, m, 400, 300, S, d1, 500, out=buf, x0_out=buf)
    assert "dpmpp_step" not in df.ops._registry.implements("cuda")
    with pytest.raises(TypeError, match="x_t"):
        df.ops.dpmpp_step(x.double(), m.double(), 400, 300, S, d1.double(), 500, backend="triton")


def test_float64_runs_the_reference_in_float64():
    x, m, d1 = (a.double() for a in _inputs((2, 3, 4, 4), scale=2.0))
    t, t_prev, t_last = (torch.full((2,), v) for v in (400, 300, 500))
    expected, x0_ref = ref.dpmpp_step(x, m, t, t_prev, S, d1, t_last)
    out, x0 = df.ops.dpmpp_step(x, m, 400, 300, S, d1, 500)
    err = (out - expected).abs().max().item()
    print(f"float64 dpmpp_step: max err {err:.3g}")
    assert out.dtype == torch.float64 and err <= 1e-12 and torch.equal(x0, x0_ref)


# ------------------------------------------------------------------------------ third order (3M) and the SDE variant
# (t, t_prev, t_last, t_last2) per sample; "mixed" runs a step to x_0 (first order there) beside inner steps
STEPS3 = {
    "early": (960, 920, 980, 999),
    "middle": (500, 450, 600, 640),
    "uneven": (300, 100, 310, 700),
    "to_x0": (20, -1, 60, 100),
    "mixed": ([900, 400, 30, 3], [850, 0, -1, 1], [950, 420, 60, 7], [999, 500, 90, 20]),
}


def _steps3(name, batch):
    return tuple(torch.as_tensor(v).expand(batch).clone() for v in STEPS3[name])


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("pt", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sde", [False, True])
@pytest.mark.parametrize("steps", list(STEPS3))
def test_third_order_fp32_matches_reference(backend, pt, sde, steps):
    x, m, d1 = _inputs((4, 3, 9, 11), scale=2.0)
    d2, z, _ = _inputs((4, 3, 9, 11), seed=1)
    t, t_prev, t_last, t_last2 = _steps3(steps, 4)
    opts = dict(x0_last2=d2, t_last2=t_last2, sde=sde, noise=z if sde else None, prediction_type=pt)
    expected, x0_ref = ref.dpmpp_step(x, m, t, t_prev, S, d1, t_last, **opts)
    out, x0 = df.ops.dpmpp_step(x, m, t, t_prev, S, d1, t_last, backend=backend, **opts)
    name = f"dpmpp_step {backend} {pt} sde={sde} order 3 {steps}"
    assert_fp32_close(name, out, expected)
    assert_fp32_close(name + " x0", x0, x0_ref)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", ["early", "middle", "to_x0"])
def test_sde_given_noise_fp32_matches_reference(backend, solver_type, order, steps):
    x, m, d1 = _inputs((3, 4, 7, 5), scale=2.0)
    z = _inputs((3, 4, 7, 5), seed=2)[0]
    t, t_prev, t_last = _steps(steps, 3)
    hist = (d1, t_last) if order == 2 else (None, None)
    opts = dict(sde=True, noise=z, solver_type=solver_type)
    expected, x0_ref = ref.dpmpp_step(x, m, t, t_prev, S, *hist, **opts)
    out, x0 = df.ops.dpmpp_step(x, m, t, t_prev, S, *hist, backend=backend, **opts)
    name = f"sde dpmpp_step {backend} {solver_type} order {order} {steps}"
    assert_fp32_close(name, out, expected)
    assert_fp32_close(name + " x0", x0, x0_ref)
    if steps != "to_x0":  # the noise term is there: z = 0 gives another result
        zero, _ = df.ops.dpmpp_step(x, m, t, t_prev, S, *hist, backend=backend, sde=True, noise=torch.zeros_like(z))
        assert (zero - out).abs().max() > 1e-3


@pytest.mark.parametrize("shape, layout", layout_cases([(5, 3, 17, 9), (1, 1, 1, 1), (2, 7, 3, 1), (3, 40)]))
def test_sde_keyed_noise_same_on_every_backend_and_split_invariant(shape, layout):
    """Keyed z (stream 0 at step t, sample b's global index sample_offset + b): the torch reference, the cpu and the
    Triton kernels give the same step for the same key, in any layout, and a batch split in two (the second half
    with sample_offset) gives the whole batch's numbers."""
    x, m, d1 = _inputs(shape)
    d2 = _inputs(shape, seed=3)[0]
    if layout == "channels_last":
        x, m, d1, d2 = (a.contiguous(memory_format=torch.channels_last) for a in (x, m, d1, d2))
    if layout == "strided":
        m = torch.cat([m, m], dim=-1)[..., : shape[-1]]
    B = shape[0]
    t, t_prev, t_last, t_last2 = (torch.full((B,), v) for v in (500, 450, 600, 640))
    expected, _ = ref.dpmpp_step(x, m, t, t_prev, S, d1, t_last, x0_last2=d2, t_last2=t_last2, sde=True, seed=11)
    backends = ["torch", "triton"] + (["cpu"] if df.backends()["cpu"].startswith("available") else [])
    h = B // 2
    for backend in backends:
        opts = dict(x0_last2=d2, t_last2=640, sde=True, seed=11, backend=backend)
        out, _ = df.ops.dpmpp_step(x, m, 500, 450, S, d1, 600, **opts)
        assert_fp32_close(f"keyed sde {backend} {shape} {layout}", out, expected)
        tail, _ = df.ops.dpmpp_step(
            x[h:], m[h:], 500, 450, S, d1[h:], 600, sample_offset=h, **{**opts, "x0_last2": d2[h:]}
        )
        assert_fp32_close(f"keyed sde {backend} {shape} {layout} split at {h}", tail, expected[h:])
    other, _ = ref.dpmpp_step(x, m, t, t_prev, S, d1, t_last, x0_last2=d2, t_last2=t_last2, sde=True, seed=12)
    assert (other - expected).abs().max() > 1e-3  # the key matters


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sde", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 3, 32, 32)])
def test_third_order_low_precision(backend, dtype, sde, shape):
    x, m, d1 = _inputs(shape, dtype)
    d2, z, _ = _inputs(shape, dtype, seed=4)
    B = shape[0]
    t, t_prev, t_last, t_last2 = (
        torch.tensor(v[:B]) for v in ([900, 300, 40], [800, 250, -1], [950, 400, 60], [999, 500, 90])
    )
    opts = dict(x0_last2=d2, t_last2=t_last2, sde=sde, noise=z if sde else None, prediction_type="v_prediction")
    out, x0 = df.ops.dpmpp_step(x, m, t, t_prev, S, d1, t_last, backend=backend, **opts)
    assert out.dtype == x0.dtype == dtype
    o32 = {**opts, "x0_last2": d2.float(), "noise": z.float() if sde else None}
    r32, _ = ref.dpmpp_step(x.float(), m.float(), t, t_prev, S, d1.float(), t_last, **o32)
    rlow, _ = ref.dpmpp_step(x, m, t, t_prev, S, d1, t_last, **opts)
    assert_lowp_close(f"dpmpp_step order 3 {backend} {dtype} sde={sde}", out, r32, rlow)


@pytest.mark.parametrize("sde", [False, True])
@pytest.mark.parametrize("steps", list(STEPS3))
def test_third_order_and_sde_rows_are_the_formulas(sde, steps):
    """The rows the kernels run reproduce the formulas (order 3 written with E1, E2 as diffusers writes it) in
    float64, orders 1 to 3, ODE and SDE."""
    x, m, d1 = (a.double() for a in _inputs((4, 4, 5), scale=2.0))
    d2, z, _ = (a.double() for a in _inputs((4, 4, 5), seed=5))
    t, t_prev, t_last, t_last2 = _steps3(steps, 4)
    for solver_type in ("midpoint", "heun"):
        for hist, hist2 in (((None, None), (None, None)), ((d1, t_last), (None, None)), ((d1, t_last), (d2, t_last2))):
            opts = dict(x0_last2=hist2[0], t_last2=hist2[1], sde=sde, noise=z, solver_type=solver_type)
            expected, x0_ref = ref.dpmpp_step(x, m, t, t_prev, S, *hist, **opts)
            k = ref.dpmpp_coefficients(t, t_prev, S, "epsilon", hist[1], solver_type, hist2[1], sde)
            out, x0 = ref.dpmpp_step(x, m, None, None, None, hist[0], x0_last2=hist2[0], noise=z, coefficients=k)
            err = (out - expected).abs().max().item()
            order = 1 + (hist[0] is not None) + (hist2[0] is not None)
            print(f"rows vs formulas sde={sde} {solver_type} {steps} order {order}: max err {err:.3g}")
            assert err <= 1e-12 * max(1.0, expected.abs().max().item())
            assert torch.equal(x0, x0_ref)


def test_sde_noise_scale_and_first_order_limits():
    """Independent checks of the SDE rows: the noise coefficient is sigma_t' sqrt(1 - e^{-2h}), so that (with D0 the
    true x_0) the step's marginal variance matches q(x_t' | x_0): a_x^2 sigma_s0^2 + a_z^2 = sigma_t'^2; and the
    step to x_0 is x_0 itself."""
    t, t_prev = torch.tensor([999, 500, 100, 7]), torch.tensor([900, 300, 20, -1])
    k = ref.dpmpp_coefficients(t, t_prev, S, "epsilon", sde=True)
    abar = S.alphas_cumprod
    sig_s = (1 - abar[t]).sqrt()
    sig_t = torch.where(t_prev >= 0, (1 - abar[t_prev.clamp(min=0)]).sqrt(), torch.zeros(4, dtype=torch.float64))
    alpha_t = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)].sqrt(), torch.ones(4, dtype=torch.float64))
    var_err = (k[:, 3] ** 2 * sig_s**2 + k[:, 8] ** 2 - sig_t**2).abs().max().item()
    # mean: x_t = alpha_s x0 + sigma_s eps -> a_x alpha_s + a_0 = alpha_t' (the x0 coefficient)
    alpha_s = abar[t].sqrt()
    mean_err = (k[:, 3] * alpha_s + k[:, 4] - alpha_t).abs().max().item()
    print(f"SDE marginal variance err {var_err:.3g}, mean err {mean_err:.3g}")
    assert var_err <= 1e-12 and mean_err <= 1e-12
    assert k[3, 3] == 0 and k[3, 4] == 1 and k[3, 8] == 0
