import pytest
import torch

import ddpm_fast as df
from ddpm_fast.reference.dpmpp_step import apply_row
from ddpm_fast.reference.unipc_step import _rhos, unipc_coefficients, unipc_step
from tests.helpers import assert_fp32_close, assert_lowp_close, layout_cases

needs_cpu = pytest.mark.skipif(not df.backends()["cpu"].startswith("available"), reason="cpu extension not built")
FUSED = ["triton", pytest.param("cpu", marks=needs_cpu)]
S = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPES = [(5, 3, 17, 9), (1, 1, 1, 1), (2, 7, 1, 1), (3, 40), (4, 3, 32, 32)]
# (t, t_next, earlier steps newest first) per case; "to_x0" ends the chain
STEPS = {
    "early": (900, 800, (950, 980, 999)),
    "middle": (500, 400, (600, 700, 800)),
    "uneven": (300, 250, (310, 600, 990)),
    "to_x0": (40, -1, (80, 120, 160)),
}


def _inputs(shape, n, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


def _rows(steps, B, order, corrector_order, solver_type="bh2", pt="epsilon"):
    t, t_next, hist = STEPS[steps]
    full = [torch.full((B,), v) for v in (t, t_next, *hist)]
    return unipc_coefficients(full[0], full[1], S, pt, full[2:], order, corrector_order, solver_type)


ORDERS = [(1, 0), (2, 0), (2, 1), (2, 2), (3, 2), (3, 3), (1, 3)]  # (predictor, corrector) orders


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("orders", ORDERS, ids=lambda o: f"p{o[0]}c{o[1]}")
@pytest.mark.parametrize("steps", list(STEPS))
def test_fp32_matches_reference(backend, solver_type, orders, steps):
    x, m, last, d1, d2, d3 = _inputs((4, 3, 9, 11), 6, scale=2.0)
    k = _rows(steps, 4, *orders, solver_type)
    last = last if orders[1] else None
    exp, x0_ref, y_ref = apply_row(k, x, m, (d1, d2, d3), None, last)
    out, x0, y = df.ops.unipc_step(x, m, k.float(), (d1, d2, d3), last, backend=backend)
    name = f"unipc_step {backend} {solver_type} {orders} {steps}"
    assert_fp32_close(name, out, exp)
    assert_fp32_close(name + " x0", x0, x0_ref)
    assert_fp32_close(name + " y", y, y_ref)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape, layout", layout_cases(SHAPES))
def test_shapes_and_layouts(backend, shape, layout):
    x, m, last, d1, d2, d3 = _inputs(shape, 6)
    if layout == "channels_last":
        x, m, last, d1, d2, d3 = (a.contiguous(memory_format=torch.channels_last) for a in (x, m, last, d1, d2, d3))
    if layout == "strided":
        m = torch.cat([m, m], dim=-1)[..., : shape[-1]]
    k = _rows("middle", shape[0], 3, 3, pt="v_prediction")
    exp, x0_ref, y_ref = apply_row(k, x, m, (d1, d2, d3), None, last)
    out, x0, y = df.ops.unipc_step(x, m, k.float(), (d1, d2, d3), last, backend=backend)
    for name, a, b in (("", out, exp), (" x0", x0, x0_ref), (" y", y, y_ref)):
        assert_fp32_close(f"unipc_step {backend} {shape} {layout}{name}", a, b)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 3, 32, 32)])
def test_low_precision(backend, dtype, shape):
    x, m, last, d1, d2, d3 = _inputs(shape, 6, dtype)
    k = _rows("middle", shape[0], 3, 3)
    out, x0, y = df.ops.unipc_step(x, m, k.float(), (d1, d2, d3), last, backend=backend)
    assert out.dtype == y.dtype == dtype
    hist32 = tuple(a.float() for a in (d1, d2, d3))
    r32, _, y32 = apply_row(k, x.float(), m.float(), hist32, None, last.float())
    rlow, _, ylow = apply_row(k, x, m, (d1, d2, d3), None, last)
    assert_lowp_close(f"unipc_step {backend} {dtype}", out, r32, rlow)
    assert_lowp_close(f"unipc_step {backend} {dtype} y", y, y32, ylow)


def _terms(alpha, sigma, lam, t_idx, s0_idx, earlier, order, solver_type, corrector):
    """(sigma_t / sigma_s0, alpha_t, phi, B, rho, r) of one UniPC update, as diffusers computes them (float64)."""
    h = lam[t_idx] - lam[s0_idx]
    phi, B_h, rho, rks = _rhos(h, lam[s0_idx], [lam[i] for i in earlier], order, solver_type, corrector)
    return sigma[t_idx] / sigma[s0_idx], alpha[t_idx], phi, B_h, rho, rks


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("orders", [o for o in ORDERS if o[0] > 0], ids=lambda o: f"p{o[0]}c{o[1]}")
@pytest.mark.parametrize("steps", ["early", "middle", "uneven"])
def test_rows_are_diffusers_formulas(solver_type, orders, steps):
    """The rows reproduce UniP and UniC written as diffusers writes them (D1s, rho, einsum), in float64."""
    x, m, last, d1, d2, d3 = (a.double() for a in _inputs((2, 4, 5), 6, scale=2.0))
    t, t_next, hist = STEPS[steps]
    k = _rows(steps, 2, *orders, solver_type)
    out, d0, y = apply_row(k, x, m, (d1, d2, d3), None, last if orders[1] else None)
    abar = S.alphas_cumprod
    ts = [t_next, t, *hist]
    alpha, sigma = abar[ts].sqrt(), (1 - abar[ts]).sqrt()
    lam = alpha.log() - sigma.log()
    p, c = orders
    terms_p = _terms(alpha, sigma, lam, 0, 1, [2, 3][: p - 1], p, solver_type, False)
    terms_c = _terms(alpha, sigma, lam, 1, 2, [3, 4][: c - 1], c, solver_type, True) if c else None
    expected, y_ref = unipc_step(x, d0, last, (d1, d2, d3), terms_p, terms_c)
    err = max((out - expected).abs().max().item(), (y - y_ref).abs().max().item())
    print(f"rows vs diffusers' formulas {solver_type} {orders} {steps}: max err {err:.3g}")
    assert err <= 1e-12 * max(1.0, expected.abs().max().item())


def test_to_x0_is_the_data_prediction():
    """The step to x_0 (t_next = -1) returns D0 (sigma = 0 there): an independent check of the rows' limit."""
    x, m, last, d1 = (a.double() for a in _inputs((2, 3, 4, 4), 4))
    k = _rows("to_x0", 2, 2, 2)
    out, d0, _ = apply_row(k, x, m, (d1,), None, last)
    assert (out - d0).abs().max() <= 1e-12


def _bad(**change):
    x, m, last, d1, d2 = _inputs((2, 3, 4, 4), 5)
    args = dict(x_t=x, model_output=m, coefficients=_rows("middle", 2, 2, 2).float(), x0_history=(d1, d2))
    args["last_sample"] = last
    args.update(change)
    return args


BAD = [
    (dict(model_output=torch.zeros(2, 3, 4, 5)), ValueError, "model_output"),
    (dict(last_sample=torch.zeros(2, 3, 4, 4, dtype=torch.float16)), TypeError, "last_sample"),
    (dict(last_sample=None), ValueError, "last_sample: the rows have a corrector"),
    (dict(coefficients=_rows("middle", 2, 2, 0).float()), ValueError, "last_sample: given"),
    (dict(x0_history=(torch.zeros(2, 3, 4, 4),)), ValueError, "x0_history: the rows read 2"),
    (dict(x0_history=[None]), ValueError, r"x0_history\[0\]"),
    (dict(x0_history=tuple(torch.zeros(2, 3, 4, 4) for _ in range(4))), ValueError, "x0_history"),
    (dict(x0_history=(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))), ValueError, r"x0_history\[1\]"),
    (dict(coefficients=torch.zeros(2, 13)), ValueError, "coefficients"),
    (dict(coefficients=None), ValueError, "coefficients"),
    (dict(coefficients=torch.full((14,), float("nan"))), ValueError, "coefficients"),
    (dict(coefficients=torch.tensor([1.0] * 9 + [0.0] * 5)), ValueError, "a_z"),
    (dict(x_t=torch.zeros(0, 3)), ValueError, "x_t"),
]


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("change, err, match", BAD)
def test_bad_input(change, err, match, backend):
    with pytest.raises(err, match=match):
        df.ops.unipc_step(**_bad(**change), backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_in_place_and_trace(backend):
    x, m, last, d1, d2 = _inputs((2, 3, 6, 6), 5)
    k = _rows("middle", 2, 2, 2).float()
    expected = df.ops.unipc_step(x, m, k, (d1, d2), last, backend="torch")
    xb, lb, d2b = x.clone(), last.clone(), d2.clone()
    with df.ops.trace() as calls:
        out, x0, y = df.ops.unipc_step(xb, m, k, (d1, d2b), lb, backend=backend, out=xb, x0_out=d2b, sample_out=lb)
    assert out is xb and x0 is d2b and y is lb
    for name, a, b in zip(("out", "x0", "y"), (out, x0, y), expected):
        assert_fp32_close(f"in place {backend} {name}", a, b)
    if backend != "torch":
        calls.require_fused(ops={"dpmpp_step"}, backend=backend)
    with pytest.raises(ValueError, match="out"):
        df.ops.unipc_step(x, m, k, (d1, d2), last, backend=backend, out=xb, sample_out=xb)
