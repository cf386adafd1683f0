"""attention's backward on the cpu kernels (csrc/cpu/attention_backward.cpp, flash-style: the softmax recomputed from
the forward's log-sum-exp) against the reference's autograd in float64: dq, dk, dv and d(residual) on odd shapes,
both of the kernel's work splits, strided operands, bf16, a finite-difference check, NaN, double backward."""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import assert_fp32_close, assert_lowp_close, needs_cpu

# (B, H, N, M, D, Dv): sequence 1 and head dim 1, queries and keys not multiples of the kernel's 256-query /
# 256-key blocks, several of either, the U-Net's head of 256
CASES = [
    (1, 1, 1, 1, 1, 1),
    (1, 1, 1, 7, 3, 5),
    (2, 3, 37, 29, 5, 7),
    (1, 1, 70, 300, 17, 9),  # one head, two key blocks: dK/dV by key block, then dQ by query block
    (2, 2, 65, 513, 8, 8),  # three key blocks, one task a head (with up to two threads)
    (2, 1, 300, 20, 6, 6),  # two query blocks
    (2, 1, 76, 90, 256, 256),
]


def _inputs(B, H, N, M, D, Dv, seed, residual):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, M, D, generator=g)
    v, do = torch.randn(B, H, M, Dv, generator=g), torch.randn(B, H, N, Dv, generator=g)
    res = torch.randn(B, H, N, Dv, generator=g) if residual else None
    return q, k, v, res, do


def _grads(fn, tensors, do, dtype, **kw):
    """fn's output and the gradients of (out * do).sum() for the given tensors, as leaves of ``dtype``."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]
    out = fn(*leaves[:3], residual=leaves[3], **kw)
    out.backward(do.to(dtype))
    return out, [None if t is None else t.grad for t in leaves]


NAMES = ("q", "k", "v", "residual")


@needs_cpu
@pytest.mark.parametrize("B, H, N, M, D, Dv", CASES)
@pytest.mark.parametrize("residual", [False, True])
def test_backward_matches_float64_reference(B, H, N, M, D, Dv, residual):
    q, k, v, res, do = _inputs(B, H, N, M, D, Dv, seed=N * 31 + M, residual=residual)
    with df.ops.trace() as calls:
        out, ours = _grads(df.ops.attention, (q, k, v, res), do, torch.float32)
    assert [str(c) for c in calls] == ["attention cpu/native", "attention_backward cpu/native"]
    exact_out, exact = _grads(ref.attention, (q, k, v, res), do, torch.float64)
    assert_fp32_close(f"out {(B, H, N, M, D, Dv)}", out, exact_out, atol=2e-5)
    for name, o, e in zip(NAMES, ours, exact):
        if e is None:
            assert o is None
            continue
        assert o.dtype == torch.float32
        assert_fp32_close(f"d{name} {(B, H, N, M, D, Dv)} residual={residual}", o, e, atol=2e-5)


@needs_cpu
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_work_splits_agree(threads):
    """Both ways of splitting the work (a task a head; key blocks then query blocks) at 1-3 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in ((1, 1, 530, 600, 12, 12), (3, 1, 270, 300, 16, 8)):
            q, k, v, _, do = _inputs(*shape, seed=threads, residual=False)
            _, ours = _grads(df.ops.attention, (q, k, v, None), do, torch.float32)
            _, exact = _grads(ref.attention, (q, k, v, None), do, torch.float64)
            for name, o, e in zip(NAMES, ours[:3], exact[:3]):
                assert_fp32_close(f"d{name} {shape} threads={threads}", o, e, atol=2e-5)
    finally:
        torch.set_num_threads(before)


@needs_cpu
def test_strided_operands_and_scale():
    """q, k, v as the U-Net's strided head views of (B, N, 3C) projections (read in place), a custom scale, and a
    gradient that is itself a strided view."""
    B, N, heads, d = 2, 40, 3, 6
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, N, 3 * heads * d, generator=g)
    do = torch.randn(B, N, heads, d, generator=g).transpose(1, 2)

    def run(fn, dtype):
        x = qkv.detach().to(dtype).requires_grad_(True)
        q, k, v = (t.view(B, N, heads, d).transpose(1, 2) for t in x.split(heads * d, dim=-1))
        fn(q, k, v, scale=0.7).backward(do.to(dtype))
        return x.grad

    ours, exact = run(df.ops.attention, torch.float32), run(ref.attention, torch.float64)
    assert_fp32_close("d(qkv) strided heads", ours, exact, atol=2e-5)


@needs_cpu
def test_bf16_gradients():
    """bf16 tensors run the fp32 kernels on converted copies: the gradients' error against the float64 reference
    is at most twice PyTorch's own bf16 error (+ 1e-2)."""
    q, k, v, res, do = _inputs(2, 2, 33, 45, 16, 16, seed=3, residual=True)
    _, ours = _grads(df.ops.attention, (q, k, v, res), do, torch.bfloat16)
    _, exact = _grads(ref.attention, (q, k, v, res), do, torch.float64)
    _, torch_bf16 = _grads(ref.attention, (q, k, v, res), do, torch.bfloat16)
    for name, o, e, t in zip(NAMES, ours, exact, torch_bf16):
        assert o.dtype == torch.bfloat16
        assert_lowp_close(f"d{name} bf16", o, e.float(), t)


@needs_cpu
def test_finite_differences_of_the_fused_forward():
    """The gradient agrees with central differences of the fused forward itself (fp32): d/de L(x + e u) for
    L = sum(out * w) and a random direction u per input."""
    q, k, v, res, w = _inputs(1, 2, 9, 11, 4, 3, seed=7, residual=True)
    inputs = [q, k, v, res]
    _, grads = _grads(df.ops.attention, inputs, w, torch.float32)

    def loss(xs):
        with torch.no_grad():
            return (df.ops.attention(*xs[:3], residual=xs[3]).double() * w.double()).sum().item()

    g = torch.Generator().manual_seed(8)
    h = 1e-2
    for i, name in enumerate(NAMES):
        u = torch.randn(inputs[i].shape, generator=g)
        plus, minus = list(inputs), list(inputs)
        plus[i], minus[i] = inputs[i] + h * u, inputs[i] - h * u
        numeric = (loss(plus) - loss(minus)) / (2 * h)
        analytic = (grads[i].double() * u.double()).sum().item()
        print(f"d{name} . u: analytic {analytic:.6g}, central difference {numeric:.6g}")
        assert abs(analytic - numeric) <= 2e-3 * (1 + abs(numeric))


@needs_cpu
@pytest.mark.parametrize("where", ["q", "grad"])
def test_nonfinite_propagates_as_nan(where):
    """A NaN in a query row or in the output gradient gives NaN exactly where the reference's gradients have it."""
    q, k, v, _, do = _inputs(1, 1, 12, 20, 8, 8, seed=9, residual=False)
    if where == "q":
        q[0, 0, 3, 2] = float("nan")
    else:
        do[0, 0, 2, 1] = float("nan")
    _, ours = _grads(df.ops.attention, (q, k, v, None), do, torch.float32)
    _, exact = _grads(ref.attention, (q, k, v, None), do, torch.float64)
    for name, o, e in zip(NAMES, ours[:3], exact[:3]):
        print(f"d{name}: {int(o.isnan().sum())} NaN, reference {int(e.isnan().sum())}")
        assert torch.equal(o.isnan(), e.isnan()), f"d{name}: NaN where the reference has none, or none where it has"
        finite = ~e.isnan()
        if finite.any():
            assert_fp32_close(f"d{name} finite part", o[finite], e[finite], atol=2e-5)


@needs_cpu
def test_forward_unchanged_and_double_backward_refused():
    """The forward under autograd equals the inference kernel's result; double backward says it is not supported."""
    q, k, v, res, do = _inputs(2, 1, 10, 12, 8, 8, seed=11, residual=True)
    q.requires_grad_(True)
    out = df.ops.attention(q, k, v, residual=res)
    with torch.no_grad():
        torch.testing.assert_close(out, df.ops.attention(q, k, v, residual=res, backend="cpu"), atol=1e-6, rtol=1e-6)
    g = do.clone().requires_grad_(True)  # a gradient that itself needs one: a double backward
    (gq,) = torch.autograd.grad(out, q, g, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gq.sum().backward()


@needs_cpu
def test_bad_input_under_autograd():
    """Bad input raises before any kernel runs, also when autograd records: the cpu kernels take no float64."""
    q, k, v, _, _ = _inputs(1, 1, 4, 4, 2, 2, seed=0, residual=False)
    q64 = q.double().requires_grad_(True)
    with pytest.raises(TypeError, match="q: expected dtype"):
        df.ops.attention(q64, k.double(), v.double(), backend="cpu")
    with pytest.raises(ValueError, match="k: head dim"):
        df.ops.attention(q.requires_grad_(True), k[..., :1], v)


@needs_cpu
def test_traces_under_torch_compile():
    """torch.compile(fullgraph=True) traces the forward and backward through the custom ops (attention_train,
    attention_backward, with their fake registrations): the same gradients as eager, bit for bit (aot_eager runs
    the same kernels; the reference's would differ in rounding)."""
    q, k, v, res, do = _inputs(2, 3, 20, 24, 8, 5, seed=12, residual=True)

    def fn(q, k, v, residual):
        return df.ops.attention(q, k, v, residual=residual)

    _, eager = _grads(fn, (q, k, v, res), do, torch.float32)
    torch._dynamo.reset()
    _, compiled = _grads(torch.compile(fn, backend="aot_eager", fullgraph=True), (q, k, v, res), do, torch.float32)
    _, exact = _grads(ref.attention, (q, k, v, res), do, torch.float64)
    for name, c, e, x in zip(NAMES, compiled, eager, exact):
        print(f"d{name} compiled: max err {(c.double() - x).abs().max().item():.3g}")
        assert torch.equal(c, e), f"d{name}: compiled gradient differs from eager"
