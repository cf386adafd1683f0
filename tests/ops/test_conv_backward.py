"""conv2d under autograd on the cpu kernels (ops._Conv2d): the forward on Winograd or oneDNN, the data gradient of a
3x3 stride-1 pad-1 layer as the forward Winograd convolution of dy with w_rot[c, k, i, j] = w[k, c, 2 - i, 2 - j],
the weight and bias gradients (and every gradient of the other layers but 1x1 ones, which are GEMMs) by ATen's
convolution_backward; d(residual) = dy. Against float64 autograd of F.conv2d on odd shapes, finite differences, NaN, double backward, a weight that
changes between steps."""

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from ddpm_fast.ops import _cpu
from tests.helpers import assert_fp32_close, needs_cpu

# (N, C, K, H, W, kernel, stride, padding, the forward kernel, the backward kernel): odd H/W, C and K above the
# Winograd minimum and not multiples of 16, batch 1 and 3; then a 1x1 shortcut, a strided downsampling and a
# 3-channel end through oneDNN and ATen's backward (the 1x1's backward as GEMMs)
CASES = [
    (1, 17, 35, 5, 11, 3, 1, 1, "winograd", "winograd+aten"),
    (3, 19, 21, 7, 9, 3, 1, 1, "winograd", "winograd+aten"),
    (3, 33, 18, 13, 15, 3, 1, 1, "winograd4x4", "winograd+aten"),  # 48 tiles: F(4x4) at one or two threads
    (3, 19, 21, 7, 9, 1, 1, 0, "onednn", "gemm"),
    (1, 21, 19, 1, 1, 1, 1, 0, "onednn", "gemm"),  # one pixel: channels_last and contiguous are the same strides
    (3, 19, 21, 9, 7, 3, 2, 1, "onednn", "aten"),
    (1, 3, 20, 9, 9, 3, 1, 1, "onednn", "aten"),
]


def _tensors(N, C, K, H, W, k, stride, padding, seed, bias, residual, layout):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, C, k, k, generator=g) / (k * C**0.5)  # unit-scale outputs, as an initialised layer has
    b = torch.randn(K, generator=g) if bias else None
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    r = torch.randn(N, K, Ho, Wo, generator=g) if residual else None
    dy = torch.randn(N, K, Ho, Wo, generator=g)
    return (x, w, b, r), dy


def _grads(tensors, dy, dtype, stride, padding, fused):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]
    x, w, b, r = leaves
    if fused:
        y = df.ops.conv2d(x, w, b, r, stride=stride, padding=padding)
    else:
        y = F.conv2d(x, w, b, stride=stride, padding=padding) + (0 if r is None else r)
    y.backward(dy.to(dtype))
    return y, [None if t is None else t.grad for t in leaves]


def _close(name, got, exact):
    # DESIGN.md's fp32 bound (atol 2e-5 as for the reduction ops), the atol taken relative to the tensor's largest
    # element: dw and db are sums over N*H*W products, dx over K*9
    scale = max(1.0, exact.abs().max().item())
    assert_fp32_close(name, got, exact, atol=2e-5 * scale)


@needs_cpu
@pytest.mark.parametrize("N, C, K, H, W, k, stride, padding, forward, backward", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias, residual", [(True, True), (False, False), (True, False)])
def test_gradients_match_float64(N, C, K, H, W, k, stride, padding, forward, backward, layout, bias, residual):
    tensors, dy = _tensors(N, C, K, H, W, k, stride, padding, 3, bias, residual, layout)
    tile_threads = 1 if forward == "winograd4x4" else torch.get_num_threads()
    prev = torch.get_num_threads()
    torch.set_num_threads(tile_threads)
    try:
        with df.ops.trace() as calls:
            y, ours = _grads(tensors, dy, torch.float32, stride, padding, fused=True)
    finally:
        torch.set_num_threads(prev)
    assert {str(c) for c in calls} == {f"conv2d cpu/{forward}", f"conv2d_backward cpu/{backward}"}, calls.summary()
    y64, exact = _grads(tensors, dy, torch.float64, stride, padding, fused=False)
    case = f"{(N, C, K, H, W, k, stride, padding)} {layout} bias={bias} residual={residual}"
    _close(f"y {case}", y, y64)
    for name, o, e in zip(("x", "weight", "bias", "residual"), ours, exact):
        assert (o is None) == (e is None), name
        if o is not None:
            assert o.dtype == torch.float32 and o.shape == e.shape
            _close(f"d{name} {case}", o, e)


# G of F(2x2, 3x3) and F(4x4, 3x3) (csrc/cpu/winograd.cpp): U = G g G^T
_G = {
    2: [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    4: [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, -1 / 3], [-16 / 15, -8 / 15, -4 / 15], [1 / 15, -2 / 15, 4 / 15],
        [0, 0, 1]],
}  # fmt: skip


@needs_cpu
@pytest.mark.parametrize("K, C", [(37, 21), (16, 16), (5, 40)])
def test_weight_transform_and_its_rotated_mode_match_float64(K, C):
    """winograd_weight(w, tile) is G g G^T of every filter in the (T, C, K) layout the kernel reads, and its rotated
    mode the same of w_rot = w.transpose(0, 1).flip(2, 3) in (T, K, C) (the data gradient's weight, no copy of w),
    against float64; channel counts off the kernel's 16 lanes."""
    w = torch.randn(K, C, 3, 3, generator=torch.Generator().manual_seed(5))
    w_rot = w.transpose(0, 1).flip(2, 3)
    for tile, G in _G.items():
        G = torch.tensor(G, dtype=torch.float64)
        T = (tile + 2) ** 2
        for rotated, g in ((False, w), (True, w_rot)):
            exact = torch.einsum("ia,kcab,jb->ijck", G, g.double(), G).reshape(T, g.shape[1], g.shape[0])
            got = _cpu.winograd_weight(w, tile, rotated=rotated)
            err = (got.double() - exact).abs().max().item() / exact.abs().max().item()
            print(f"tile {tile} rotated={rotated} {tuple(got.shape)}: max err / max |U| {err:.3g}")
            assert got.shape == exact.shape and err <= 1e-6


@needs_cpu
@pytest.mark.parametrize("k, stride, padding", [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_finite_differences(k, stride, padding):
    """The directional derivative of L = sum(y * dy) along random directions of x, w, b, residual equals
    <grad, direction> (L is linear in each argument: central differences are exact up to rounding)."""
    tensors, dy = _tensors(2, 16, 18, 6, 5, k, stride, padding, 11, True, True, "contiguous")
    _, grads = _grads(tensors, dy, torch.float32, stride, padding, fused=True)
    g = torch.Generator().manual_seed(12)
    for i, name in enumerate(("x", "weight", "bias", "residual")):
        direction = torch.randn(tensors[i].shape, generator=g)
        h = 1e-2

        def loss(s, i=i, direction=direction):
            args = list(tensors)
            args[i] = tensors[i] + s * direction
            with torch.no_grad():
                return (df.ops.conv2d(*args, stride=stride, padding=padding).double() * dy).sum().item()

        numeric = (loss(h) - loss(-h)) / (2 * h)
        analytic = (grads[i].double() * direction).sum().item()
        print(f"d{name} k={k} stride={stride}: analytic {analytic:.6g}, numeric {numeric:.6g}")
        assert abs(analytic - numeric) <= 2e-3 * (1 + abs(numeric))


@needs_cpu
@pytest.mark.parametrize("k, stride, padding", [(3, 1, 1), (1, 1, 0)])
def test_nan_in_dy_propagates(k, stride, padding):
    tensors, dy = _tensors(2, 20, 24, 9, 9, k, stride, padding, 4, True, False, "channels_last")
    dy[1, 5, 4, 4] = float("nan")
    _, (dx, dw, db, _) = _grads(tensors, dy, torch.float32, stride, padding, fused=True)
    print(f"NaN at dy[1, 5, 4, 4], k={k}: NaN in dx {dx.isnan().sum().item()}, dw {dw.isnan().sum().item()}")
    assert dx[1, :, 4, 4].isnan().all() and dx[0].isfinite().all()  # sample 0 never saw the NaN
    assert dw[5].isnan().all() and db[5].isnan() and db[torch.arange(24) != 5].isfinite().all()


@needs_cpu
def test_double_backward_refused():
    tensors, dy = _tensors(1, 16, 16, 4, 4, 3, 1, 1, 2, True, False, "contiguous")
    x, w = tensors[0].requires_grad_(True), tensors[1].requires_grad_(True)
    y = df.ops.conv2d(x, w, tensors[2], padding=1)
    (gx,) = torch.autograd.grad(y, x, dy.requires_grad_(True), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@needs_cpu
def test_gradients_follow_a_weight_changed_in_place():
    """With a Prepared (as the U-Net's layers keep one), an optimizer-style in-place change of the weight between
    steps rebuilds both transforms (forward and rotated): the second step's gradients are the new weight's."""
    tensors, dy = _tensors(2, 24, 20, 8, 7, 3, 1, 1, 6, True, False, "contiguous")
    x = tensors[0].requires_grad_(True)
    w = tensors[1].clone().requires_grad_(True)
    prepared = df.ops.Prepared()
    for step in range(2):
        x.grad = w.grad = None
        df.ops.conv2d(x, w, tensors[2], padding=1, prepared=prepared).backward(dy)
        x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        F.conv2d(x64, w64, tensors[2].double(), padding=1).backward(dy.double())
        _close(f"dx step {step}", x.grad, x64.grad)
        _close(f"dweight step {step}", w.grad, w64.grad)
        with torch.no_grad():
            w.mul_(-0.5).add_(0.01)


@needs_cpu
def test_which_calls_take_the_fused_backward():
    """fp32 with autograd: _Conv2d. bf16, backend='torch', string padding, or no gradient needed: as before."""
    x = torch.randn(1, 16, 6, 6, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)
    with df.ops.trace() as calls:
        df.ops.conv2d(x, w, padding=1).sum().backward()
        df.ops.conv2d(x, w, padding=1, backend="torch").sum().backward()
        df.ops.conv2d(x, w, padding="same").sum().backward()
        df.ops.conv2d(x.bfloat16(), w.bfloat16(), padding=1).float().sum().backward()
        with torch.no_grad():
            df.ops.conv2d(x, w, padding=1)
    served = [str(c) for c in calls]
    print(served)
    assert served[:2] == ["conv2d cpu/winograd", "conv2d_backward cpu/winograd+aten"]
    assert all(s.startswith("conv2d torch/") for s in served[2:5]) and served[5].startswith("conv2d cpu/")
    assert "conv2d_backward" not in " ".join(served[2:])
