"""group_norm_silu's backward on the cpu kernels (csrc/cpu/group_norm_backward.cpp) against the reference's autograd
in float64: d(x), d(weight), d(bias), d(add), NCHW and NHWC, odd shapes, with and without SiLU and add."""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import needs_cpu

# (shape, groups): odd pixel counts and channel counts that leave vector tails, a 3-D input, batch 1, 32 groups
CASES = [((3, 12, 5, 7), 3), ((2, 64, 8, 8), 32), ((2, 6, 33), 2), ((1, 40, 3, 3), 8), ((2, 18, 1, 1), 6)]


def _grads(x, w, b, a, g, groups, silu, fn, dtype):
    leaves = [t.to(dtype).clone().requires_grad_(True) if t is not None else None for t in (x, w, b, a)]
    if leaves[0].dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = fn(leaves[0], groups, leaves[1], leaves[2], silu=silu, add=leaves[3])
    y.backward(g.to(dtype))
    return y, [t.grad if t is not None else None for t in leaves]


@needs_cpu
@pytest.mark.parametrize("shape, groups", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu, with_add, affine", [(True, True, True), (False, True, True), (True, False, False)])
def test_backward_matches_float64_reference(shape, groups, channels_last, silu, with_add, affine):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    gen = torch.Generator().manual_seed(hash((shape, channels_last, silu, with_add)) % 2**31)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = torch.randn(C, generator=gen) if affine else None
    b = torch.randn(C, generator=gen) if affine else None
    a = torch.randn(shape[0], C, generator=gen) if with_add else None
    g = torch.randn(shape, generator=gen)
    with df.ops.trace() as calls:
        y, ours = _grads(x, w, b, a, g, groups, silu, df.ops.group_norm_silu, torch.float32)
    assert [str(c) for c in calls] == ["group_norm_silu cpu/native", "group_norm_silu_backward cpu/native"]
    _, exact = _grads(x, w, b, a, g, groups, silu, ref.group_norm_silu, torch.float64)
    _, torch32 = _grads(x, w, b, a, g, groups, silu, ref.group_norm_silu, torch.float32)
    for name, o, e, t in zip(("x", "weight", "bias", "add"), ours, exact, torch32):
        if e is None:
            assert o is None
            continue
        err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        # no worse than PyTorch's own fp32 backward (4x: the sums run in another order), or fp32 rounding of the
        # gradient's scale
        bound = max(4 * torch_err, 1e-5 * (1 + e.abs().max().item()))
        print(f"d/d{name} {shape} cl={channels_last} silu={silu}: max err {err:.3g}, torch fp32 {torch_err:.3g}")
        assert o.shape == e.shape and o.dtype == torch.float32
        assert err <= bound, f"d/d{name}: {err:.3g} > {bound:.3g}"


@needs_cpu
def test_forward_unchanged_and_double_backward_refused():
    """The forward under autograd is the same kernel's result as without it; double backward is not supported
    and says so."""
    x = torch.randn(2, 8, 3, 5, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    y = df.ops.group_norm_silu(x, 4, w, None)
    with torch.no_grad():
        assert torch.equal(y, df.ops.group_norm_silu(x, 4, w, None, backend="cpu"))
    g = torch.randn(y.shape, requires_grad=True)  # a gradient that itself needs one: a double backward
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@needs_cpu
def test_non_fp32_and_out_take_the_reference():
    """bf16 under autograd has no cpu backward yet: the reference runs (and its gradient flows)."""
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    with df.ops.trace() as calls:
        df.ops.group_norm_silu(x, 4, None, None).float().sum().backward()
    assert [c.backend for c in calls] == ["torch"] and x.grad is not None


@needs_cpu
def test_nonfinite_gradient_propagates_as_nan():
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    g = torch.zeros(1, 4, 3, 3)
    g[0, 1, 1, 1] = float("nan")
    df.ops.group_norm_silu(x, 2, None, None).backward(g)
    assert torch.isnan(x.grad[0, :2]).all() and torch.isfinite(x.grad[0, 2:]).all()
