"""Public functional ops. Validation and backend choice happen here (ops/_checks.py, ops/_dispatch.py);
the kernels live in csrc/ (torch.ops.ddpm_fast.*) and kernels/ (Triton); ddpm_fast/reference is the spec.

Every op takes ``out=`` (a preallocated result, PyTorch's convention) and ``backend=``. An ``out`` follows PyTorch's
memory-overlap rules, checked before any kernel runs (ValueError): no two of its elements at one address (an
expanded tensor), no overlap with an input unless it is that very input where the op runs in place (the
elementwise ops, group_norm_silu on x, attention on its residual, conv3x3 on x or its residual), no overlap between
two outputs.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import reference as ref
from ..reference.noise import STREAM_X_T
from . import _checks as C
from ._dispatch import _why_unavailable, backends, resolve
from ._tables import cached, step_table, to_device
from ._trace import Call, FusedPathError, Trace, record, trace

__all__ = [
    "attention",
    "Call",
    "FusedPathError",
    "Trace",
    "backends",
    "conv3x3",
    "ddim_step",
    "ddpm_step",
    "group_norm_silu",
    "keyed_normal",
    "q_sample",
    "trace",
    "winograd_weight",
]

_PREDICTION_CODE = {"epsilon": 0, "sample": 1, "v_prediction": 2}
_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last)
_VARIANCE_CODE = {"fixed_small": 0, "fixed_large": 1}
# what serves an op on each backend, for ops.trace(): the reference, ddpm_fast's Triton kernel, or its compiled op
_KERNEL = {"torch": "reference", "triton": "triton", "cpu": "native", "cuda": "native"}


# ----------------------------------------------------------------------------------------------- helpers
def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The dense layout the fused kernels run in: x's own if it has one, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


def _result_buffer(out, like: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """Where a kernel writes: ``out`` itself when it has the layout, else a fresh tensor copied into out later."""
    if out is not None and out.is_contiguous(memory_format=fmt):
        return out
    return torch.empty_like(like, memory_format=fmt)


def _finish(result: torch.Tensor, out) -> torch.Tensor:
    if out is None or out is result:
        return result if out is None else out
    return out.copy_(result)


def _signed64(seed: int) -> int:
    """A uint64 seed as the int64 the op schema carries (same bits)."""
    return seed - 2**64 if seed >= 2**63 else seed


def _timestep_device(backend: str, t, device: torch.device):
    """Where an op's t is prepared: the host for the cpu and cuda kernels (their glue reads it there); for Triton
    where it already is (an int or a CPU tensor: the host, so per-sample coefficients are computed there and sent
    without a synchronisation; a GPU tensor stays on the GPU and is never read back); for the reference, the data's
    device."""
    if backend in ("cpu", "cuda"):
        return "cpu"
    if backend == "triton" and not (isinstance(t, torch.Tensor) and t.device.type != "cpu"):
        return "cpu"
    return device


# ----------------------------------------------------------------------------------------------- noising
def q_sample(x0, t, noise, schedule, *, seed=None, sample_offset=0, coefficients=None, backend=None, out=None):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4), t per sample.

    ``noise=None`` draws eps from the keyed generator (``seed``, ``sample_offset``; seed=None takes one from
    torch's default generator) and returns ``(x_t, eps)``; otherwise returns x_t. ``coefficients``: an optional
    (B, 2) table [sqrt(abar_t), sqrt(1 - abar_t)] used instead of the schedule's (a drop-in scheduler's own).
    """
    s = C.schedule(schedule)
    x0 = C.tensor("x0", x0)
    B = x0.shape[0]
    C.alike({"x0": x0, "noise": noise, "out": out})
    drawn = noise is None
    seed = C.seed_value(seed) if drawn else 0
    sample_offset = C.sample_offset(sample_offset, B)
    backend = resolve("q_sample", backend, x0.device, _needs_grad(x0, noise), x0.dtype)
    given = {"x0": x0, "noise": noise, "t": t, "coefficients": coefficients}
    t = C.timesteps(t, B, len(s), _timestep_device(backend, t, x0.device), data=("x0", x0.device))
    coefficients = C.coefficient_table("coefficients", coefficients, B, 2)
    C.outputs({"out": out}, given, in_place=("x0", "noise"))  # elementwise: out may be x0 or noise
    record("q_sample", backend, _KERNEL[backend])
    if backend == "torch":
        result = ref.q_sample(x0, t, noise, s, seed=seed, sample_offset=sample_offset, coefficients=coefficients)
        x_t = result[0] if drawn else result
        x_t = _finish(x_t, out)
        return (x_t, result[1]) if drawn else x_t
    C.tensor("x0", x0, dtypes=C.FUSED_DTYPES)
    fmt = _memory_format(x0)
    x0d = _dense(x0, fmt)
    eps = torch.empty_like(x0d, memory_format=fmt) if drawn else _dense(noise, fmt)
    x_t = _result_buffer(out, x0d, fmt)
    if backend == "triton":  # the Triton kernel reads a (B, 2) coefficient table from device memory
        from ..kernels import q_sample as tk

        t = to_device(t, x0.device)
        if coefficients is None:  # the schedule's [sqrt(abar), sqrt(1 - abar)] for every t, gathered on the device
            table = cached(s, ("q_sample",), x0.device, lambda: _q_sample_rows(s)).index_select(0, t)
        else:
            table = to_device(coefficients, x0.device)
        tk.q_sample(x0d, eps, x_t, table, t, drawn, seed, sample_offset, fmt == torch.channels_last)
        x_t = _finish(x_t, out)
        return (x_t, eps) if drawn else x_t
    # cpu and cuda: t, the schedule and any coefficient table go on the host; the kernels' glue computes each
    # sample's coefficients with csrc/common/coefficients.h
    torch.ops.ddpm_fast.q_sample(
        x0d,
        t,
        s.table("alphas_cumprod", torch.float64, "cpu"),
        coefficients,
        eps,
        drawn,
        _signed64(seed),
        sample_offset,
        x_t,
    )
    x_t = _finish(x_t, out)
    return (x_t, eps) if drawn else x_t


def _q_sample_rows(s) -> torch.Tensor:
    abar = s.alphas_cumprod
    return torch.stack([abar.sqrt(), (1 - abar).sqrt()], dim=1).float()


# ----------------------------------------------------------------------------------------------- reverse step
def ddpm_step(
    x_t,
    model_output,
    t,
    schedule,
    noise=None,
    *,
    seed=None,
    sample_offset=0,
    variance_type="fixed_small",
    prediction_type="epsilon",
    clip_sample=False,
    clip_range=1.0,
    t_prev=None,
    coefficients=None,
    backend=None,
    out=None,
    x0_out=None,
):
    """One reverse step x_t -> x_{t-1} (Ho et al. 2020, Algorithm 2 line 4; eq. 7 and 15).

    ``t``: an int (the whole batch at one step) or a (B,) integer tensor; ``t_prev`` the previous timestep
    (default t - 1; another value for respaced or custom timesteps, -1 for none). ``model_output`` is epsilon,
    x_0 ("sample") or v per ``prediction_type``. ``noise``: z, or None for keyed noise from ``seed`` and
    ``sample_offset`` (stream 0). No noise is added where t == 0. ``out`` may be ``x_t`` (in place);
    ``x0_out`` receives the predicted (clipped) x_0. ``coefficients``: an optional (B, 7) float32 table
    [px, pm, q, c0, c1, cm, sigma] (x_0 = (px x_t + pm m) q; x_{t-1} = c0 x_0 + c1 x_t + cm m + sigma z) used
    instead of the schedule's: DDIM (see :func:`ddim_step`), or drop-in schedulers reproducing their own rounding.
    """
    s = C.schedule(schedule)
    x_t = C.tensor("x_t", x_t)
    group = {"x_t": x_t, "model_output": model_output, "noise": noise, "out": out, "x0_out": x0_out}
    C.alike(group, required=("model_output",))
    C.choice("variance_type", variance_type, C.VARIANCE_TYPES)
    C.choice("prediction_type", prediction_type, C.PREDICTION_TYPES)
    if not isinstance(clip_sample, bool):
        raise TypeError(f"clip_sample: expected a bool, got {type(clip_sample).__name__}")
    clip_range = C.number("clip_range", clip_range, positive=True)
    B = x_t.shape[0]
    seed = C.seed_value(seed) if noise is None else 0
    sample_offset = C.sample_offset(sample_offset, B)
    backend = resolve("ddpm_step", backend, x_t.device, _needs_grad(x_t, model_output, noise), x_t.dtype)
    given = {"x_t": x_t, "model_output": model_output, "noise": noise, "t": t, "t_prev": t_prev}
    given["coefficients"] = coefficients
    data = ("x_t", x_t.device)
    t = C.timesteps(t, B, len(s), _timestep_device(backend, t, x_t.device), data=data)
    if t_prev is not None:
        t_prev = C.previous_timesteps(t_prev, t, len(s), data=data)
    coefficients = C.coefficient_table("coefficients", coefficients, B, 7)
    # elementwise (every backend reads an element's inputs before writing its outputs): out and x0_out may each be
    # x_t, model_output or noise, but not each other
    C.outputs({"out": out, "x0_out": x0_out}, given, in_place=("x_t", "model_output", "noise"))
    record("ddpm_step", backend, _KERNEL[backend])
    if backend == "torch":
        result, x0 = ref.ddpm_step(
            x_t,
            model_output,
            t,
            s,
            noise,
            seed=seed,
            sample_offset=sample_offset,
            variance_type=variance_type,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            clip_range=clip_range,
            t_prev=t_prev,
            coefficients=None if coefficients is None else coefficients.to(torch.float64),
            return_x0=True,
        )
        if x0_out is not None:
            x0_out.copy_(x0)
        return _finish(result, out)
    C.tensor("x_t", x_t, dtypes=C.FUSED_DTYPES)
    fmt = _memory_format(x_t)
    xd = _dense(x_t, fmt)
    result = _result_buffer(out, xd, fmt)
    x0_result = None if x0_out is None else _result_buffer(x0_out, xd, fmt)
    if backend == "triton":  # the Triton kernel reads a (B, 9) coefficient table from device memory
        from ..kernels import ddpm_step as tk

        table, noise_mode = _triton_step_table(t, t_prev, coefficients, s, prediction_type, variance_type, noise)
        tk.ddpm_step(
            xd,
            _dense(model_output, fmt),
            None if noise is None else _dense(noise, fmt),
            result,
            x0_result,
            to_device(table, x_t.device),
            to_device(t, x_t.device),
            seed,
            sample_offset,
            clip_sample,
            clip_range,
            fmt == torch.channels_last,
            noise_mode=noise_mode,
        )
        if x0_out is not None:
            _finish(x0_result, x0_out)
        return _finish(result, out)
    # cpu and cuda: t, t_prev, the schedule and any coefficient table go on the host; the kernels' glue computes
    # each sample's coefficients with csrc/common/coefficients.h
    torch.ops.ddpm_fast.ddpm_step(
        xd,
        _dense(model_output, fmt),
        t,
        t_prev,
        s.table("alphas_cumprod", torch.float64, "cpu"),
        coefficients,
        None if noise is None else _dense(noise, fmt),
        _signed64(seed),
        sample_offset,
        _PREDICTION_CODE[prediction_type],
        _VARIANCE_CODE[variance_type],
        clip_sample,
        clip_range,
        result,
        x0_result,
    )
    if x0_out is not None:
        _finish(x0_result, x0_out)
    return _finish(result, out)


def _triton_step_table(t, t_prev, coefficients, s, prediction_type, variance_type, noise):
    """The (B, 9) coefficient table of a Triton reverse step and its noise mode, computed where t lies: on the
    host for host timesteps (sent asynchronously), on the device for device timesteps (a gather from the whole
    schedule's table); never a read of a device value on the host."""
    from ..kernels import ddpm_step as tk

    if coefficients is not None:  # sigma only where t > 0, as the schedule's own rows
        k = to_device(coefficients, t.device).to(torch.float64)
        table = step_table(torch.cat([k[:, :6], k[:, 6:] * (t > 0).unsqueeze(1)], dim=1))
    elif t_prev is None and t.device.type != "cpu":
        key = ("ddpm_step", prediction_type, variance_type)
        rows = lambda: step_table(ref.step_coefficients(torch.arange(len(s)), None, s, prediction_type, variance_type))  # noqa: E731
        table = cached(s, key, t.device, rows).index_select(0, t)
    else:
        table = step_table(ref.step_coefficients(t, t_prev, s, prediction_type, variance_type))
    if noise is not None:
        return table, tk.NOISE_GIVEN
    if table.device.type == "cpu" and not bool((table[:, 8] != 0).any()):  # a host table: free to read
        return table, tk.NOISE_NONE
    return table, tk.NOISE_KEYED  # rows with sigma = 0 add 0 * z


def ddim_step(
    x_t,
    model_output,
    t,
    t_prev,
    schedule,
    noise=None,
    *,
    eta=0.0,
    seed=None,
    sample_offset=0,
    prediction_type="epsilon",
    clip_sample=False,
    clip_range=1.0,
    use_clipped_model_output=False,
    backend=None,
    out=None,
):
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12), ``eta`` = 0 deterministic, 1 DDPM-like.

    Runs on the fused reverse-step kernels with DDIM's coefficient table (ddpm_fast/reference/ddim_step.py).
    ``t_prev`` = -1 steps to x_0. Noise as in :func:`ddpm_step` (given, or keyed stream 0).
    """
    s = C.schedule(schedule)
    x_t = C.tensor("x_t", x_t)
    B = x_t.shape[0]
    eta = C.number("eta", eta, finite=True)
    if eta < 0:
        raise ValueError(f"eta: expected eta >= 0, got {eta}")
    C.choice("prediction_type", prediction_type, C.PREDICTION_TYPES)
    t = C.timesteps(t, B, len(s), "cpu", data=("x_t", x_t.device))  # DDIM's coefficients are computed on the host
    t_prev = C.previous_timesteps(t_prev, t, len(s), data=("x_t", x_t.device))
    k = ref.ddim_coefficients(t, t_prev, s, prediction_type, eta, bool(use_clipped_model_output))
    return ddpm_step(
        x_t,
        model_output,
        t,
        s,
        noise,
        seed=seed,
        sample_offset=sample_offset,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_range=clip_range,
        coefficients=k.float(),
        backend=backend,
        out=out,
    )


# ----------------------------------------------------------------------------------------------- noise
def keyed_normal(
    shape,
    *,
    seed,
    t=0,
    stream=STREAM_X_T,
    sample_offset=0,
    dtype=torch.float32,
    device="cpu",
    memory_format=torch.contiguous_format,
    backend=None,
    out=None,
):
    """Keyed standard normal noise of ``shape`` (B, ...): what the fused kernels draw for (seed, g, t, stream).

    Stream 2 (the default) is a sampling chain's initial x_T; 0 is ddpm_step's z; 1 is q_sample's eps.
    """
    if out is not None:
        C.tensor("out", out)
        C.outputs({"out": out}, {})
        shape, dtype, device = tuple(out.shape), out.dtype, out.device
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in shape
    ):
        raise TypeError(f"shape: expected a tuple of ints, got {shape!r}")
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0 or any(d <= 0 for d in shape):
        raise ValueError(f"shape: expected a non-empty (batch, ...) shape, got {shape}")
    if not isinstance(dtype, torch.dtype) or dtype not in C.REFERENCE_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in C.REFERENCE_DTYPES)
        raise TypeError(f"dtype: expected one of ({names}), got {dtype!r}")
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**32:
        raise ValueError(f"stream: expected an int in [0, 2**32), got {stream!r}")
    if not isinstance(memory_format, torch.memory_format) or memory_format not in _MEMORY_FORMATS:
        raise ValueError(
            f"memory_format: expected torch.contiguous_format or torch.channels_last, got {memory_format!r}"
        )
    if memory_format == torch.channels_last and len(shape) != 4:
        raise ValueError(f"memory_format: channels_last needs a 4-d shape, got {shape}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch.device or a device string, got {device!r}") from e
    seed = C.seed_value(seed)
    B = shape[0]
    sample_offset = C.sample_offset(sample_offset, B)
    backend = resolve("keyed_normal", backend, device, dtype=dtype)
    data = ("out" if out is not None else "device", device)
    t = C.timesteps(t, B, 2**32, "cpu" if backend == "cpu" else device, data=data)
    record("keyed_normal", backend, _KERNEL[backend])
    if backend == "torch":
        z = ref.keyed_normal(shape, seed, t, stream, sample_offset, device).to(dtype)
        if memory_format is not torch.contiguous_format:
            z = z.contiguous(memory_format=memory_format)
        return _finish(z, out)
    if dtype not in C.FUSED_DTYPES:
        raise TypeError(f"dtype: the {backend} backend supports float32/float16/bfloat16, got {dtype}")
    if out is not None:
        fmt = _memory_format(out)
        result = _result_buffer(out, out, fmt)
    else:
        result = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if backend == "triton":
        from ..kernels import q_sample as tk

        tk.keyed_normal(result, t, seed, sample_offset, int(stream), _memory_format(result) == torch.channels_last)
    else:
        torch.ops.ddpm_fast.keyed_normal(t, _signed64(seed), sample_offset, int(stream), result)
    return _finish(result, out)


# ----------------------------------------------------------------------------------------------- U-Net ops
def group_norm_silu(x, num_groups, weight, bias, eps=1e-5, *, silu=True, add=None, backend=None, out=None):
    """SiLU(GroupNorm(x + add[:, :, None, None]) * weight + bias) (Wu & He 2018); add and SiLU optional."""
    x = C.tensor("x", x, min_dim=2)
    C.alike({"x": x, "weight": weight, "bias": bias, "add": add, "out": out}, same=("device",))
    C.alike({"x": x, "add": add, "out": out}, same=("dtype",))
    B, Cn = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups <= 0:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
    if Cn % num_groups:
        raise ValueError(f"num_groups: {Cn} channels are not divisible by {num_groups} groups")
    num_groups = int(num_groups)
    given = [(k, p) for k, p in (("weight", weight), ("bias", bias), ("add", add)) if p is not None and p.dim()]
    if len(given) > 1 and all(p.shape[-1] != Cn for _, p in given):
        counts = {p.shape[-1] for _, p in given}
        if len(counts) == 1:  # the per-channel arguments agree with each other, x alone differs
            raise ValueError(
                f"x: {Cn} channels (dim 1 of its shape {tuple(x.shape)}) but {C.listing(k for k, _ in given)} have "
                f"{counts.pop()}"
            )
    weight = C.parameter("weight", weight, x)
    bias = C.parameter("bias", bias, x)
    if add is not None and tuple(add.shape) != (B, Cn):
        raise ValueError(f"add: expected shape {(B, Cn)} (x's batch and channels), got {tuple(add.shape)}")
    C.number("eps", eps, positive=True)
    C.alike({"x": x, "out": out}, same=("shape",))
    if not isinstance(silu, bool):
        raise TypeError(f"silu: expected a bool, got {type(silu).__name__}")
    # the statistics of a group are complete before any of its elements is written: out may be x (in place)
    C.outputs({"out": out}, {"x": x, "weight": weight, "bias": bias, "add": add}, in_place=("x",))
    backend = resolve("group_norm_silu", backend, x.device, _needs_grad(x, weight, bias, add), x.dtype)
    record("group_norm_silu", backend, _KERNEL[backend])
    if backend == "torch":
        if x.device.type != "cpu":  # fp32 parameters beside an fp16/bf16 x: F.group_norm mixes types on CPU only
            weight, bias = (None if p is None else p.to(x.dtype) for p in (weight, bias))
        return _finish(ref.group_norm_silu(x, num_groups, weight, bias, eps, silu=silu, add=add), out)
    C.tensor("x", x, min_dim=2, dtypes=C.FUSED_DTYPES)
    fmt = _memory_format(x)
    xd = _dense(x, fmt)
    result = _result_buffer(out, xd, fmt)
    if backend == "triton":
        from ..kernels import group_norm as tk

        tk.group_norm_silu(xd, result, num_groups, weight, bias, add, eps, bool(silu), fmt == torch.channels_last)
    else:
        torch.ops.ddpm_fast.group_norm_silu(xd, num_groups, weight, bias, add, float(eps), bool(silu), result)
    return _finish(result, out)


def attention(q, k, v, *, scale=None, residual=None, backend=None, out=None):
    """softmax(q k^T * scale) v (+ residual) for (B, H, N, D) q, k, v of any strides; scale=None: 1/sqrt(D)."""
    q = C.tensor("q", q, min_dim=4)
    if q.dim() != 4:
        raise ValueError(f"q: expected shape (B, H, N, D), got {tuple(q.shape)}")
    C.alike({"q": q, "k": k, "v": v, "residual": residual, "out": out}, same=("device", "dtype"), required=("k", "v"))
    for name, x in (("k", k), ("v", v)):
        C.tensor(name, x, min_dim=4)
        if x.dim() != 4 or x.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"{name}: expected shape (B, H, M, D) with (B, H) = {tuple(q.shape[:2])} as q's, got {tuple(x.shape)}"
            )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k: head dim {k.shape[3]} does not match q's {q.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: {v.shape[2]} keys/values but k has {k.shape[2]}")
    out_shape = (*q.shape[:3], v.shape[3])
    for name, x in (("residual", residual), ("out", out)):
        if x is not None and tuple(x.shape) != out_shape:
            raise ValueError(
                f"{name}: expected shape {out_shape} (q's B, H, N and v's head dim {v.shape[3]}), got {tuple(x.shape)}"
            )
    if scale is not None:
        scale = C.number("scale", scale, positive=True, finite=True)
    # out may be the residual (added elementwise in the epilogue), never q, k or v: other rows still read them
    C.outputs({"out": out}, {"q": q, "k": k, "v": v, "residual": residual}, in_place=("residual",))
    requested = backend
    backend = resolve("attention", backend, q.device, _needs_grad(q, k, v, residual), q.dtype)
    if backend == "torch":
        record("attention", backend, _KERNEL[backend])
        return _finish(ref.attention(q, k, v, scale=scale, residual=residual), out)
    C.tensor("q", q, min_dim=4, dtypes=C.FUSED_DTYPES)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def rows(x):  # the kernels read rows through any outer strides
        return x if x.stride(-1) == 1 else x.contiguous()

    B, H, N, Dv = out_shape
    if backend == "cuda":
        qr, kr, vr = rows(q), rows(k), rows(v)
        rr = None if residual is None else rows(residual)
        if _cuda_attention_fits(qr, kr, vr, rr):
            fits = out is not None and out.stride(-1) == 1 and out.stride(2) % 2 == 0 and out.data_ptr() % 4 == 0
            result = out if fits else q.new_empty(B, N, H, Dv).transpose(1, 2)
            record("attention", "cuda", "tensor_core")
            torch.ops.ddpm_fast.attention(qr, kr, vr, float(scale), rr, result)
            return _finish(result, out)
        if requested not in (None, "auto"):
            raise TypeError(
                "q: the cuda attention kernel runs float16/bfloat16 with head dims 64, 128 or 256 (v's equal to q's) "
                f"and even row strides; got {q.dtype}, head dims {q.shape[3]}/{v.shape[3]}"
            )
        if _why_unavailable("triton") is not None:
            record("attention", "torch", "reference")
            return _finish(ref.attention(q, k, v, scale=scale, residual=residual), out)
        backend = "triton"  # auto: the shapes and dtypes the tensor-core kernel does not take
    if backend == "triton":  # any of the fused dtypes, fp32 accumulation inside
        from ..kernels import attention as tk

        result = out if out is not None and out.stride(-1) == 1 else q.new_empty(B, N, H, Dv).transpose(1, 2)
        record("attention", "triton", "triton")
        tk.attention(rows(q), rows(k), rows(v), None if residual is None else rows(residual), result, scale)
        return _finish(result, out)

    def fp32_rows(x):  # the CPU kernel reads fp32 rows
        return rows(x if x.dtype == torch.float32 else x.float())

    if out is not None and out.dtype == torch.float32 and out.stride(-1) == 1:
        result = out
    else:  # (B, N, H, Dv) memory: o.transpose(1, 2).reshape(B, N, H * Dv) is then a free view
        result = torch.empty(B, N, H, Dv, dtype=torch.float32, device=q.device).transpose(1, 2)
    res = None if residual is None else fp32_rows(residual)
    record("attention", "cpu", "native")
    torch.ops.ddpm_fast.attention(fp32_rows(q), fp32_rows(k), fp32_rows(v), float(scale), res, result)
    if result.dtype != q.dtype:
        result = result.to(q.dtype)
    return _finish(result, out)


def winograd_weight(weight):
    """The Winograd F(2x2, 3x3) transform of a (K, C, 3, 3) fp32 weight, (16, C, K): compute it once per weight and
    pass it to :func:`conv3x3` as ``packed``."""
    weight = C.tensor("weight", weight, min_dim=4, dtypes=(torch.float32,))
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight: expected shape (K, C, 3, 3), got {tuple(weight.shape)}")
    if weight.device.type != "cpu":
        raise ValueError(f"weight: the Winograd kernel runs on the CPU, got a weight on {weight.device}")
    return torch.ops.ddpm_fast.winograd_weight(weight.detach())


def conv3x3(x, weight, bias=None, residual=None, *, packed=None, backend=None, out=None):
    """3x3 convolution, stride 1, padding 1 (+ residual), i.e. ``F.conv2d(x, weight, bias, padding=1) + residual``.

    The ``cpu`` backend runs Winograd F(2x2, 3x3) on fp32 channels_last activations (other layouts are copied
    to channels_last once); ``packed``: :func:`winograd_weight` of ``weight``, to skip its transform per call.
    """
    x = C.tensor("x", x, min_dim=4)
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (N, C, H, W), got {tuple(x.shape)}")
    group = {"x": x, "weight": weight, "bias": bias, "residual": residual, "out": out}
    C.alike(group, same=("device", "dtype"), required=("weight",))
    weight = C.tensor("weight", weight, min_dim=4)
    N, Cin, H, W = x.shape
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (Cin, 3, 3):
        raise ValueError(f"weight: expected shape (K, {Cin}, 3, 3) (x has {Cin} channels), got {tuple(weight.shape)}")
    K = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (K,):
        raise ValueError(f"bias: expected shape ({K},) (weight's {K} output channels), got {tuple(bias.shape)}")
    for name, y in (("residual", residual), ("out", out)):
        if y is not None and tuple(y.shape) != (N, K, H, W):
            raise ValueError(
                f"{name}: expected shape {(N, K, H, W)} (x's N, H, W and weight's K), got {tuple(y.shape)}"
            )
    if packed is not None:
        C.tensor("packed", packed, dtypes=(torch.float32,))
        if packed.device.type != "cpu" or tuple(packed.shape) != (16, Cin, K):
            raise ValueError(
                f"packed: expected winograd_weight(weight), a CPU tensor of shape (16, {Cin}, {K}), "
                f"got shape {tuple(packed.shape)} on {packed.device}"
            )
    # out may be the residual (added elementwise) or x (the kernel then writes a buffer of its own)
    inputs = {"x": x, "weight": weight, "bias": bias, "residual": residual, "packed": packed}
    C.outputs({"out": out}, inputs, in_place=("x", "residual"))
    requested = backend
    backend = resolve("conv3x3", backend, x.device, _needs_grad(x, weight, bias, residual), x.dtype)
    if backend == "cpu" and x.dtype != torch.float32:
        if requested not in (None, "auto"):
            raise TypeError(f"x: the cpu conv3x3 kernel takes float32, got {x.dtype}")
        backend = "torch"  # auto: the Winograd kernel is fp32 only
    if backend != "cpu":
        record("conv3x3", "torch", "reference")
        return _finish(ref.conv3x3(x, weight, bias, residual), out)
    if packed is None:
        packed = winograd_weight(weight)
    cl = torch.channels_last
    xd = x.contiguous(memory_format=cl)
    res = None if residual is None else residual.contiguous(memory_format=cl)
    if out is not None and out.is_contiguous(memory_format=cl) and not _overlaps(out, xd):
        result = out
    else:
        result = torch.empty(N, K, H, W, dtype=x.dtype, device=x.device, memory_format=cl)
    record("conv3x3", "cpu", "winograd")
    torch.ops.ddpm_fast.conv3x3(xd, packed, None if bias is None else bias.contiguous(), res, result)
    return _finish(result, out)


def _overlaps(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _cuda_attention_fits(q, k, v, residual) -> bool:
    """What the tensor-core kernel (csrc/cuda/attention.cu) takes; other cases go to Triton."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[3] not in (64, 128, 256) or v.shape[3] != q.shape[3]:
        return False
    return all(
        t.stride(-1) == 1 and t.stride(2) % 2 == 0 and t.data_ptr() % 4 == 0
        for t in (q, k, v) + (() if residual is None else (residual,))
    )


def _register_fakes() -> None:
    """Shape functions of the compiled ops, so torch.compile can trace through them."""
    if not hasattr(torch.ops.ddpm_fast, "ddpm_step"):
        return
    for name in ("ddpm_step", "q_sample", "keyed_normal", "group_norm_silu", "attention", "conv3x3"):
        torch.library.register_fake(f"ddpm_fast::{name}")(lambda *args, **kwargs: None)
    torch.library.register_fake("ddpm_fast::winograd_weight")(lambda w: w.new_empty(16, w.shape[1], w.shape[0]))


_register_fakes()
