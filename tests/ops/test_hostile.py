"""Hostile but realistic input to every op, on every backend here (the reference and the CPU kernels on CPU
tensors; Triton under the interpreter on CPU tensors, or on CUDA tensors with the CUDA kernels on a GPU machine):
out= arguments that share memory with inputs or with each other (PyTorch's overlap rules),
timesteps of odd devices, dtypes and sizes, errors that must name the argument at fault, and SiLU far out."""

import math

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from ddpm_fast import reference as ref
from ddpm_fast.ops import _checks
from tests.helpers import DEV, needs_cpu, needs_cuda, needs_triton, run_python

S = df.NoiseSchedule.linear(50)
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=needs_cpu),
    pytest.param("triton", marks=needs_triton),
    pytest.param("cuda", marks=needs_cuda),
]


@pytest.fixture(autouse=True)
def _tensors_where_the_backend_runs(request):
    """Tensors a test makes are CUDA tensors for the GPU backends on a GPU machine, else CPU tensors."""
    params = getattr(request.node, "callspec", None)
    backend = params.params.get("backend") if params is not None else None
    with torch.device(DEV if backend in ("triton", "cuda") else "cpu"):
        yield


def _no_kernel(backend, case):
    if backend in ("triton", "cuda") and case.startswith("conv3x3"):
        pytest.skip(f"no {backend} conv3x3")


SHAPE = (2, 4, 3, 5)
N = math.prod(SHAPE)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.get_default_device())


def _shared(offset):
    """Two (2, 4, 3, 5) views into one buffer, the second ``offset`` elements after the first."""
    buf = _randn(N + abs(offset), seed=1)
    a, b = (0, offset) if offset >= 0 else (-offset, 0)
    return buf[a : a + N].view(SHAPE), buf[b : b + N].view(SHAPE)


def _expanded():
    return torch.empty(1, *SHAPE[1:]).expand(SHAPE)


# ----------------------------------------------------------------------------------------------- out= overlap
def _step(backend, **kw):
    x, m, z = kw.pop("x_t", None), kw.pop("model_output", None), kw.pop("noise", None)
    x = _randn(*SHAPE, seed=2) if x is None else x
    m = _randn(*SHAPE, seed=3) if m is None else m
    z = _randn(*SHAPE, seed=4) if z is None else z
    return df.ops.ddpm_step(x, m, 7, S, z, clip_sample=True, backend=backend, **kw)


def _q_over_x0(be):
    x0, out = _shared(3)
    df.ops.q_sample(x0, 5, torch.randn(SHAPE), S, backend=be, out=out)


def _q_over_noise(be):
    z, out = _shared(-1)
    df.ops.q_sample(torch.randn(SHAPE), 5, z, S, backend=be, out=out)


def _q_expanded(be):
    df.ops.q_sample(torch.randn(SHAPE), 5, torch.randn(SHAPE), S, backend=be, out=_expanded())


def _step_over_x(be):
    x, out = _shared(5)
    _step(be, x_t=x, out=out)


def _step_x0_over_m(be):
    m, x0_out = _shared(2)
    _step(be, model_output=m, x0_out=x0_out)


def _step_out_is_x0_out(be):
    both = torch.empty(SHAPE)
    _step(be, out=both, x0_out=both)


def _step_out_over_x0_out(be):
    a, b = _shared(7)
    _step(be, out=a, x0_out=b)


def _step_x0_expanded(be):
    _step(be, x0_out=_expanded())


def _ddim_over_x(be):
    x, out = _shared(-4)
    df.ops.ddim_step(x, torch.randn(SHAPE), 9, 3, S, backend=be, out=out)


def _dpmpp_over_x(be):
    x, out = _shared(3)
    df.ops.dpmpp_step(x, torch.randn(SHAPE), 9, 3, S, backend=be, out=out)


def _dpmpp_x0_over_x0_last(be):
    x0_last, x0_out = _shared(-2)
    df.ops.dpmpp_step(torch.randn(SHAPE), torch.randn(SHAPE), 9, 3, S, x0_last, 12, backend=be, x0_out=x0_out)


def _unipc_rows():
    from ddpm_fast.reference.unipc_step import unipc_coefficients

    t, t_next, t1 = (torch.full((SHAPE[0],), v) for v in (9, 3, 12))
    return unipc_coefficients(t, t_next, S, "epsilon", [t1], 2, 1).float()


def _unipc_sample_out_over_last(be):
    last, y = _shared(2)
    x, m, d1 = (torch.randn(SHAPE) for _ in range(3))
    df.ops.unipc_step(x, m, _unipc_rows(), (d1,), last, backend=be, sample_out=y)


def _unipc_sample_out_is_out(be):
    x, m, d1, last, buf = (torch.randn(SHAPE) for _ in range(5))
    df.ops.unipc_step(x, m, _unipc_rows(), (d1,), last, backend=be, out=buf, sample_out=buf)


def _gn_over_x(be):
    x, out = _shared(1)
    df.ops.group_norm_silu(x, 2, None, None, backend=be, out=out)


def _gn_over_weight(be):
    out = torch.empty(SHAPE)
    df.ops.group_norm_silu(torch.randn(SHAPE), 2, out.view(-1)[6:10], None, backend=be, out=out)


def _gn_expanded(be):
    df.ops.group_norm_silu(torch.randn(SHAPE), 2, None, None, backend=be, out=_expanded())


def _attention_out_is_q(be):
    q = torch.randn(2, 2, 5, 4)
    df.ops.attention(q, torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4), backend=be, out=q)


def _attention_over_v(be):
    v = torch.randn(2, 2, 6, 4)
    df.ops.attention(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 6, 4), v, backend=be, out=v[:, :, 1:])


def _attention_expanded(be):
    q, kv = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 6, 4)
    df.ops.attention(q, kv, kv, backend=be, out=torch.empty(2, 2, 1, 4).expand(2, 2, 5, 4))


def _conv_strided_over_x(be):
    buf = torch.randn(2, 4, 3, 7)  # strided views, neither dense: PyTorch's own check calls these too hard
    df.ops.conv3x3(buf[..., :5], torch.randn(4, 4, 3, 3), backend=be, out=buf[..., 2:])


def _conv2d_over_weight(be):
    w = torch.randn(2 * 4 * 3 * 5)
    df.ops.conv2d(torch.randn(2, 4, 3, 5), w[:36].view(1, 4, 3, 3), padding=1, backend=be, out=w[4:34].view(2, 1, 3, 5))


def _linear_out_is_x(be):
    x = torch.randn(3, 4)
    df.ops.linear(x, torch.randn(4, 4), backend=be, out=x)


def _linear_expanded(be):
    df.ops.linear(torch.randn(3, 4), torch.randn(5, 4), backend=be, out=torch.empty(1, 5).expand(3, 5))


def _keyed_expanded(be):
    df.ops.keyed_normal(SHAPE, seed=1, backend=be, out=_expanded())


OVERLAPS = [  # (case, call taking a backend, pattern the ValueError must match)
    ("q_sample out partly over x0", _q_over_x0, "out: overlaps x0"),
    ("q_sample out partly over noise", _q_over_noise, "out: overlaps noise"),
    ("q_sample expanded out", _q_expanded, "out: more than one"),
    ("ddpm_step out partly over x_t", _step_over_x, "out: overlaps x_t"),
    ("ddpm_step x0_out partly over model_output", _step_x0_over_m, "x0_out: overlaps model_output"),
    ("ddpm_step out is x0_out", _step_out_is_x0_out, "out and x0_out: overlap"),
    ("ddpm_step out partly over x0_out", _step_out_over_x0_out, "out and x0_out: overlap"),
    ("ddpm_step expanded x0_out", _step_x0_expanded, "x0_out: more than one"),
    ("ddim_step out partly over x_t", _ddim_over_x, "out: overlaps x_t"),
    ("dpmpp_step out partly over x_t", _dpmpp_over_x, "out: overlaps x_t"),
    ("dpmpp_step x0_out partly over x0_last", _dpmpp_x0_over_x0_last, "x0_out: overlaps x0_last"),
    ("unipc_step sample_out partly over last_sample", _unipc_sample_out_over_last, "sample_out: overlaps last_sample"),
    ("unipc_step out is sample_out", _unipc_sample_out_is_out, "out and sample_out: overlap"),
    ("group_norm_silu out partly over x", _gn_over_x, "out: overlaps x"),
    ("group_norm_silu out over weight", _gn_over_weight, "out: overlaps weight"),
    ("group_norm_silu expanded out", _gn_expanded, "out: more than one"),
    ("attention out is q", _attention_out_is_q, "out: is q itself"),
    ("attention out partly over v", _attention_over_v, "out: overlaps v"),
    ("attention expanded out", _attention_expanded, "out: more than one"),
    ("conv3x3 strided out over strided x", _conv_strided_over_x, "out: overlaps x"),
    ("conv2d out partly over weight", _conv2d_over_weight, "out: overlaps weight"),
    ("linear out is x", _linear_out_is_x, "out: is x itself"),
    ("linear expanded out", _linear_expanded, "out: more than one"),
    ("keyed_normal expanded out", _keyed_expanded, "out: more than one"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OVERLAPS, ids=[c[0] for c in OVERLAPS])
def test_overlapping_out_is_refused_before_any_kernel(case, backend):
    name, call, match = case
    _no_kernel(backend, name)
    with pytest.raises(ValueError, match=match):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_elementwise_ops_run_in_place(backend):
    x, m, z = (_randn(*SHAPE, seed=s) for s in (2, 3, 4))
    t = torch.tensor([3, 40], device="cpu")
    tt = t.to(x.device)  # the reference takes t beside the data
    want, want_x0 = ref.ddpm_step(x, m, tt, S, z, clip_sample=True, return_x0=True)
    y, mm = x.clone(), m.clone()
    got = df.ops.ddpm_step(y, mm, t, S, z, clip_sample=True, backend=backend, out=y, x0_out=mm)
    assert got is y
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mm, want_x0, atol=1e-5, rtol=1e-5)
    y = x.clone()
    df.ops.ddim_step(y, m, t, t - 3, S, eta=0.5, seed=1, backend=backend, out=y)
    torch.testing.assert_close(y, ref.ddim_step(x, m, tt, tt - 3, S, eta=0.5, seed=1), atol=1e-5, rtol=1e-5)
    zz = z.clone()
    df.ops.q_sample(x, t, zz, S, backend=backend, out=zz)
    torch.testing.assert_close(zz, ref.q_sample(x, tt, z, S), atol=1e-5, rtol=1e-5)
    y = x.clone()
    df.ops.group_norm_silu(y, 2, None, None, backend=backend, out=y)
    torch.testing.assert_close(y, ref.group_norm_silu(x, 2, None, None), atol=2e-5, rtol=1e-5)
    if backend == "cuda":
        return  # the cuda attention kernel takes no float32 (backend="cuda" names it: an error, not a fallback)
    q, k, v, r = (_randn(2, 2, 5, 4, seed=s) for s in range(4))
    rr = r.clone()
    df.ops.attention(q, k, v, residual=rr, backend=backend, out=rr)
    torch.testing.assert_close(rr, ref.attention(q, k, v, residual=r), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_out_beside_its_input_is_allowed(backend):
    """Disjoint strided views of one buffer (out in the even, x in the odd elements): no overlap, no error."""
    buf = _randn(*SHAPE[:3], 2 * SHAPE[3], seed=5)
    x, out = buf[..., 1::2], buf[..., 0::2]
    want = ref.group_norm_silu(x.clone(), 2, None, None)
    df.ops.group_norm_silu(x, 2, None, None, backend=backend, out=out)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)


def test_meta_tensors_have_no_memory_to_overlap():
    x = torch.empty(SHAPE, device="meta")
    assert df.ops.group_norm_silu(x, 2, None, None, out=x) is x
    assert df.ops.ddpm_step(x, torch.empty_like(x), 5, S, seed=1, out=x).shape == SHAPE


def _addresses(x):
    idx = [torch.arange(n) * s for n, s in zip(x.shape, x.stride())]
    flat = x.storage_offset() + sum(i.view([-1 if d == j else 1 for j in range(x.dim())]) for d, i in enumerate(idx))
    return flat.reshape(-1).tolist()


def test_overlap_decisions_match_brute_force():
    """has_internal_overlap and overlap, exact on strided layouts PyTorch calls too hard, against the sets of
    element addresses of random as_strided views of one buffer."""
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(400)

    def view():
        dims = int(torch.randint(1, 4, (), generator=g))
        shape = [int(torch.randint(1, 5, (), generator=g)) for _ in range(dims)]
        strides = [int(torch.randint(0, 9, (), generator=g)) for _ in range(dims)]
        return base.as_strided(shape, strides, int(torch.randint(0, 30, (), generator=g)))

    for _ in range(400):
        a, b = view(), view()
        addr_a, addr_b = _addresses(a), _addresses(b)
        assert _checks.has_internal_overlap(a) == (len(set(addr_a)) < len(addr_a)), (a.shape, a.stride())
        same = a.shape == b.shape and a.storage_offset() == b.storage_offset() and addr_a == addr_b
        expected = "same" if same else "partial" if set(addr_a) & set(addr_b) else None
        assert _checks.overlap(a, b) == expected, (a.shape, a.stride(), a.storage_offset(), b.shape, b.stride())


# ----------------------------------------------------------------------------------------------- timesteps
def _t_ops(backend, t, x=None):
    x = _randn(*SHAPE, seed=2) if x is None else x
    m = _randn(*x.shape, seed=3).to(x.device)
    yield "ddpm_step", lambda: df.ops.ddpm_step(x, m, t, S, m, backend=backend)
    yield "q_sample", lambda: df.ops.q_sample(x, t, m, S, backend=backend)
    yield "ddim_step", lambda: df.ops.ddim_step(x, m, t, -1, S, m, eta=0.5, backend=backend)
    yield "keyed_normal", lambda: df.ops.keyed_normal(SHAPE, seed=3, t=t, device=x.device, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_t_beside_real_data_is_a_clear_error(backend):
    for _name, call in _t_ops(backend, torch.tensor([1, 2], device="meta")):
        with pytest.raises(ValueError, match="^t: on the meta device"):
            call()
    with pytest.raises(ValueError, match="^t_prev: on the meta device"):
        df.ops.ddpm_step(torch.randn(SHAPE), torch.randn(SHAPE), 5, S, t_prev=torch.tensor([1, 2], device="meta"))


def test_meta_t_with_meta_data_still_runs():
    x = torch.empty(SHAPE, device="meta")
    t = torch.zeros(2, dtype=torch.int64, device="meta")
    assert df.ops.ddpm_step(x, torch.empty_like(x), t, S, seed=1).device.type == "meta"
    assert df.ops.q_sample(x, t, torch.empty_like(x), S).device.type == "meta"
    with pytest.raises(ValueError, match="^t: this op reads t's values on the host"):
        df.ops.ddim_step(x, torch.empty_like(x), t, -1, S)  # DDIM's coefficients need t's values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16])
def test_every_integer_dtype_of_t_gives_the_int64_answer(dtype, backend):
    t = torch.tensor([3, 41], device="cpu")
    for (name, call), (_, call64) in zip(_t_ops(backend, t.to(dtype)), _t_ops(backend, t)):
        got, want = call(), call64()
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "t, shown",
    [
        (2**40, "1099511627776"),
        (2**63 - 1, "9223372036854775807"),
        (2**64 + 3, "18446744073709551619"),
        (torch.tensor([2**40, 1]), "1099511627776"),
        (torch.tensor([2**63 - 1, 1]), "9223372036854775807"),
        (torch.tensor([1, 2**63 + 5], dtype=torch.uint64), "9223372036854775813"),
        (torch.tensor([2**32 - 1, 0], dtype=torch.uint32), "4294967295"),
        (torch.tensor([-(2**63), 0]), "-9223372036854775808"),
    ],
)
def test_huge_t_is_a_value_error_naming_t(t, shown, backend):
    for name, call in _t_ops(backend, t):
        if name == "keyed_normal" and shown == "4294967295":
            continue  # keyed noise takes any t below 2**32
        with pytest.raises(ValueError, match=f"^t: expected values in .*got {shown}$"):
            call()
    with pytest.raises(ValueError, match="^t_prev: "):
        df.ops.ddpm_step(torch.randn(SHAPE), torch.randn(SHAPE), 5, S, seed=1, t_prev=t, backend=backend)


@pytest.mark.parametrize("t", [True, torch.tensor([True, False]), 3.0, torch.tensor([1.0, 2.0]), "5"])
def test_bool_and_non_integer_t_are_type_errors(t):
    for _name, call in _t_ops("torch", t):
        with pytest.raises(TypeError, match="^t: "):
            call()


# ----------------------------------------------------------------------------------------------- which argument
def _x():
    return _randn(*SHAPE, seed=6)


def _naming_cases():
    """(case, call taking a backend, error type, the argument the message must start with)"""
    x, m, z = _x(), _x(), _x()
    f64, meta = torch.float64, "meta"
    yield (
        "ddpm_step x_t alone float64",
        lambda be: df.ops.ddpm_step(x.to(f64), m, 5, S, z, backend=be),
        TypeError,
        "x_t",
    )
    yield (
        "ddpm_step x_t alone on meta",
        lambda be: df.ops.ddpm_step(x.to(meta), m, 5, S, z, backend=be),
        ValueError,
        "x_t",
    )
    yield (
        "ddpm_step model_output int",
        lambda be: df.ops.ddpm_step(x, m.int(), 5, S, backend=be),
        TypeError,
        "model_output",
    )
    yield (
        "ddpm_step model_output meta",
        lambda be: df.ops.ddpm_step(x, m.to(meta), 5, S, backend=be),
        ValueError,
        "model_output",
    )
    yield (
        "ddpm_step model_output None",
        lambda be: df.ops.ddpm_step(x, None, 5, S, backend=be),
        TypeError,
        "model_output",
    )
    yield (
        "ddpm_step noise sparse",
        lambda be: df.ops.ddpm_step(x, m, 5, S, z.to_sparse(), backend=be),
        TypeError,
        "noise",
    )
    yield (
        "ddpm_step out float64",
        lambda be: df.ops.ddpm_step(x, m, 5, S, z, backend=be, out=x.to(f64)),
        TypeError,
        "out",
    )
    yield "ddpm_step out shape", lambda be: df.ops.ddpm_step(x, m, 5, S, z, backend=be, out=x[:1]), ValueError, "out"
    yield (
        "ddpm_step x0_out meta",
        lambda be: df.ops.ddpm_step(x, m, 5, S, z, backend=be, x0_out=x.to(meta)),
        ValueError,
        "x0_out",
    )
    yield (
        "ddim_step eta nan",
        lambda be: df.ops.ddim_step(x, m, 5, 2, S, eta=float("nan"), backend=be),
        ValueError,
        "eta",
    )
    yield (
        "ddim_step x_t alone float64",
        lambda be: df.ops.ddim_step(x.to(f64), m, 5, 2, S, z, backend=be, out=z),
        TypeError,
        "x_t",
    )
    yield "q_sample noise int", lambda be: df.ops.q_sample(x, 5, z.int(), S, backend=be), TypeError, "noise"
    yield (
        "q_sample x0 alone on meta",
        lambda be: df.ops.q_sample(x.to(meta), 5, z, S, backend=be, out=m),
        ValueError,
        "x0",
    )
    yield "q_sample out sparse", lambda be: df.ops.q_sample(x, 5, z, S, backend=be, out=m.to_sparse()), TypeError, "out"
    w, b, add = torch.randn(4), torch.randn(4), torch.randn(2, 4)
    gn = df.ops.group_norm_silu
    yield "group_norm_silu x alone on meta", lambda be: gn(x.to(meta), 2, w, b, backend=be), ValueError, "x"
    yield "group_norm_silu x channels", lambda be: gn(x[:, :2], 2, w, b, add=add, backend=be), ValueError, "x"
    yield "group_norm_silu weight float64", lambda be: gn(x, 2, w.to(f64), b, backend=be), TypeError, "weight"
    yield (
        "group_norm_silu weight complex",
        lambda be: gn(x, 2, w.to(torch.complex64), b, backend=be),
        TypeError,
        "weight",
    )
    yield "group_norm_silu bias sparse", lambda be: gn(x, 2, w, b.to_sparse(), backend=be), TypeError, "bias"
    yield "group_norm_silu add meta", lambda be: gn(x, 2, w, b, add=add.to(meta), backend=be), ValueError, "add"
    yield "group_norm_silu out shape", lambda be: gn(x, 2, w, b, backend=be, out=x[..., :1]), ValueError, "out"
    yield "group_norm_silu silu str", lambda be: gn(x, 2, w, b, silu="no", backend=be), TypeError, "silu"
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 3)
    at = df.ops.attention
    yield "attention q alone on meta", lambda be: at(q.to(meta), k, v, backend=be), ValueError, "q"
    yield "attention q alone float16", lambda be: at(q.half(), k, v, backend=be), TypeError, "q"
    yield "attention k sparse", lambda be: at(q, k.to_sparse(), v, backend=be), TypeError, "k"
    yield "attention v list", lambda be: at(q, k, v.tolist(), backend=be), TypeError, "v"
    yield "attention scale inf", lambda be: at(q, k, v, scale=float("inf"), backend=be), ValueError, "scale"
    yield (
        "attention out float64",
        lambda be: at(q, k, v, backend=be, out=torch.empty(2, 2, 5, 3, dtype=f64)),
        TypeError,
        "out",
    )
    cw, cb, cr = torch.randn(5, 4, 3, 3), torch.randn(5), torch.randn(2, 5, 3, 5)
    cv = df.ops.conv3x3
    yield "conv3x3 x alone on meta", lambda be: cv(x.to(meta), cw, cb, cr, backend=be), ValueError, "x"
    yield "conv3x3 bias list", lambda be: cv(x, cw, cb.tolist(), backend=be), TypeError, "bias"
    yield "conv3x3 weight float64", lambda be: cv(x, cw.to(f64), cb, backend=be), TypeError, "weight"
    yield (
        "conv3x3 packed float64",
        lambda be: cv(x, cw, cb, packed=torch.zeros(16, 4, 5, dtype=f64), backend=be),
        TypeError,
        "packed",
    )
    c2 = df.ops.conv2d
    yield "conv2d x alone on meta", lambda be: c2(x.to(meta), cw, cb, padding=1, backend=be), ValueError, "x"
    yield "conv2d bias list", lambda be: c2(x, cw, cb.tolist(), padding=1, backend=be), TypeError, "bias"
    yield "conv2d weight float64", lambda be: c2(x, cw.to(f64), cb, padding=1, backend=be), TypeError, "weight"
    yield "conv2d stride 0", lambda be: c2(x, cw, cb, stride=0, backend=be), ValueError, "stride"
    yield "conv2d padding str", lambda be: c2(x, cw, cb, padding="full", backend=be), ValueError, "padding"
    yield "conv2d groups 3", lambda be: c2(x, cw, cb, groups=3, backend=be), ValueError, "groups"
    yield "conv2d residual shape", lambda be: c2(x, cw, cb, cr, backend=be), ValueError, "residual"
    yield "conv2d prepared dict", lambda be: c2(x, cw, cb, padding=1, prepared={}, backend=be), TypeError, "prepared"
    yield "conv2d kernel too big", lambda be: c2(x[..., :1, :1], cw, cb, backend=be), ValueError, "x"
    lw, lb = torch.randn(6, 5), torch.randn(6)
    li = df.ops.linear
    yield "linear weight shape", lambda be: li(x, lw.t(), lb, backend=be), ValueError, "weight"
    yield "linear bias shape", lambda be: li(x, lw, lb[:5], backend=be), ValueError, "bias"
    yield "linear x int", lambda be: li(x.long(), lw, lb, backend=be), TypeError, "x"
    yield "linear residual shape", lambda be: li(x, lw, lb, x, backend=be), ValueError, "residual"
    yield "linear scratch tensor", lambda be: li(x, lw, lb, scratch=x, backend=be), TypeError, "scratch"
    kn = df.ops.keyed_normal
    yield "keyed_normal dtype int64", lambda be: kn(SHAPE, seed=1, dtype=torch.int64, backend=be), TypeError, "dtype"
    yield "keyed_normal shape str", lambda be: kn(("a", 3), seed=1, backend=be), TypeError, "shape"
    yield (
        "keyed_normal channels_last 2-d",
        lambda be: kn((2, 3), seed=1, memory_format=torch.channels_last, backend=be),
        ValueError,
        "memory_format",
    )


NAMING = [c[0] for c in _naming_cases()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMING)
def test_errors_name_the_argument_at_fault(name, backend):
    _no_kernel(backend, name)
    _, call, err, arg = next(c for c in _naming_cases() if c[0] == name)  # its tensors where the backend runs
    with pytest.raises(err, match=rf"^{arg}: ") as e:
        call(backend)
    print(f"{name}: {e.value}")


# ----------------------------------------------------------------------------------------------- SiLU far out
EXTREMES = [-1e30, -1e25, -3e38, -88.0, -87.0, -70.0, -1e4, 1e30, 3e38, math.inf, -math.inf, math.nan, 0.0, -1.0, 2.0]


def _extreme_case(channels_last):
    """weight 0 and the extremes as bias: the normalised, affine value y is each extreme exactly (y = 0 x + b),
    in every lane position of the vector loop and of its partial tail (24 channels: NHWC rows of 16 + 8; 37
    pixels: NCHW runs of 32 + 5)."""
    C = 24
    bias = torch.tensor([EXTREMES[i % len(EXTREMES)] for i in range(C)], dtype=torch.float32)
    x = _randn(2, C, 37, 1, seed=7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.zeros(C), bias


def _assert_silu_of_bias(out, bias):
    want = F.silu(bias).view(1, -1, 1, 1).expand_as(out)
    bad = ~((out - want).abs() <= 2e-5 + 1e-5 * want.abs()) & ~(out.isnan() & want.isnan()) & (out != want)
    worst = [(float(bias[c]), float(out[0, c, 0, 0]), float(want[0, c, 0, 0])) for c in bad.nonzero()[:, 1].unique()]
    assert not worst, f"(y, got, F.silu(y)): {worst}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_far_out_matches_torch(backend, channels_last):
    x, w, b = _extreme_case(channels_last)
    out = df.ops.group_norm_silu(x, 4, w, b, backend=backend)
    _assert_silu_of_bias(out, b)


_SILU_CHECK = """
import sys, torch
from ddpm_fast import _ext
import ddpm_fast as df
from tests.ops.test_hostile import _extreme_case, _assert_silu_of_bias
assert _ext.cpu_capability() == sys.argv[1], _ext.cpu_capability()
for cl in (False, True):
    x, w, b = _extreme_case(cl)
    _assert_silu_of_bias(df.ops.group_norm_silu(x, 4, w, b, backend="cpu"), b)
print("silu far out ok", sys.argv[1])
"""


@needs_cpu
@pytest.mark.parametrize("build", ["default", "avx2", "avx512"])
def test_silu_far_out_in_every_cpu_build(build):
    """Each ISA's own SiLU (AVX-512's reciprocal of 1 + 2^100 made SiLU(-1e30) -0.79)."""
    from ddpm_fast import _ext

    if build not in _ext.runnable_builds():
        pytest.skip(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) cannot run the {build} build")
    assert run_python(_SILU_CHECK, build, DDPM_FAST_CPU_CAPABILITY=build) == 0


def test_cases_cover_every_public_op_with_out():
    """Every public op taking out= has overlap cases above."""
    import inspect

    ops = [n for n in df.ops.__all__ if inspect.isfunction(getattr(df.ops, n))]
    with_out = {n for n in ops if "out" in inspect.signature(getattr(df.ops, n)).parameters}
    print(sorted(with_out))
    covered = {c[0].split()[0] for c in OVERLAPS}
    assert with_out <= covered, with_out - covered


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_that_requires_grad_is_refused(backend):
    """A kernel writing straight into such an out would bypass autograd (PyTorch's out= functions refuse it)."""
    out = torch.zeros(SHAPE, requires_grad=True)
    with pytest.raises(ValueError, match="^out: requires grad"):
        df.ops.ddpm_step(torch.randn(SHAPE), torch.randn(SHAPE), 5, S, seed=1, backend=backend, out=out)
    with pytest.raises(ValueError, match="^out: requires grad"):
        df.ops.group_norm_silu(torch.randn(SHAPE), 2, None, None, backend=backend, out=out * 2)
    with torch.no_grad():
        df.ops.group_norm_silu(torch.randn(SHAPE), 2, None, None, backend=backend, out=out)


@pytest.mark.parametrize(
    "c, err, match",
    [
        (torch.ones(2, 7, dtype=torch.int64), TypeError, "floating-point"),
        (torch.ones(2, 7, device="meta"), ValueError, "meta"),
        (torch.ones(2, 7).to_sparse(), TypeError, "dense"),
        (torch.full((7,), float("nan")), ValueError, "non-finite"),
    ],
)
def test_bad_coefficient_tables_are_named(c, err, match):
    with pytest.raises(err, match=f"^coefficients: .*{match}"):
        df.ops.ddpm_step(torch.randn(SHAPE), torch.randn(SHAPE), 5, S, seed=1, coefficients=c)


def test_num_groups_takes_any_integer():
    import numpy as np

    x = _randn(*SHAPE, seed=8)
    torch.testing.assert_close(
        df.ops.group_norm_silu(x, np.int64(2), None, None), ref.group_norm_silu(x, 2, None, None)
    )
