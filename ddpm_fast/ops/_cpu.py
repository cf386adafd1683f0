"""The cpu backend: ddpm_fast's C++ kernels (csrc/cpu, ``torch.ops.ddpm_fast.*``), and for the U-Net's other
products oneDNN (JIT-compiled for the widest ISA on any vendor's CPU) or the BLAS torch links.

The kernels' glue reads t, the schedule and any coefficient table on the host and computes each sample's
coefficients with csrc/common/coefficients.h. The Winograd convolution's products run in oneDNN's brgemm or the
BLAS (``DDPM_FAST_GEMM``, see ddpm_fast/_ext.py); the linear layers follow the same choice: oneDNN's linear where
the Winograd products run in oneDNN (MKL takes its AVX2 path on AMD CPUs: at the attention block's projection,
2048 x 256 -> 768 on a 2-core AMD EPYC with AVX-512, oneDNN's linear ran 2.1x MKL's addmm, its freshly allocated
result included), else the BLAS into a reused buffer.
"""

from __future__ import annotations

import math

import torch

from .. import _ext
from ._layout import dense, finish, memory_format, result_buffer, rows, signed64
from ._trace import record

NAME = "cpu"
OPS = frozenset(
    {
        "q_sample",
        "ddpm_step",
        "dpmpp_step",
        "keyed_normal",
        "group_norm_silu",
        "attention",
        "conv3x3",
        "conv2d",
        "linear",
    }
)
_PREDICTION_CODE = {"epsilon": 0, "sample": 1, "v_prediction": 2}
_VARIANCE_CODE = {"fixed_small": 0, "fixed_large": 1}
# below this many channels a side, Winograd's transforms cost more than the products they save
WINOGRAD_MIN_CHANNELS = 16


def unavailable() -> str | None:
    return _ext.cpu_unavailable_reason()


def describe() -> str:
    isa = bf16_products()
    bf16 = f"bf16 GEMMs: {isa}" if isa else "no bf16 instructions: bf16 runs the fp32 kernels"
    return f"available ({_ext.cpu_capability()} build, {_ext.gemm_library()} GEMMs; {bf16})"


def bf16_products() -> str | None:
    """The bf16 instructions ('amx_bf16', 'avx512_bf16') bf16 convolutions and linears run on, with fp32
    accumulation (the Winograd products in oneDNN's brgemm, the others in oneDNN's bf16 primitives); None: the CPU
    has neither (or the GEMMs run in the BLAS, or oneDNN is off), and bf16 tensors are converted to fp32 for the
    fp32 kernels and back."""
    if _ext.gemm_library() != "onednn" or not _mkldnn() or not hasattr(torch.ops.ddpm_fast, "conv3x3_bf16"):
        return None
    return _ext.bf16_instructions()


def bf16_conv3x3() -> str:
    """Which kernel runs a bf16 3x3 stride-1 convolution in ``conv2d``: 'onednn' (a direct convolution) where the
    CPU has AMX-BF16, 'winograd_bf16' where it has AVX512-BF16 only, 'winograd_fp32' (the fp32 kernel on converted
    tensors) where it has neither. With AMX the products are so cheap that Winograd's fp32 transforms dominate: on a
    2-core Xeon with AMX, one thread, the CIFAR-10 U-Net's 3x3 convolutions took 3.8 ms in oneDNN's direct bf16
    convolution against 5.8 ms in Winograd at batch 1 (25 against 35 ms at batch 8), with the smaller error
    (the direct sum rounds only the result)."""
    isa = bf16_products()
    return "onednn" if isa == "amx_bf16" else "winograd_bf16" if isa else "winograd_fp32"


def bf16_attention() -> str:
    """Which kernel runs a bf16 ``attention``: 'sdpa' (ATen's CPU flash attention, whose bf16 products run in
    oneDNN's brgemm on AMX, softmax and accumulation in fp32) where the CPU has AMX-BF16, else 'native' (this
    package's kernel on fp32 copies of q, k, v and the residual). On a 2-core Xeon with AMX, one thread, the U-Net's
    attention at batch 8 (8 x 256 positions x 256 channels) took 2.6 ms in ATen's against 8.9 ms natively (its four
    conversions not counted), with the same error: both round the output to bf16."""
    return "sdpa" if bf16_products() == "amx_bf16" else "native"


def _mkldnn() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def refuses(op: str, dtype=None, padding=None, **facts) -> str | None:
    """The calls the cpu kernels do not take (auto then runs the reference; by name, a TypeError)."""
    if op == "dpmpp_step" and (
        not hasattr(torch.ops.ddpm_fast, "dpmpp_step")
        or len(torch.ops.ddpm_fast.dpmpp_step.default._schema.arguments) < 14
    ):
        return "the cpu extension was built before dpmpp_step's third order and noise existed; rebuild it (pip install -e .)"
    if op in ("conv3x3", "conv2d", "linear") and dtype is not None and dtype not in (torch.float32, torch.bfloat16):
        return f"x: the cpu {op} kernel takes float32 or bfloat16, got {dtype}"
    if op == "conv2d":
        if isinstance(padding, str):
            return f"padding: the cpu conv2d kernels take explicit padding, got {padding!r}"
        if not _mkldnn():
            return "x: the cpu conv2d kernels need oneDNN (torch.backends.mkldnn), which is unavailable or disabled"
    return None


def check_device(device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")


def timestep_device(t, device: torch.device):
    return "cpu"  # the kernels' glue reads t on the host


def _linear_onednn() -> bool:
    return _ext.gemm_library() == "onednn" and _mkldnn()


# ----------------------------------------------------------------------------------------------- DDPM ops
def q_sample(x0, t, noise, s, seed, sample_offset, coefficients, out, _name=NAME):
    record("q_sample", _name, "native")
    drawn = noise is None
    fmt = memory_format(x0)
    x0d = dense(x0, fmt)
    eps = torch.empty_like(x0d, memory_format=fmt) if drawn else dense(noise, fmt)
    x_t = result_buffer(out, x0d, fmt)
    alphas_cumprod = s.table("alphas_cumprod", torch.float64, "cpu")
    torch.ops.ddpm_fast.q_sample(x0d, t, alphas_cumprod, coefficients, eps, drawn, signed64(seed), sample_offset, x_t)
    x_t = finish(x_t, out)
    return (x_t, eps) if drawn else x_t


def ddpm_step(
    x_t,
    model_output,
    noise,
    t,
    t_prev,
    s,
    *,
    seed,
    sample_offset,
    variance_type,
    prediction_type,
    clip_sample,
    clip_range,
    coefficients,
    out,
    x0_out,
    _name=NAME,
):
    record("ddpm_step", _name, "native")
    fmt = memory_format(x_t)
    xd = dense(x_t, fmt)
    result = result_buffer(out, xd, fmt)
    x0_result = None if x0_out is None else result_buffer(x0_out, xd, fmt)
    torch.ops.ddpm_fast.ddpm_step(
        xd,
        dense(model_output, fmt),
        t,
        t_prev,
        s.table("alphas_cumprod", torch.float64, "cpu"),
        coefficients,
        None if noise is None else dense(noise, fmt),
        signed64(seed),
        sample_offset,
        _PREDICTION_CODE[prediction_type],
        _VARIANCE_CODE[variance_type],
        clip_sample,
        clip_range,
        result,
        x0_result,
    )
    if x0_out is not None:
        finish(x0_result, x0_out)
    return finish(result, out)


def dpmpp_step(
    x_t,
    model_output,
    history,
    coefficients,
    out,
    x0_out,
    *,
    last_sample=None,
    sample_out=None,
    noise=None,
    t=None,
    seed=0,
    sample_offset=0,
    _name=NAME,
):
    record("dpmpp_step", _name, "native")
    fmt = memory_format(x_t)
    xd = dense(x_t, fmt)
    result = result_buffer(out, xd, fmt)
    x0 = result_buffer(x0_out, xd, fmt)
    hist = [dense(h, fmt) for h in history] + [None] * (3 - len(history))
    y = None if sample_out is None and last_sample is None else result_buffer(sample_out, xd, fmt)
    torch.ops.ddpm_fast.dpmpp_step(
        xd,
        dense(model_output, fmt),
        hist[0],
        coefficients,
        result,
        x0,
        hist[1],
        hist[2],
        None if last_sample is None else dense(last_sample, fmt),
        y,
        None if noise is None else dense(noise, fmt),
        t,
        signed64(seed),
        sample_offset,
    )
    if y is not None:
        return finish(result, out), finish(x0, x0_out), finish(y, sample_out)
    return finish(result, out), finish(x0, x0_out)


def keyed_normal(shape, t, seed, stream, sample_offset, dtype, device, memory_format_, out, _name=NAME):
    record("keyed_normal", _name, "native")
    if out is not None:
        result = result_buffer(out, out, memory_format(out))
    else:
        result = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format_)
    torch.ops.ddpm_fast.keyed_normal(t, signed64(seed), sample_offset, int(stream), result)
    return finish(result, out)


# ----------------------------------------------------------------------------------------------- U-Net ops
def group_norm_silu(x, num_groups, weight, bias, eps, silu, add, out, _name=NAME):
    record("group_norm_silu", _name, "native")
    fmt = memory_format(x)
    xd = dense(x, fmt)
    result = result_buffer(out, xd, fmt)
    torch.ops.ddpm_fast.group_norm_silu(xd, num_groups, weight, bias, add, float(eps), bool(silu), result)
    return finish(result, out)


def has_group_norm_backward(x, weight, bias, add) -> bool:
    """Whether group_norm_silu_backward serves a gradient of this call: fp32 tensors, an extension that has it."""
    tensors = [t for t in (x, weight, bias, add) if t is not None]
    return all(t.dtype == torch.float32 for t in tensors) and hasattr(torch.ops.ddpm_fast, "group_norm_silu_backward")


def group_norm_silu_train(x, num_groups, weight, bias, eps, silu, add):
    """The forward, keeping each group's mean and rstd of x + add ((B, G) fp32) for the backward: (out, the dense
    x the kernel read, mean, rstd)."""
    record("group_norm_silu", NAME, "native")
    fmt = memory_format(x)
    xd = dense(x, fmt)
    result = result_buffer(None, xd, fmt)
    mean = torch.empty(x.shape[0], num_groups, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    torch.ops.ddpm_fast.group_norm_silu_train(
        xd, num_groups, weight, bias, add, float(eps), bool(silu), result, mean, rstd
    )
    return result, xd, mean, rstd


def group_norm_silu_backward(xd, grad, num_groups, weight, bias, add, mean, rstd, silu):
    """dL/dx in xd's layout and the (B, C, 3) per-channel sums [x, dy, dy * xhat] (group_norm_backward.cpp)."""
    record("group_norm_silu_backward", NAME, "native")
    g = dense(grad.to(torch.float32), memory_format(xd))
    if memory_format(g) != memory_format(xd):  # a 4-D gradient with both layouts' strides (C or HW of 1)
        g = g.contiguous(memory_format=memory_format(xd))
    grad_x = torch.empty_like(xd)
    sums = torch.empty(xd.shape[0], xd.shape[1], 3, dtype=torch.float32)
    torch.ops.ddpm_fast.group_norm_silu_backward(
        xd, g, num_groups, weight, bias, add, mean, rstd, bool(silu), grad_x, sums
    )
    return grad_x, sums


def attention(q, k, v, scale, residual, out):
    """The CPU kernel reads fp32 rows (fp16/bf16 inputs are converted) and writes (B, N, H, Dv) memory, so that
    o.transpose(1, 2).reshape(B, N, H * Dv) is a free view. bf16 on AMX: ATen's flash attention
    (:func:`bf16_attention`), which writes the same memory order, then the residual added in place."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dtype == torch.bfloat16 and bf16_attention() == "sdpa":
        record("attention", NAME, "sdpa_bf16")
        result = torch.nn.functional.scaled_dot_product_attention(rows(q), rows(k), rows(v), scale=float(scale))
        if residual is not None:
            result.add_(residual)
        return finish(result, out)
    record("attention", NAME, "native")
    B, H, N, _ = q.shape
    Dv = v.shape[3]

    def fp32_rows(x):
        return rows(x if x.dtype == torch.float32 else x.float())

    if out is not None and out.dtype == torch.float32 and out.stride(-1) == 1:
        result = out
    else:
        result = torch.empty(B, N, H, Dv, dtype=torch.float32, device=q.device).transpose(1, 2)
    res = None if residual is None else fp32_rows(residual)
    torch.ops.ddpm_fast.attention(fp32_rows(q), fp32_rows(k), fp32_rows(v), float(scale), res, result)
    if result.dtype != q.dtype:
        result = result.to(q.dtype)
    return finish(result, out)


def has_attention_backward() -> bool:
    """Whether attention_backward serves a gradient of attention: an extension that has it (fp16/bf16 tensors run
    the fp32 kernels on converted copies)."""
    return hasattr(torch.ops.ddpm_fast, "attention_backward")


def _blas_rows(x):
    """x in fp32 with unit stride in its last dim and rows that do not overlap: the backward's products run in the
    BLAS, whose leading dimension is at least a row."""
    x = x if x.dtype == torch.float32 else x.float()
    if x.stride(-1) != 1 or (x.shape[2] > 1 and x.stride(2) < x.shape[3]):
        x = x.contiguous()
    return x


def attention_train(q, k, v, scale):
    """The forward without a residual, keeping each query's log-sum-exp ln sum_j exp(scale q_i k_j) for the
    backward: (o in (B, N, H, Dv) memory, lse (B, H, N), and the fp32 q, k, v the kernel read)."""
    record("attention", NAME, "native")
    qf, kf, vf = (_blas_rows(t) for t in (q, k, v))
    B, H, N, _ = q.shape
    o = torch.empty(B, N, H, v.shape[3], dtype=torch.float32, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    torch.ops.ddpm_fast.attention_train(qf, kf, vf, float(scale), None, o, lse)
    return o, lse, qf, kf, vf


def attention_backward(qf, kf, vf, o, lse, grad, scale):
    """dq, dk, dv (fp32, in (B, N, H, D) memory like the forward's output: the U-Net's head split is then undone by
    a view) from attention_train's results and dL/d(out) (attention_backward.cpp)."""
    record("attention_backward", NAME, "native")
    g = _blas_rows(grad)
    B, H, N, D = qf.shape
    M, Dv = kf.shape[2], vf.shape[3]
    dq = torch.empty(B, N, H, D, dtype=torch.float32, device=qf.device).transpose(1, 2)
    dk = torch.empty(B, M, H, D, dtype=torch.float32, device=qf.device).transpose(1, 2)
    dv = torch.empty(B, M, H, Dv, dtype=torch.float32, device=qf.device).transpose(1, 2)
    torch.ops.ddpm_fast.attention_backward(qf, kf, vf, o, g, lse, float(scale), dq, dk, dv)
    return dq, dk, dv


def winograd_weight(weight, tile=2, rotated=False):
    """U = G g G^T of every filter, ((tile + 2)^2, C, K); rotated: of :func:`_rotated`'s w_rot, ((tile + 2)^2, K, C)."""
    return torch.ops.ddpm_fast.winograd_weight(weight.detach(), tile, rotated)


def winograd_weight_bf16(weight):
    return torch.ops.ddpm_fast.winograd_weight_bf16(weight.detach())


def conv3x3(x, weight, bias, residual, packed, out):
    """Winograd F(2x2, 3x3) on fp32 or bf16 channels_last activations (other layouts copied to channels_last once).
    bf16 without bf16 instructions: the fp32 kernel on converted tensors (``packed`` is then not used)."""
    if x.dtype == torch.bfloat16:
        if bf16_products():
            record("conv3x3", NAME, "winograd_bf16")
            if packed is None:
                packed = winograd_weight_bf16(weight)
            return _winograd_conv_bf16(
                x, weight.shape[0], packed, None if bias is None else bias.float(), residual, out
            )
        record("conv3x3", NAME, "winograd_fp32")
        return _winograd_conv_fp32(x, winograd_weight(weight.float()), bias, residual, out)
    record("conv3x3", NAME, "winograd")
    return _winograd_conv(x, weight, bias, residual, packed, out)


def _winograd_conv_fp32(x, packed, bias, residual, out):
    """A bf16 convolution by the fp32 kernel: inputs converted, the result rounded to bf16 once."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    y = _winograd_conv(f(x), None, f(bias), f(residual), packed, None).to(x.dtype)
    return finish(y, out)


def _winograd_launch(x, K, residual, out, kernel):
    """``kernel(x, residual, result)`` on channels_last operands, writing (N, K, H, W): into ``out`` itself when it
    has that layout and is not x's memory, else into a buffer copied into out."""
    N, _, H, W = x.shape
    cl = torch.channels_last
    xd = x.contiguous(memory_format=cl)
    res = None if residual is None else residual.contiguous(memory_format=cl)
    same_storage = out is not None and out.untyped_storage().data_ptr() == xd.untyped_storage().data_ptr()
    if out is not None and out.is_contiguous(memory_format=cl) and not same_storage:
        result = out
    else:
        result = torch.empty(N, K, H, W, dtype=x.dtype, device=x.device, memory_format=cl)
    kernel(xd, res, result)
    return finish(result, out)


def _winograd_conv_bf16(x, K, packed, bias_f32, residual, out):
    return _winograd_launch(
        x, K, residual, out, lambda xd, res, result: torch.ops.ddpm_fast.conv3x3_bf16(xd, packed, bias_f32, res, result)
    )


def _winograd_conv(x, weight, bias, residual, packed, out):
    if packed is None:
        packed = winograd_weight(weight)
    b = None if bias is None else bias.contiguous()
    return _winograd_launch(
        x,
        packed.shape[2],
        residual,
        out,
        lambda xd, res, result: torch.ops.ddpm_fast.conv3x3(xd, packed, b, res, result),
    )


def winograd_tile(N: int, H: int, W: int) -> int:
    """The Winograd tile of an fp32 3x3 convolution in ``conv2d``: 4 (F(4x4, 3x3)) where every thread gets at least
    16 of its 4x4 tiles, else 2 (F(2x2, 3x3)). F(4x4) does 1.78x fewer multiply-adds in the products and reads
    fewer inputs an output, but its GEMMs have a quarter of the rows: on a 2-core Xeon, one thread, the U-Net's
    shapes ran 1.15-1.5x faster in F(4x4) from 16 tiles up (16x16 at batch 1, 8x8 at batch 8), 0.85x at 4 tiles
    (8x8 at batch 1) and 0.5x at one (4x4 at batch 1). Its fp32 error is about 8x F(2x2)'s (within the fp32
    tolerance: tests/ops/test_conv.py)."""
    tiles = N * (-(-H // 4)) * (-(-W // 4))
    return 4 if tiles >= 16 * max(1, torch.get_num_threads()) else 2


def _winograd(weight, stride, padding, dilation, groups) -> bool:
    K, Cin, kh, kw = weight.shape
    return (
        (kh, kw) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (1, 1)
        and tuple(dilation) == (1, 1)
        and groups == 1
        and min(Cin, K) >= WINOGRAD_MIN_CHANNELS
    )


def prepared_value(prepared, tensors, variant, build):
    return build() if prepared is None else prepared.get(tensors, variant, build)


def conv2d(x, weight, bias, residual, stride, padding, dilation, groups, prepared, out):
    """3x3 stride-1 convolutions with enough channels: Winograd (:func:`conv3x3`, 2.25x fewer multiply-adds than
    a direct convolution in F(2x2, 3x3), 4x in F(4x4, 3x3): :func:`winograd_tile`), except in bf16 on AMX
    (:func:`bf16_conv3x3`); the others (1x1 shortcuts, strided
    downsampling, the 3-channel ends): oneDNN with its weight reordered for the input's shape. ``prepared`` (an
    ops.Prepared) keeps the transformed weight."""
    cl = torch.channels_last
    xd = x.contiguous(memory_format=cl)
    res = None if residual is None else residual.contiguous(memory_format=cl)
    w = weight.detach()
    winograd = _winograd(weight, stride, padding, dilation, groups)
    bf16_kernel = bf16_conv3x3() if winograd and x.dtype == torch.bfloat16 else None
    if bf16_kernel is not None and bf16_kernel != "onednn":
        if bf16_kernel == "winograd_bf16":
            packed, b32 = prepared_value(
                prepared, (weight, bias), "winograd_bf16",
                lambda: (winograd_weight_bf16(w), None if bias is None else bias.detach().float()),
            )  # fmt: skip
            record("conv2d", NAME, "winograd_bf16")
            return _winograd_conv_bf16(xd, weight.shape[0], packed, b32, res, out)
        packed = prepared_value(prepared, (weight,), "winograd_fp32", lambda: winograd_weight(w.float()))
        record("conv2d", NAME, "winograd_fp32")
        return _winograd_conv_fp32(xd, packed, bias, res, out)
    if winograd and x.dtype == torch.float32:
        tile = winograd_tile(xd.shape[0], xd.shape[2], xd.shape[3])
        packed = prepared_value(prepared, (weight,), ("winograd", tile), lambda: winograd_weight(w, tile))
        record("conv2d", NAME, "winograd" if tile == 2 else "winograd4x4")
        return _winograd_conv(xd, weight, bias, res, packed, out)
    record("conv2d", NAME, "onednn")

    def reorder():
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.to_mkldnn(), list(padding), list(stride), list(dilation), groups, list(xd.shape)
        )

    packed = reorder() if prepared is None else prepared.get((weight,), ("onednn", tuple(xd.shape)), reorder)
    args = (packed, bias, list(padding), list(stride), list(dilation), groups)
    if res is None:
        y = torch.ops.mkldnn._convolution_pointwise(xd, *args, "none", [], "")
    else:
        y = torch.ops.mkldnn._convolution_pointwise.binary(xd, res, *args, "add", 1.0, None, [], None)
    return finish(y, out)


def has_backward(*tensors) -> bool:
    """Whether conv2d_backward and linear_backward serve a gradient of a call with these tensors: fp32 (bf16
    training runs the reference)."""
    return all(t.dtype == torch.float32 for t in tensors if t is not None)


def conv2d_train(x, weight, bias, residual, stride, padding, dilation, groups):
    """The forward of :func:`conv2d` under autograd: (out, the channels_last x the kernels read, kept for the
    weight gradient). The transformed (or reordered) weight is built for this call only: training changes the weight
    every step, so a kept one would never be used again, and the U-Net's kept Winograd transforms (forward and
    rotated, 4x the weights each at F(4x4, 3x3)) would add ~1 GB to a training step's peak memory (the layer's
    inference cache, ``conv2d(prepared=)``, is not touched)."""
    xd = x.contiguous(memory_format=torch.channels_last)
    return conv2d(xd, weight, bias, residual, stride, padding, dilation, groups, None, None), xd


def _rotated(weight):
    """w_rot[c, k, i, j] = w[k, c, 2 - i, 2 - j]: in/out channels swapped, flipped in space. For a stride-1 pad-1
    3x3 y = x * w, dx[n, c, h, w] = sum_{k,i,j} dy[n, k, h + 1 - i, w + 1 - j] w[k, c, i, j] = (dy * w_rot)[n, c, h, w]
    with the same padding: the data gradient is a forward 3x3 convolution."""
    return weight.detach().transpose(0, 1).flip(2, 3)


def _pointwise(weight, stride, padding, groups) -> bool:
    return tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1


def _pointwise_backward(g, xd, w, has_bias, needs):
    """A 1x1 stride-1 convolution on channels_last tensors is a linear layer over the N*H*W pixels, y2 = x2 w2^T with
    x2 (NHW, C), w2 (K, C): its backward is :func:`_rows_backward` on the views. (ATen sends it to
    _slow_conv2d_backward: 17 ms where these GEMMs take 4 for a 512 -> 256 shortcut at batch 8, 16x16, one
    thread.)"""
    record("conv2d_backward", NAME, "gemm")
    N, K, H, W = g.shape
    C = xd.shape[1]
    rows = N * H * W
    g2, x2 = g.permute(0, 2, 3, 1).reshape(rows, K), xd.permute(0, 2, 3, 1).reshape(rows, C)
    dx2, dw, db, _ = _rows_backward(g2, x2, w.view(K, C), has_bias, needs)
    dx = None if dx2 is None else dx2.view(N, H, W, C).permute(0, 3, 1, 2)
    return dx, None if dw is None else dw.view(K, C, 1, 1), db


def conv2d_backward(grad, xd, weight, has_bias, stride, padding, dilation, groups, needs):
    """(dx, dw, db) of ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` for dL/dy = grad, each None
    where ``needs`` (three bools) says it is not wanted. Winograd-eligible 3x3 layers: dx = conv3x3(grad, w_rot)
    (:func:`_rotated`) on the forward's Winograd kernel, its transformed weight built for the call (as the
    forward's is); dw and db by ATen's convolution_backward (oneDNN). 1x1 stride-1 layers: three GEMMs
    (:func:`_pointwise_backward`). Other layers: all three by ATen's convolution_backward."""
    cl = torch.channels_last
    g = grad.contiguous(memory_format=cl)
    w = weight.detach()
    bias_sizes = [w.shape[0]] if has_bias else None
    geometry = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
    dx = None
    if _pointwise(w, stride, padding, groups):
        return _pointwise_backward(g, xd, w, has_bias, needs)
    if _winograd(w, stride, padding, dilation, groups) and needs[0]:
        record("conv2d_backward", NAME, "winograd+aten")
        tile = winograd_tile(g.shape[0], g.shape[2], g.shape[3])
        dx = _winograd_conv(g, None, None, None, winograd_weight(w, tile, rotated=True), None)  # built per call
        mask = [False, needs[1], has_bias and needs[2]]
    else:
        record("conv2d_backward", NAME, "aten")
        mask = [needs[0], needs[1], has_bias and needs[2]]
    if any(mask):
        gx, dw, db = torch.ops.aten.convolution_backward(g, xd, w, bias_sizes, *geometry, mask)
        dx = gx if mask[0] else dx
    else:
        dw = db = None
    return dx, dw if needs[1] else None, db if has_bias and needs[2] else None


def linear(x, weight, bias, residual, scratch, out):
    """x W^T + b (+ residual) by one GEMM: oneDNN's linear (the residual as its post-op), or the BLAS (into
    ``scratch``'s buffer, or accumulated onto residual + b in place)."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)
    K = weight.shape[0]
    if _linear_onednn():
        record("linear", NAME, "onednn")
        if residual is None:
            y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        else:
            y = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(-1, K), weight, bias, "add")
        return finish(y.view(*lead, K), out)
    record("linear", NAME, "blas")
    if residual is not None:  # (residual + b) in one pass, then x W^T accumulated onto it in place (beta = 1)
        y = residual.reshape(-1, K) + (0 if bias is None else bias)
        y.addmm_(x2, weight.t())
        return finish(y.view(*lead, K), out)
    if out is not None and out.is_contiguous():
        y = out.view(-1, K)
    elif scratch is not None:
        y = scratch.get(x, (x2.shape[0], K))
    else:
        y = x2.new_empty(x2.shape[0], K)
    if bias is None:
        torch.mm(x2, weight.t(), out=y)
    else:
        torch.addmm(bias, x2, weight.t(), out=y)
    return finish(y.view(*lead, K), out)


def _rows_backward(g2, x2, w, has_bias, needs):
    """(dx2, dw, db, library) of y2 = x2 w^T + b over rows (x2 (M, in), dy2 = g2 (M, out), w (out, in)), each
    None where ``needs`` says it is not wanted: dx2 = dy2 w in oneDNN (w^T copied: a weight, small) where the
    extension runs its GEMMs in oneDNN, dw = dy2^T x2 in the BLAS (the transposed operand read in place; oneDNN
    would need both operands copied), db = the column sums of dy2; ``library``: what served them ("onednn+blas" or
    "blas"). oneDNN's GEMM ran 2.3x MKL's on Zen 5 (MKL takes its AVX2 path on AMD) at the U-Net's attention
    projections: 2048 x 256 x 256, one thread."""
    dx2 = dw = db = None
    library = "blas"
    if needs[0]:
        if _linear_onednn():
            library = "onednn+blas"
            dx2 = torch.ops.mkldnn._linear_pointwise(g2.contiguous(), w.t().contiguous(), None, "none", [], "")
        else:
            dx2 = torch.mm(g2, w)
    if needs[1]:
        dw = torch.mm(g2.t(), x2)
    if has_bias and needs[2]:
        db = g2.sum(0)
    return dx2, dw, db, library


def linear_backward(grad, x, weight, has_bias, needs):
    """(dx, dw, db) of ``x W^T + b`` for dL/dy = grad, over the rows of x and grad (:func:`_rows_backward`)."""
    K, n_in = weight.shape
    dx2, dw, db, library = _rows_backward(
        grad.reshape(-1, K), x.detach().reshape(-1, n_in), weight.detach(), has_bias, needs
    )
    record("linear_backward", NAME, library)
    return None if dx2 is None else dx2.view(x.shape), dw, db


def _register_fakes() -> None:
    """Shape functions of the compiled ops (their schemas are the CPU extension's), so torch.compile can trace
    through them."""
    if not hasattr(torch.ops.ddpm_fast, "ddpm_step"):
        return
    mutating = ("ddpm_step", "dpmpp_step", "q_sample", "keyed_normal", "group_norm_silu", "attention", "conv3x3")
    for name in mutating + ("attention_train", "attention_backward"):
        if hasattr(torch.ops.ddpm_fast, name):  # an extension built before the op existed lacks it
            torch.library.register_fake(f"ddpm_fast::{name}")(lambda *args, **kwargs: None)
    torch.library.register_fake("ddpm_fast::winograd_weight")(
        lambda w, tile=2, rotated=False: w.new_empty((tile + 2) ** 2, *(w.shape[:2] if rotated else w.shape[1::-1]))
    )


_register_fakes()
