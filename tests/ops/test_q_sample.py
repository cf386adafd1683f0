import pytest
import torch

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import assert_fp32_close, assert_lowp_close, layout_cases, needs_cpu

S = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPES = [(5, 3, 17, 9), (1, 1, 1, 1), (2, 7, 1, 1), (3, 40), (4, 3, 32, 32)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    eps = torch.randn(shape, generator=g).to(dtype)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    return x0, eps, t


@needs_cpu
@pytest.mark.parametrize("shape, layout", layout_cases(SHAPES))
def test_fp32_matches_reference(shape, layout):
    x0, eps, t = _inputs(shape, torch.float32)
    if layout == "channels_last":
        x0, eps = (a.contiguous(memory_format=torch.channels_last) for a in (x0, eps))
    if layout == "strided":
        x0 = torch.cat([x0, x0], dim=-1)[..., : shape[-1]]
    expected = ref.q_sample(x0, t, eps, S)
    out = df.ops.q_sample(x0, t, eps, S, backend="cpu")
    assert_fp32_close(f"q_sample {shape} {layout}", out, expected)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_low_precision(dtype, shape):
    x0, eps, t = _inputs(shape, dtype)
    out = df.ops.q_sample(x0, t, eps, S, backend="cpu")
    assert out.dtype == dtype
    assert_lowp_close(
        f"q_sample {dtype}", out, ref.q_sample(x0.float(), t, eps.float(), S), ref.q_sample(x0, t, eps, S)
    )


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_generated_noise_is_keyed_and_returned(dtype, channels_last):
    x0, _, t = _inputs((3, 5, 6, 7), dtype)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    x_t, eps = df.ops.q_sample(x0, t, None, S, seed=99, sample_offset=2, backend="cpu")
    r_xt, r_eps = ref.q_sample(x0.float(), t, None, S, seed=99, sample_offset=2)
    assert_fp32_close("drawn eps", eps.float(), r_eps.to(dtype).float(), atol=2e-5)
    # x_t is consistent with the eps it returned
    assert_fp32_close(
        "x_t from returned eps",
        x_t.float(),
        ref.q_sample(x0.float(), t, eps.float(), S),
        atol=1e-2 if dtype != torch.float32 else 1e-5,
    )
    if dtype == torch.float32:
        assert_fp32_close("x_t", x_t, r_xt, atol=2e-5)


@needs_cpu
def test_out_and_in_place():
    x0, eps, t = _inputs((4, 3, 8, 8), torch.float32)
    expected = ref.q_sample(x0, t, eps, S)
    out = torch.empty_like(x0)
    assert df.ops.q_sample(x0, t, eps, S, backend="cpu", out=out) is out
    assert_fp32_close("out=", out, expected)
    out_cl = torch.empty_like(x0).contiguous(memory_format=torch.channels_last)
    df.ops.q_sample(x0, t, eps, S, backend="cpu", out=out_cl)
    assert_fp32_close("out= channels_last", out_cl, expected)
    x = x0.clone()
    df.ops.q_sample(x, t, eps, S, backend="cpu", out=x)
    assert_fp32_close("in place", x, expected)


@needs_cpu
def test_int_timestep_and_scalar_tensor():
    x0, eps, _ = _inputs((3, 2, 4, 4), torch.float32)
    a = df.ops.q_sample(x0, 10, eps, S, backend="cpu")
    b = df.ops.q_sample(x0, torch.tensor(10), eps, S, backend="cpu")
    c = ref.q_sample(x0, torch.full((3,), 10), eps, S)
    assert torch.equal(a, b)
    assert_fp32_close("int t", a, c)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drawn", [False, True])
@pytest.mark.parametrize("coefficients", [False, True])
def test_gradient_on_the_fused_kernel(dtype, drawn, coefficients):
    """With x0 and eps requiring grad the cpu kernel still serves q_sample, and its backward gives a_t g and b_t g
    (float64 oracle: the gradient of the reference in float64); a drawn eps gets no gradient."""
    x0, eps, t = _inputs((3, 5, 7, 4), dtype)
    table = torch.rand(3, 2, dtype=torch.float64) if coefficients else None
    g = torch.randn(x0.shape).to(dtype)
    x0.requires_grad_(True)
    eps = None if drawn else eps.requires_grad_(True)
    with df.ops.trace() as calls:
        result = df.ops.q_sample(x0, t, eps, S, seed=5, coefficients=table, backend="cpu")
    assert [(c.op, c.backend) for c in calls] == [("q_sample", "cpu")]
    x_t = result[0] if drawn else result
    if drawn:
        assert not result[1].requires_grad
    x_t.backward(g)
    x64 = x0.detach().double().requires_grad_(True)
    e64 = (result[1] if drawn else eps.detach()).double().requires_grad_(not drawn)
    ref.q_sample(x64, t, e64, S, coefficients=table).backward(g.double())
    if dtype == torch.float32:
        assert_fp32_close(f"q_sample d/dx0 drawn={drawn} table={coefficients}", x0.grad, x64.grad)
        if not drawn:
            assert_fp32_close(f"q_sample d/deps table={coefficients}", eps.grad, e64.grad)
    else:  # against the reference's own gradient in that dtype
        xl = x0.detach().clone().requires_grad_(True)
        el = (result[1] if drawn else eps.detach()).clone().requires_grad_(not drawn)
        ref.q_sample(xl, t, el, S, coefficients=table).backward(g)
        assert_lowp_close(f"q_sample d/dx0 {dtype} drawn={drawn} table={coefficients}", x0.grad, x64.grad, xl.grad)
        if not drawn:
            assert_lowp_close(f"q_sample d/deps {dtype} table={coefficients}", eps.grad, e64.grad, el.grad)
    # the forward is the kernel's, as without autograd
    with torch.no_grad():
        again = df.ops.q_sample(x0, t, None if drawn else eps, S, seed=5, coefficients=table, backend="cpu")
    assert torch.equal(x_t.detach(), again[0] if drawn else again)


@needs_cpu
def test_gradient_with_out_is_refused():
    x0, eps, t = _inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="^out: .*automatic differentiation"):
        df.ops.q_sample(x0.requires_grad_(True), t, eps, S, backend="cpu", out=torch.empty_like(eps))


def test_gradient_flows_through_reference():
    x0, eps, t = _inputs((2, 3, 4, 4), torch.float32)
    x0.requires_grad_(True)
    df.ops.q_sample(x0, t, eps, S).sum().backward()
    torch.testing.assert_close(x0.grad, S.sqrt_alphas_cumprod[t].float().view(2, 1, 1, 1).expand_as(x0))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x0=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "x0"),
        (dict(x0=torch.zeros(0, 3)), ValueError, "x0"),
        (dict(noise=torch.zeros(2, 4)), ValueError, "noise"),
        (dict(noise=torch.zeros(2, 3, dtype=torch.float16)), TypeError, "noise"),
        (dict(t=torch.tensor([0, 1000])), ValueError, "t"),
        (dict(t=-1), ValueError, "t"),
        (dict(t=torch.tensor([0.5, 1.0])), TypeError, "t"),
        (dict(t=torch.tensor([1, 2, 3])), ValueError, "t"),
        (dict(t=torch.zeros(2, 1, dtype=torch.int64)), ValueError, "t"),
        (dict(schedule="linear"), TypeError, "schedule"),
        (dict(noise=None, seed=-1), ValueError, "seed"),
        (dict(noise=None, seed=1.5), TypeError, "seed"),
        (dict(sample_offset=-3), ValueError, "sample_offset"),
        (dict(out=torch.zeros(3, 3)), ValueError, "out"),
        (dict(backend="nope"), ValueError, "backend"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(x0=torch.zeros(2, 3), t=torch.tensor([0, 5]), noise=torch.zeros(2, 3), schedule=S)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("seed", "sample_offset", "out", "backend") if k in args}
    with pytest.raises(err, match=match):
        df.ops.q_sample(args["x0"], args["t"], args["noise"], args["schedule"], **extra)
