"""conv2d and linear (the U-Net's products behind ops): each backend against float64 truth, the kernel each call
took (ops.trace), prepared weights rebuilt when a weight changes, the reference in training."""

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from tests.helpers import HAS_CPU, needs_cpu

FP32_ATOL, FP32_RTOL = 2e-5, 1e-5  # DESIGN.md's fp32 tolerance for reductions, against float64


def _close(name, got, exact, torch_fp32):
    err = (got.double() - exact).abs().max().item()
    torch_err = (torch_fp32.double() - exact).abs().max().item()
    print(f"{name}: max err {err:.3g} vs float64 (torch fp32 {torch_err:.3g})")
    assert got.shape == exact.shape
    assert err <= FP32_ATOL + FP32_RTOL * exact.abs().max().item()


CONVS = [  # (N, C, K, H, W, kernel, stride, padding): the U-Net's kinds and odd ones
    (2, 16, 32, 8, 8, 3, 1, 1),  # Winograd
    (1, 32, 16, 7, 5, 3, 1, 1),  # Winograd, odd sizes
    (2, 16, 24, 23, 21, 3, 1, 1),  # Winograd F(4x4, 3x3) (72 tiles), partial tiles at both edges
    (2, 3, 16, 8, 8, 3, 1, 1),  # 3 channels in: oneDNN
    (2, 16, 3, 6, 6, 3, 1, 1),  # 3 channels out: oneDNN
    (2, 16, 32, 8, 8, 1, 1, 0),  # 1x1 shortcut
    (2, 16, 16, 9, 9, 3, 2, 0),  # strided downsampling
    (1, 8, 8, 5, 7, 3, 1, 2),  # more padding than Winograd takes
]


@needs_cpu
@pytest.mark.parametrize("N, C, K, H, W, k, stride, padding", CONVS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv2d_cpu_matches_float64(N, C, K, H, W, k, stride, padding, layout, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, C, k, k, generator=g) / (k * C**0.5)
    b = torch.randn(K, generator=g)
    y_ref = F.conv2d(x, w, b, stride, padding)
    r = torch.randn(y_ref.shape, generator=g) if with_residual else None
    prepared = df.ops.Prepared()
    with df.ops.trace() as calls:
        got = df.ops.conv2d(x, w, b, r, stride=stride, padding=padding, prepared=prepared)
        again = df.ops.conv2d(x, w, b, r, stride=stride, padding=padding, prepared=prepared)  # prepared weight
    from ddpm_fast.ops import _cpu

    winograd = k == 3 and stride == 1 and padding == 1 and min(C, K) >= 16
    kernel = ("winograd" if _cpu.winograd_tile(N, H, W) == 2 else "winograd4x4") if winograd else "onednn"
    assert [(c.backend, c.kernel) for c in calls] == [("cpu", kernel)] * 2
    exact = F.conv2d(x.double(), w.double(), b.double(), stride, padding)
    if r is not None:
        exact, y_ref = exact + r.double(), y_ref + r
    _close(f"conv2d {(N, C, K, H, W)} k{k} s{stride} p{padding} {layout}", got, exact, y_ref)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


@needs_cpu
def test_conv2d_prepared_weight_follows_the_weight():
    x = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    for k, p in ((3, 1), (1, 0)):  # Winograd transform, oneDNN reorder
        w = torch.randn(16, 16, k, k)
        prepared = df.ops.Prepared()
        df.ops.conv2d(x, w, padding=p, prepared=prepared)
        w.mul_(2)  # in place: the version counter moves, the transform is rebuilt
        got = df.ops.conv2d(x, w, padding=p, prepared=prepared)
        torch.testing.assert_close(got, F.conv2d(x, w, padding=p), atol=1e-4, rtol=1e-4)  # stale: 2x off


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_conv2d_other_dtypes_run_the_reference(dtype):
    x, w = torch.randn(2, 16, 5, 5, dtype=dtype), torch.randn(16, 16, 3, 3, dtype=dtype)
    with df.ops.trace() as calls:
        got = df.ops.conv2d(x, w, padding=1)
    assert [c.backend for c in calls] == ["torch"]
    torch.testing.assert_close(got, F.conv2d(x, w, padding=1))


def test_conv2d_training_runs_the_cpu_kernels_or_the_reference():
    """fp32 under autograd: the cpu kernels forward and backward (ops._Conv2d) where the extension is built, the
    reference otherwise; the weight's gradient equals F.conv2d's either way."""
    x = torch.randn(2, 16, 5, 5)
    wg = torch.randn(16, 16, 3, 3, requires_grad=True)
    with df.ops.trace() as calls:
        df.ops.conv2d(x, wg, padding=1).sum().backward()
    want = "cpu" if HAS_CPU else "torch"
    assert {c.backend for c in calls} == {want} and wg.grad is not None
    if HAS_CPU:
        assert [c.op for c in calls] == ["conv2d", "conv2d_backward"]
    w2 = wg.detach().clone().requires_grad_(True)
    F.conv2d(x, w2, padding=1).sum().backward()
    err = (wg.grad - w2.grad).abs().max().item()
    print(f"conv2d weight gradient ({want}) vs F.conv2d's: max err {err:.3g}")
    torch.testing.assert_close(wg.grad, w2.grad, atol=1e-4, rtol=1e-4)


@needs_cpu
def test_conv2d_named_cpu_backend_refuses_what_it_cannot_run():
    with pytest.raises(TypeError, match="^x: the cpu conv2d kernel takes float32 or bfloat16"):
        df.ops.conv2d(torch.randn(1, 4, 5, 5, dtype=torch.float16), torch.randn(4, 4, 3, 3).half(), backend="cpu")
    with pytest.raises(TypeError, match="^padding: "):
        df.ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), padding="same", backend="cpu")
    torch.testing.assert_close(  # auto: the reference takes padding="same"
        df.ops.conv2d(torch.randn(1, 4, 5, 5), torch.ones(4, 4, 3, 3), padding="same").shape, (1, 4, 5, 5)
    )


LINEARS = [(7, 16, 24), (1, 3, 5), (64, 256, 768)]  # (rows, in, out)


@pytest.fixture(params=["onednn", "blas"])
def library(request, monkeypatch):
    """The GEMM library the cpu linear runs in: oneDNN (skipped where the extension has it off) or the BLAS."""
    if request.param == "blas":
        monkeypatch.setattr(df.ops._cpu, "_linear_onednn", lambda: False)
    elif not df.ops._cpu._linear_onednn():
        pytest.skip("the extension runs its GEMMs in the BLAS here (DDPM_FAST_GEMM=blas or no oneDNN)")
    return request.param


def _linear_tensors(seed, rows, n_in, n_out, bias, residual):
    """x (2, rows, in), w, b, residual and an output gradient, unit-scale outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    b = torch.randn(n_out, generator=g) if bias else None
    r = torch.randn(2, rows, n_out, generator=g) if residual else None
    return x, w, b, r, torch.randn(2, rows, n_out, generator=g)


@needs_cpu
@pytest.mark.parametrize("rows, n_in, n_out", LINEARS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_linear_cpu_matches_float64(rows, n_in, n_out, with_residual, library):
    x, w, b, r, _ = _linear_tensors(1, rows, n_in, n_out, True, with_residual)
    scratch = df.ops.Scratch()
    with torch.inference_mode(), df.ops.trace() as calls:
        got = df.ops.linear(x, w, b, r, scratch=scratch.slot("y"))
    assert [(c.backend, c.kernel) for c in calls] == [("cpu", library)]
    exact = F.linear(x.double(), w.double(), b.double()) + (0 if r is None else r.double())
    _close(f"linear {(rows, n_in, n_out)} {library}", got, exact, F.linear(x, w, b) + (0 if r is None else r))


@needs_cpu
def test_linear_out_and_training():
    """out= without autograd; under autograd (fp32) the cpu GEMMs forward and backward (ops._Linear) where the
    extension is built, the reference otherwise, and fp64 on the reference."""
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    out = torch.empty(5, 6)
    assert df.ops.linear(x, w, b, out=out) is out
    torch.testing.assert_close(out, F.linear(x, w, b))
    wg = w.clone().requires_grad_()
    with df.ops.trace() as calls:
        df.ops.linear(x, wg, b).sum().backward()
    assert [(c.op, c.backend) for c in calls] == (
        [("linear", "cpu"), ("linear_backward", "cpu")] if HAS_CPU else [("linear", "torch")]
    )
    torch.testing.assert_close(wg.grad, torch.ones(5, 6).t() @ x)
    wd = w.double().requires_grad_()
    with df.ops.trace() as calls:
        df.ops.linear(x.double(), wd).sum().backward()
    assert [c.backend for c in calls] == ["torch"]


@needs_cpu
@pytest.mark.parametrize("rows, n_in, n_out", LINEARS)
@pytest.mark.parametrize("bias, residual", [(True, True), (False, False), (True, False)])
def test_linear_gradients_match_float64(rows, n_in, n_out, bias, residual, library):
    """dx, dW, db and d(residual) of the cpu linear under autograd against float64 autograd of F.linear, x with two
    leading dims; x's gradient alone and the weight's alone; no double backward."""
    x, w, b, r, dy = _linear_tensors(2, rows, n_in, n_out, bias, residual)

    def grads(dtype, fused):
        leaves = [None if t is None else t.detach().to(dtype, copy=True).requires_grad_(True) for t in (x, w, b, r)]
        xl, wl, bl, rl = leaves
        y = df.ops.linear(xl, wl, bl, rl) if fused else F.linear(xl, wl, bl) + (0 if rl is None else rl)
        y.backward(dy.to(dtype))
        return y, [None if t is None else t.grad for t in leaves]

    with df.ops.trace() as calls:
        y, ours = grads(torch.float32, True)
    kernel = "onednn+blas" if library == "onednn" else "blas"
    assert [str(c) for c in calls] == [f"linear cpu/{library}", f"linear_backward cpu/{kernel}"], calls.summary()
    y64, exact = grads(torch.float64, False)
    case = f"{(rows, n_in, n_out)} {library} bias={bias} residual={residual}"
    _close(f"linear y {case}", y, y64, y)
    for name, o, e in zip(("x", "weight", "bias", "residual"), ours, exact):
        assert (o is None) == (e is None), name
        if o is not None:  # dW and db sum over the 2 * rows rows: the bound is relative to their largest element
            assert o.dtype == torch.float32
            _close(f"linear d{name} {case}", o, e, o)
    for i in (0, 1):  # one input needing a gradient at a time
        leaves = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, w))]
        df.ops.linear(*leaves).backward(dy)
        want = (dy.reshape(-1, n_out) @ w).view(x.shape) if i == 0 else dy.reshape(-1, n_out).t() @ x.reshape(-1, n_in)
        torch.testing.assert_close(leaves[i].grad, want, rtol=1e-4, atol=1e-4)
        assert leaves[1 - i].grad is None
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(df.ops.linear(xg, w), xg, dy.clone().requires_grad_(True), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_conv2d_in_place_on_its_input_and_scratch_names():
    """out=x (and residual=x) for a convolution with as many outputs as inputs: the result is right, not read from
    half-written output; a Scratch slot's name must be a str."""
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64).float()
    w, b = torch.randn(8, 8, 3, 3), torch.randn(8)
    want = F.conv2d(x, w, b, padding=1)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.clone().contiguous(memory_format=layout)
        assert df.ops.conv2d(y, w, b, padding=1, out=y).data_ptr() == y.data_ptr()
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        y = x.clone().contiguous(memory_format=layout)
        torch.testing.assert_close(df.ops.conv2d(y, w, b, residual=y, padding=1, out=y), want + x, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="name"):
        df.ops.Scratch().slot(3)
