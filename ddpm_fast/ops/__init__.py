"""Public functional ops: their signatures, their documentation and the validation of their arguments.

Each op validates its arguments (ops/_checks.py: a ValueError/TypeError naming the argument, before any kernel
runs), resolves its backend once (ops/_registry.py: per-op capability rules) and makes one call into that backend's
module (``_torch`` the reference, ``_cpu``, ``_triton``, ``_cuda``: the same functions in each). The kernels live in
csrc/ (torch.ops.ddpm_fast.*) and kernels/ (Triton); ddpm_fast/reference is the spec. ``trace()`` records which
backend and kernel served each call.

Every op takes ``out=`` (a preallocated result, PyTorch's convention) and ``backend=``. An ``out`` follows PyTorch's
memory-overlap rules, checked before any kernel runs (ValueError): no two of its elements at one address (an
expanded tensor), no overlap with an input unless it is that very input where the op runs in place (the
elementwise ops, group_norm_silu on x, attention on its residual, conv3x3/conv2d on x or its residual), no overlap
between two outputs.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..reference.ddim_step import ddim_coefficients
from ..reference.dpmpp_step import SOLVER_TYPES, dpmpp_coefficients, full_row, history_read
from ..reference.noise import STREAM_X_T
from . import _checks as C
from ._layout import MEMORY_FORMATS
from ._prepared import Prepared, Scratch, ScratchSlot
from ._registry import backends, check_backend, module, resolve, why_not_fused
from ._trace import Call, FusedPathError, Trace, trace

__all__ = [
    "Call",
    "FusedPathError",
    "Prepared",
    "Scratch",
    "Trace",
    "attention",
    "backends",
    "check_backend",
    "conv2d",
    "conv3x3",
    "ddim_step",
    "ddpm_step",
    "dpmpp_step",
    "group_norm_silu",
    "keyed_normal",
    "linear",
    "q_sample",
    "trace",
    "unipc_step",
    "why_not_fused",
    "winograd_weight",
    "winograd_weight_bf16",
]


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors)


def _cpu_backward(op: str, requested, x, tensors, **facts) -> bool:
    """Whether a call under autograd runs the cpu kernels forward and backward: the backend the call would resolve
    to without autograd is cpu, and the cpu backward takes its tensors (fp32)."""
    return resolve(op, requested, x.device, False, x.dtype, **facts) == "cpu" and module("cpu").has_backward(*tensors)


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
    needs_grad = _needs_grad(x0, noise)
    if needs_grad and out is not None:
        raise ValueError(
            "out: q_sample with out= does not support automatic differentiation (x0 or noise requires grad)"
        )
    # q_sample has a backward of its own (_QSample): the fused kernels serve it when autograd records too
    backend = resolve("q_sample", backend, x0.device, False, x0.dtype)
    be = module(backend)
    given = {"x0": x0, "noise": noise, "t": t, "coefficients": coefficients}
    t = C.timesteps(t, B, len(s), be.timestep_device(t, x0.device), data=("x0", x0.device))
    coefficients = C.coefficient_table("coefficients", coefficients, B, 2)
    C.outputs({"out": out}, given, in_place=("x0", "noise"))  # elementwise: out may be x0 or noise
    if backend != "torch":
        C.tensor("x0", x0, dtypes=C.FUSED_DTYPES)
    if needs_grad and backend != "torch":
        return _QSample.apply(
            x0,
            noise,
            t,
            s,
            coefficients,
            lambda: be.q_sample(
                x0.detach(), t, None if drawn else noise.detach(), s, seed, sample_offset, coefficients, None
            ),
        )
    return be.q_sample(x0, t, None if drawn else noise, s, seed, sample_offset, coefficients, out)


class _QSample(torch.autograd.Function):
    """q_sample on a fused kernel with its gradient: x_t = a_t x_0 + b_t eps is linear, so dL/dx_0 = a_t g and
    dL/deps = b_t g per sample (a_t, b_t from the float64 schedule, or the given coefficient table). A drawn eps
    is returned as a constant (no gradient)."""

    @staticmethod
    def forward(ctx, x0, noise, t, schedule, coefficients, run):
        result = run()
        ctx.save_for_backward(t, coefficients)
        ctx.schedule = schedule
        if isinstance(result, tuple):
            ctx.mark_non_differentiable(result[1])
        return result

    @staticmethod
    def backward(ctx, grad, *unused):
        t, coefficients = ctx.saved_tensors
        if coefficients is not None:
            a, b = coefficients[:, 0].double(), coefficients[:, 1].double()
        else:
            tc = t.cpu()
            a, b = ctx.schedule.sqrt_alphas_cumprod[tc], ctx.schedule.sqrt_one_minus_alphas_cumprod[tc]
        shape = (-1,) + (1,) * (grad.dim() - 1)

        def scaled(c):
            return grad * c.to(grad.device, torch.float32).view(shape).to(grad.dtype)

        return (
            scaled(a) if ctx.needs_input_grad[0] else None,
            scaled(b) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )


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
    be = module(backend)
    given = {"x_t": x_t, "model_output": model_output, "noise": noise, "t": t, "t_prev": t_prev}
    given["coefficients"] = coefficients
    data = ("x_t", x_t.device)
    t = C.timesteps(t, B, len(s), be.timestep_device(t, x_t.device), data=data)
    if t_prev is not None:
        t_prev = C.previous_timesteps(t_prev, t, len(s), data=data)
    coefficients = C.coefficient_table("coefficients", coefficients, B, 7)
    # elementwise (every backend reads an element's inputs before writing its outputs): out and x0_out may each be
    # x_t, model_output or noise, but not each other
    C.outputs({"out": out, "x0_out": x0_out}, given, in_place=("x_t", "model_output", "noise"))
    if backend != "torch":
        C.tensor("x_t", x_t, dtypes=C.FUSED_DTYPES)
    return be.ddpm_step(
        x_t,
        model_output,
        noise,
        t,
        t_prev,
        s,
        seed=seed,
        sample_offset=sample_offset,
        variance_type=variance_type,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_range=clip_range,
        coefficients=coefficients,
        out=out,
        x0_out=x0_out,
    )


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
    k = ddim_coefficients(t, t_prev, s, prediction_type, eta, bool(use_clipped_model_output))
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


def dpmpp_step(
    x_t,
    model_output,
    t,
    t_prev,
    schedule,
    x0_last=None,
    t_last=None,
    *,
    x0_last2=None,
    t_last2=None,
    sde=False,
    noise=None,
    seed=None,
    sample_offset=0,
    prediction_type="epsilon",
    solver_type="midpoint",
    coefficients=None,
    backend=None,
    out=None,
    x0_out=None,
):
    """One DPM-Solver++ multistep step x_t -> x_{t_prev} (Lu et al. 2022, data prediction, no thresholding);
    returns ``(x_{t_prev}, x0)``, x0 the data prediction D0 to pass as ``x0_last`` to the next step.

    First order (DDIM's update) without ``x0_last``; second order ("2M") with ``x0_last``, the x0 returned by the
    previous step, taken at timestep ``t_last`` (> t); third order ("3M") with ``x0_last2`` and ``t_last2`` (> t_last)
    from the step before that as well. ``solver_type``: "midpoint" or "heun" (diffusers' names; order 3 has one
    form). ``sde=True`` runs SDE-DPM-Solver++ (diffusers' "sde-dpmsolver++"): the update adds
    sigma_t' sqrt(1 - e^{-2h}) z with z = ``noise``, or keyed noise from ``seed`` and ``sample_offset`` (stream 0
    at step t, as :func:`ddpm_step`'s) when ``noise`` is None. ``t_prev`` = -1 steps to x_0, and that step is first
    order and noiseless. t, t_prev, t_last, t_last2: ints or (B,) integer tensors. The formulas are in
    ddpm_fast/reference/dpmpp_step.py. One pass over memory: reads x_t, model_output, the history (and noise),
    writes the result and x0 (``out`` and ``x0_out`` may be the inputs: a chain runs in place).

    ``coefficients``: an optional table of rows [px, pm, q, a_x, a_0, a_d] (B, 6) or [..., a_e, rho, a_z] (B, 9)
    (x0 = (px x_t + pm m) q, result = a_x x_t + a_0 x0 + a_d (x0 - x0_last)
    + a_e ((x0 - x0_last) - rho (x0_last - x0_last2)) + a_z z) used instead of the schedule's, e.g. a drop-in
    scheduler's own numbers; t_prev, t_last, t_last2 and sde are then not used (a_z != 0 draws z as above).
    """
    s = C.schedule(schedule)
    x_t = C.tensor("x_t", x_t)
    group = {"x_t": x_t, "model_output": model_output, "x0_last": x0_last, "x0_last2": x0_last2, "noise": noise}
    group.update(out=out, x0_out=x0_out)
    C.alike(group, required=("model_output",))
    C.choice("prediction_type", prediction_type, C.PREDICTION_TYPES)
    C.choice("solver_type", solver_type, SOLVER_TYPES)
    if not isinstance(sde, bool):
        raise TypeError(f"sde: expected a bool, got {type(sde).__name__}")
    B = x_t.shape[0]
    data = ("x_t", x_t.device)
    given = {"x_t": x_t, "model_output": model_output, "x0_last": x0_last, "x0_last2": x0_last2, "noise": noise}
    given.update(t=t, t_prev=t_prev, t_last=t_last, t_last2=t_last2, coefficients=coefficients)
    t = C.timesteps(t, B, len(s), "cpu", data=data)  # the coefficients are computed on the host
    t_prev = C.previous_timesteps(t_prev, t, len(s), data=data)
    if x0_last2 is not None and x0_last is None:
        raise ValueError("x0_last: the third-order step needs x0_last beside x0_last2")
    if coefficients is None:
        for hist, when in (("x0_last", "t_last"), ("x0_last2", "t_last2")):
            if (given[hist] is None) != (given[when] is None):
                missing = when if given[when] is None else hist
                order = "second" if hist == "x0_last" else "third"
                raise ValueError(
                    f"{missing}: the {order}-order step needs both {hist} and {when} (neither: lower order)"
                )
        if t_last is not None:
            t_last = C.timesteps(t_last, B, len(s), "cpu", name="t_last", data=data)
            if (t_last <= t).any():
                raise ValueError("t_last: every last timestep must be larger than its t (the previous step's)")
        if t_last2 is not None:
            t_last2 = C.timesteps(t_last2, B, len(s), "cpu", name="t_last2", data=data)
            if (t_last2 <= t_last).any():
                raise ValueError("t_last2: every timestep must be larger than its t_last (the step before's)")
        k = dpmpp_coefficients(t, t_prev, s, prediction_type, t_last, solver_type, t_last2, sde)  # float64
    else:
        width = coefficients.shape[-1] if isinstance(coefficients, torch.Tensor) and coefficients.dim() else 6
        k = C.coefficient_table("coefficients", coefficients, B, width if width in (6, 9) else 6)
        if x0_last is None and bool((k[:, 5:7] != 0).any()):
            raise ValueError("x0_last: coefficients has a second-order term (a_d != 0) but no x0_last was given")
        if x0_last2 is None and width == 9 and bool((k[:, 6] != 0).any()):
            raise ValueError("x0_last2: coefficients has a third-order term (a_e != 0) but no x0_last2 was given")
    k = full_row(k)
    draw = noise is None and bool((k[:, 8] != 0).any())
    seed = C.seed_value(seed) if draw else 0
    sample_offset = C.sample_offset(sample_offset, B)
    # elementwise (every backend reads an element's inputs before writing its outputs): out and x0_out may each be
    # an input, but not each other
    C.outputs({"out": out, "x0_out": x0_out}, given, in_place=("x_t", "model_output", "x0_last", "x0_last2", "noise"))
    tensors = (x_t, model_output, x0_last, x0_last2, noise)
    backend = resolve("dpmpp_step", backend, x_t.device, _needs_grad(*tensors), x_t.dtype)
    if backend != "torch":
        C.tensor("x_t", x_t, dtypes=C.FUSED_DTYPES)
        k = k.to(torch.float32).contiguous()  # the kernels' table; the reference keeps float64 for float64 data
    history = tuple(h for h in (x0_last, x0_last2) if h is not None)
    return module(backend).dpmpp_step(
        x_t, model_output, history, k, out, x0_out, noise=noise, t=t if draw else None, seed=seed,
        sample_offset=sample_offset,
    )  # fmt: skip


def unipc_step(
    x_t,
    model_output,
    coefficients,
    x0_history=(),
    last_sample=None,
    *,
    backend=None,
    out=None,
    x0_out=None,
    sample_out=None,
):
    """One UniPC step (Zhao et al. 2023; diffusers' UniPCMultistepScheduler.step, predict_x0): the corrector UniC
    and the predictor UniP in one pass over memory. Returns ``(x_next, x0, y)``: x0 = D0 the data prediction of
    ``model_output`` at x_t, y the corrected sample (x_t where there is no corrector; the next step's
    ``last_sample``), x_next the predictor's result from y.

    ``coefficients``: the (B, 14) rows [px, pm, q, a_x, a_0, a_d, a_e, rho, a_z, c_l, c_1, c_d, c_e, c_f] of
    ddpm_fast/reference/unipc_step.py (``unipc_coefficients`` from a schedule, or a drop-in's own numbers):
    D0 = (px x_t + pm m) q, y = c_l L + c_1 D1 + c_d (D0 - D1) + c_e (D1 - D2) + c_f (D1 - D3),
    x_next = a_x y + a_0 D0 + a_d (D0 - D1) + a_e ((D0 - D1) - rho (D1 - D2)) + a_z z. ``x0_history``: the earlier
    steps' D (D1, D2, D3, newest first), as many as the rows read; ``last_sample`` L: the previous step's y, given
    exactly where the rows have a corrector. No noise (a_z must be 0). ``out``, ``x0_out`` and ``sample_out`` may be
    inputs (elementwise), not each other.
    """
    x_t = C.tensor("x_t", x_t)
    if not isinstance(x0_history, (tuple, list)) or len(x0_history) > 3:
        raise ValueError("x0_history: expected a tuple of at most 3 tensors (D1, D2, D3, newest first)")
    names = [f"x0_history[{i}]" for i in range(len(x0_history))]
    group = {"x_t": x_t, "model_output": model_output, **dict(zip(names, x0_history)), "last_sample": last_sample}
    group.update(out=out, x0_out=x0_out, sample_out=sample_out)
    for name in names:
        if group[name] is None:
            raise ValueError(f"{name}: expected a tensor, got None")
    C.alike(group, required=("model_output",))
    B = x_t.shape[0]
    k = C.coefficient_table("coefficients", coefficients, B, 14)
    if k is None:
        raise ValueError("coefficients: expected the (B, 14) rows of ddpm_fast.reference.unipc_coefficients")
    if bool((k[:, 8] != 0).any()):
        raise ValueError("coefficients: UniPC adds no noise (a_z, column 8, must be 0)")
    corrected = bool((k[:, 9:] != 0).any())
    if corrected != (last_sample is not None):
        raise ValueError(
            "last_sample: the rows have a corrector (c_* != 0) but no last_sample was given"
            if corrected
            else "last_sample: given, but the rows have no corrector (c_* all 0)"
        )
    need = history_read(k, corrected)
    if len(x0_history) < need:
        raise ValueError(f"x0_history: the rows read {need} earlier data predictions, {len(x0_history)} given")
    inputs = {"x_t": x_t, "model_output": model_output, **dict(zip(names, x0_history)), "last_sample": last_sample}
    C.outputs({"out": out, "x0_out": x0_out, "sample_out": sample_out}, inputs, in_place=tuple(inputs))
    tensors = (x_t, model_output, last_sample, *x0_history)
    backend = resolve("dpmpp_step", backend, x_t.device, _needs_grad(*tensors), x_t.dtype)
    if backend != "torch":
        C.tensor("x_t", x_t, dtypes=C.FUSED_DTYPES)
    if last_sample is None:  # no corrector: y is x_t, taken before the kernel (out may be x_t)
        if sample_out is not None:
            y = sample_out.copy_(x_t)
        else:
            y = x_t.clone() if out is not None and C.overlap(out, x_t) else x_t
        result, x0 = module(backend).dpmpp_step(x_t, model_output, tuple(x0_history[:need]), k, out, x0_out)
        return result, x0, y
    return module(backend).dpmpp_step(
        x_t, model_output, tuple(x0_history[:need]), k, out, x0_out, last_sample=last_sample, sample_out=sample_out
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
    if not isinstance(memory_format, torch.memory_format) or memory_format not in MEMORY_FORMATS:
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
    be = module(backend)
    data = ("out" if out is not None else "device", device)
    t = C.timesteps(t, B, 2**32, be.timestep_device(t, device), data=data)
    if backend != "torch" and dtype not in C.FUSED_DTYPES:
        raise TypeError(f"dtype: the {backend} backend supports float32/float16/bfloat16, got {dtype}")
    return be.keyed_normal(shape, t, seed, int(stream), sample_offset, dtype, device, memory_format, out)


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
    needs_grad = _needs_grad(x, weight, bias, add)
    requested = backend
    backend = resolve("group_norm_silu", requested, x.device, needs_grad, x.dtype)
    if needs_grad and out is None and resolve("group_norm_silu", requested, x.device, False, x.dtype) == "cpu":
        cpu = module("cpu")
        if cpu.has_group_norm_backward(x, weight, bias, add):  # fp32: the cpu kernels have a backward
            return _GroupNormSiLU.apply(x, weight, bias, add, num_groups, float(eps), bool(silu))
    if backend != "torch":
        C.tensor("x", x, min_dim=2, dtypes=C.FUSED_DTYPES)
    return module(backend).group_norm_silu(x, num_groups, weight, bias, eps, bool(silu), add, out)


class _GroupNormSiLU(torch.autograd.Function):
    """group_norm_silu on the cpu kernels with their backward (csrc/cpu/group_norm_backward.cpp): two passes over
    x and the gradient from the saved per-group mean and rstd. From its per-channel sums S0 = sum x,
    S1 = sum dy, S2 = sum dy * xhat: d(weight) = sum_b S2, d(bias) = sum_b S1, and d(add)[b, c] = sum_hw dx =
    rstd (w S1 - HW m1 - m2 sum_hw xhat) with m1, m2 the group means of w S1 / HW and w S2 / HW."""

    @staticmethod
    def forward(ctx, x, weight, bias, add, groups, eps, silu):
        cpu = module("cpu")
        out, xd, mean, rstd = cpu.group_norm_silu_train(x, groups, weight, bias, eps, silu, add)
        ctx.save_for_backward(xd, weight, bias, add, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: it says so if asked
    def backward(ctx, grad):
        xd, weight, bias, add, mean, rstd = ctx.saved_tensors
        grad_x, sums = module("cpu").group_norm_silu_backward(
            xd, grad, ctx.groups, weight, bias, add, mean, rstd, ctx.silu
        )
        B, Cn = xd.shape[:2]
        G = ctx.groups
        hw = xd.numel() // (B * Cn)
        s0, s1, s2 = sums.unbind(-1)
        d_add = None
        if ctx.needs_input_grad[3]:
            w = weight.float() if weight is not None else torch.ones(Cn)

            def per_channel(v):  # (B, G) -> (B, C)
                return v.repeat_interleave(Cn // G, dim=1)

            m1 = per_channel((w * s1).view(B, G, -1).sum(-1) / (hw * Cn // G))
            m2 = per_channel((w * s2).view(B, G, -1).sum(-1) / (hw * Cn // G))
            r, mu = per_channel(rstd), per_channel(mean)
            sum_xhat = (s0 + hw * (add.float() - mu)) * r
            d_add = (r * (w * s1 - hw * m1 - m2 * sum_xhat)).to(add.dtype)
        return (
            grad_x.to(xd.dtype) if ctx.needs_input_grad[0] else None,
            s2.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None,
            s1.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None,
            d_add,
            None,
            None,
            None,
        )


def attention(q, k, v, *, scale=None, residual=None, backend=None, out=None):
    """softmax(q k^T * scale) v (+ residual) for (B, H, N, D) q, k, v of any strides; scale=None: 1/sqrt(D).

    Under autograd (no ``out``) the cpu backend runs its fused forward, keeping each query's log-sum-exp, and a
    flash-style backward that recomputes the softmax block by block (:class:`_Attention`); other backends run the
    reference then.
    """
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
    tensors = {"q": q, "k": k, "v": v, "residual": residual}
    needs_grad = _needs_grad(q, k, v, residual)
    requested = backend
    backend = resolve("attention", requested, q.device, needs_grad, q.dtype, **tensors)
    if needs_grad and out is None and resolve("attention", requested, q.device, False, q.dtype, **tensors) == "cpu":
        if module("cpu").has_attention_backward():  # the cpu kernels have a backward
            C.tensor("q", q, min_dim=4, dtypes=C.FUSED_DTYPES)
            return _Attention.apply(q, k, v, residual, 1.0 / math.sqrt(q.shape[3]) if scale is None else scale)
    if backend != "torch":
        C.tensor("q", q, min_dim=4, dtypes=C.FUSED_DTYPES)
    return module(backend).attention(q, k, v, scale, residual, out)


class _Attention(torch.autograd.Function):
    """attention on the cpu kernels with their flash-style backward (csrc/cpu/attention_backward.cpp).

    The forward keeps o = softmax(q k^T * scale) v (before the residual, added here) and each query's log-sum-exp
    lse_i = ln sum_j exp(scale q_i k_j): the backward recomputes P = exp(q k^T * scale - lse) block by block (no
    N x M matrix kept) and forms, with D_i = sum_c dO_ic o_ic, dS = P (dO v^T - D): dv = P^T dO, dq = scale dS k,
    dk = scale dS^T q; d(residual) = dO. fp16/bf16 tensors run the fp32 kernels on converted copies, their
    gradients rounded back once."""

    @staticmethod
    def forward(ctx, q, k, v, residual, scale):
        o, lse, qf, kf, vf = module("cpu").attention_train(q, k, v, scale)
        ctx.save_for_backward(qf, kf, vf, o, lse)
        ctx.scale = scale
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        out = o if residual is None else o + residual
        return out if out.dtype == q.dtype else out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: it says so if asked
    def backward(ctx, grad):
        qf, kf, vf, o, lse = ctx.saved_tensors
        grads = module("cpu").attention_backward(qf, kf, vf, o, lse, grad, ctx.scale)
        dq, dk, dv = (
            g.to(dtype) if needed else None for g, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad)
        )
        return dq, dk, dv, grad if ctx.needs_input_grad[3] else None, None


def winograd_weight(weight, tile=2):
    """The Winograd transform of a (K, C, 3, 3) fp32 weight: F(2x2, 3x3) (``tile=2``, shape (16, C, K)) or
    F(4x4, 3x3) (``tile=4``, shape (36, C, K)); compute it once per weight and pass it to :func:`conv3x3` as
    ``packed``, which then runs that tile size."""
    weight = C.tensor("weight", weight, min_dim=4, dtypes=(torch.float32,))
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight: expected shape (K, C, 3, 3), got {tuple(weight.shape)}")
    if weight.device.type != "cpu":
        raise ValueError(f"weight: the Winograd kernel runs on the CPU, got a weight on {weight.device}")
    if isinstance(tile, bool) or tile not in (2, 4):
        raise ValueError(f"tile: expected 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got {tile!r}")
    return module("cpu").winograd_weight(weight, int(tile))


def winograd_weight_bf16(weight):
    """The Winograd F(2x2, 3x3) transform of a (K, C, 3, 3) weight for bf16 :func:`conv3x3`: computed in fp32 from
    the weight, rounded to bf16 once and packed for the bf16 products (VNNI pairs of input channels, blocks of
    64 output channels): a bf16 tensor of shape (16, ceil(K / 64), ceil(C / 2), 64, 2)."""
    weight = C.tensor("weight", weight, min_dim=4, dtypes=(torch.float32, torch.bfloat16))
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight: expected shape (K, C, 3, 3), got {tuple(weight.shape)}")
    if weight.device.type != "cpu":
        raise ValueError(f"weight: the Winograd kernel runs on the CPU, got a weight on {weight.device}")
    return module("cpu").winograd_weight_bf16(weight)


def conv3x3(x, weight, bias=None, residual=None, *, packed=None, backend=None, out=None):
    """3x3 convolution, stride 1, padding 1 (+ residual), i.e. ``F.conv2d(x, weight, bias, padding=1) + residual``.

    The ``cpu`` backend runs Winograd F(2x2, 3x3) on fp32 or bf16 channels_last activations (other layouts are
    copied to channels_last once); ``packed``: :func:`winograd_weight` of ``weight`` (bf16 x:
    :func:`winograd_weight_bf16`), to skip its transform per call; an fp32 ``winograd_weight(weight, tile=4)``
    runs F(4x4, 3x3) instead. bf16 runs its products in bf16 with fp32
    accumulation where the CPU has AVX512-BF16 or AMX-BF16 (``ddpm_fast.backends()["cpu"]`` says), else the fp32
    kernel on converted tensors; transforms, bias and residual are fp32 either way.
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
    if packed is not None and x.dtype == torch.bfloat16:
        C.tensor("packed", packed, dtypes=(torch.bfloat16,))
        shape = (16, -(-K // 64), -(-Cin // 2), 64, 2)
        if packed.device.type != "cpu" or tuple(packed.shape) != shape:
            raise ValueError(
                f"packed: expected winograd_weight_bf16(weight), a CPU tensor of shape {shape}, "
                f"got shape {tuple(packed.shape)} on {packed.device}"
            )
    elif packed is not None:
        C.tensor("packed", packed, dtypes=(torch.float32,))
        if packed.device.type != "cpu" or tuple(packed.shape) not in ((16, Cin, K), (36, Cin, K)):
            raise ValueError(
                f"packed: expected winograd_weight(weight), a CPU tensor of shape (16, {Cin}, {K}) (or (36, {Cin}, "
                f"{K}) for tile=4), "
                f"got shape {tuple(packed.shape)} on {packed.device}"
            )
    # out may be the residual (added elementwise) or x (the kernel then writes a buffer of its own)
    inputs = {"x": x, "weight": weight, "bias": bias, "residual": residual, "packed": packed}
    C.outputs({"out": out}, inputs, in_place=("x", "residual"))
    backend = resolve("conv3x3", backend, x.device, _needs_grad(x, weight, bias, residual), x.dtype)
    return module(backend).conv3x3(x, weight, bias, residual, packed, out)


def _pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    items = value if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return int(items[0]), int(items[1])


def conv2d(
    x,
    weight,
    bias=None,
    residual=None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    prepared=None,
    backend=None,
    out=None,
):
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual``, zero padding.

    The ``cpu`` backend runs 3x3 stride-1 convolutions with at least 16 channels a side in Winograd F(2x2, 3x3)
    (:func:`conv3x3`) and the others in oneDNN with a reordered weight, on channels_last fp32 activations (other
    layouts are copied to channels_last once); the GPU backends run cuDNN. ``prepared``: an :class:`Prepared` the
    backend keeps its transformed weight in between calls (rebuilt when the weight changes). ``padding`` may be
    ``"valid"`` or ``"same"`` (the reference then runs).

    Under autograd (fp32, no ``out``) the cpu backend runs the same forward kernels and a backward
    (:class:`_Conv2d`): a 3x3 stride-1 Winograd layer's data gradient on the Winograd kernel, a 1x1 layer's gradients
    as GEMMs, the other weight and bias gradients (and the other layers' data gradient) in ATen's
    convolution_backward; other backends run the reference.
    There ``prepared`` is not used: an optimizer step changes the weight, so the transforms are built for each call
    and freed with it (kept, they would add 8x the 3x3 weights to a training step's memory).
    """
    x = C.tensor("x", x, min_dim=4)
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (N, C, H, W), got {tuple(x.shape)}")
    group = {"x": x, "weight": weight, "bias": bias, "residual": residual, "out": out}
    C.alike(group, same=("device", "dtype"), required=("weight",))
    weight = C.tensor("weight", weight, min_dim=4)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups <= 0:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    groups = int(groups)
    N, Cin, H, W = x.shape
    if Cin % groups:
        raise ValueError(f"groups: x's {Cin} channels are not divisible by groups={groups}")
    if weight.dim() != 4 or weight.shape[1] * groups != Cin or weight.shape[0] % groups:
        raise ValueError(
            f"weight: expected shape (K, {Cin} / groups, kh, kw) with K divisible by groups={groups} "
            f"(x has {Cin} channels), got {tuple(weight.shape)}"
        )
    K, _, kh, kw = weight.shape
    if bias is not None and tuple(bias.shape) != (K,):
        raise ValueError(f"bias: expected shape ({K},) (weight's {K} output channels), got {tuple(bias.shape)}")
    stride = _pair("stride", stride, minimum=1)
    dilation = _pair("dilation", dilation, minimum=1)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding: expected an int, a pair of ints, 'valid' or 'same', got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding: 'same' needs stride 1, got stride {stride}")
        pad = (0, 0) if padding == "valid" else None
    else:
        padding = pad = _pair("padding", padding, minimum=0)
    if pad is None:
        out_hw = (H, W)
    else:
        out_hw = tuple(
            (n + 2 * p - d * (k - 1) - 1) // st + 1 for n, p, d, k, st in zip((H, W), pad, dilation, (kh, kw), stride)
        )
    if min(out_hw) <= 0:
        raise ValueError(f"x: {H}x{W} is smaller than the {kh}x{kw} kernel (dilation {dilation}) after padding {pad}")
    for name, y in (("residual", residual), ("out", out)):
        if y is not None and tuple(y.shape) != (N, K, *out_hw):
            raise ValueError(
                f"{name}: expected shape {(N, K, *out_hw)} (the convolution's output), got {tuple(y.shape)}"
            )
    if prepared is not None and not isinstance(prepared, Prepared):
        raise TypeError(f"prepared: expected a ddpm_fast.ops.Prepared, got {type(prepared).__name__}")
    # out may be the residual (added elementwise) or x (the kernels then write a buffer of their own)
    C.outputs({"out": out}, {"x": x, "weight": weight, "bias": bias, "residual": residual}, in_place=("x", "residual"))
    needs_grad = _needs_grad(x, weight, bias, residual)
    requested = backend
    backend = resolve("conv2d", requested, x.device, needs_grad, x.dtype, padding=padding)
    if (
        needs_grad
        and out is None
        and _cpu_backward("conv2d", requested, x, (x, weight, bias, residual), padding=padding)
    ):
        return _Conv2d.apply(x, weight, bias, residual, stride, padding, dilation, groups)
    return module(backend).conv2d(x, weight, bias, residual, stride, padding, dilation, groups, prepared, out)


class _Conv2d(torch.autograd.Function):
    """conv2d on the cpu kernels (Winograd or oneDNN forward) with a backward for y = conv(x, w) + b + residual:

    - dx: for a 3x3 stride-1 pad-1 layer with enough channels, dx = conv3x3(dy, w_rot) with
      w_rot[c, k, i, j] = w[k, c, 2 - i, 2 - j] (the transposed convolution of a stride-1 "same" 3x3 is the forward
      convolution with the flipped, channel-swapped kernel), on the forward's Winograd kernel; 1x1 layers: a GEMM
      over the pixels; other layers (strided, few channels): ATen's convolution_backward.
    - dw[k, c, i, j] = sum_{n,h,w} dy[n, k, h, w] x_pad[n, c, s h + d i, s w + d j] (stride s, dilation d) and
      db[k] = sum_{n,h,w} dy[n, k, h, w]: ATen's convolution_backward (oneDNN) with output_mask (False, True, True),
      (True, True, True) for the layers whose dx it computes too; for a 1x1 layer, GEMMs (dw = dy^T x over pixels).
    - d(residual) = dy.
    The forward keeps x in channels_last (the layout the kernels read) and the weight; no double backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, dilation, groups):
        out, xd = module("cpu").conv2d_train(x, weight, bias, residual, stride, padding, dilation, groups)
        ctx.save_for_backward(xd, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: it says so if asked
    def backward(ctx, grad):
        xd, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dw, db = module("cpu").conv2d_backward(grad, xd, weight, ctx.has_bias, *ctx.geometry, needs[:3])
        return dx, dw, db, grad if needs[3] else None, None, None, None, None


def linear(x, weight, bias=None, residual=None, *, scratch=None, backend=None, out=None):
    """``F.linear(x, weight, bias) + residual``: x (..., in), weight (out, in), one GEMM.

    The ``cpu`` backend runs fp32 in oneDNN's linear (the residual as its post-op) where the extension runs its
    GEMMs in oneDNN, else in the BLAS torch links; the GPU backends in cuBLAS. ``scratch``: a
    :meth:`Scratch.slot` the op may return its result in instead of a fresh tensor (valid until that slot's next
    use; inference only), or None.

    Under autograd (fp32, no ``out``) the cpu backend runs the same forward and a backward (:class:`_Linear`): the
    data gradient in oneDNN, the weight gradient in the BLAS; other backends run the reference.
    """
    x = C.tensor("x", x, min_dim=1)
    C.alike(
        {"x": x, "weight": weight, "bias": bias, "residual": residual, "out": out},
        same=("device", "dtype"),
        required=("weight",),
    )
    weight = C.tensor("weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight: expected shape (out_features, {x.shape[-1]}) (x's last dim), got {tuple(weight.shape)}"
        )
    K = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (K,):
        raise ValueError(f"bias: expected shape ({K},) (weight's {K} output features), got {tuple(bias.shape)}")
    out_shape = (*x.shape[:-1], K)
    for name, y in (("residual", residual), ("out", out)):
        if y is not None and tuple(y.shape) != out_shape:
            raise ValueError(
                f"{name}: expected shape {out_shape} (x's leading dims and {K} features), got {tuple(y.shape)}"
            )
    if scratch is not None and not isinstance(scratch, ScratchSlot):
        raise TypeError(
            f"scratch: expected a slot of a ddpm_fast.ops.Scratch (Scratch.slot(name)), got {type(scratch).__name__}"
        )
    # out may be the residual (added elementwise), never x or weight: the GEMM reads them all while it writes
    C.outputs({"out": out}, {"x": x, "weight": weight, "bias": bias, "residual": residual}, in_place=("residual",))
    needs_grad = _needs_grad(x, weight, bias, residual)
    requested = backend
    backend = resolve("linear", requested, x.device, needs_grad, x.dtype)
    if needs_grad and out is None and _cpu_backward("linear", requested, x, (x, weight, bias, residual)):
        return _Linear.apply(x, weight, bias, residual)
    return module(backend).linear(x, weight, bias, residual, None if needs_grad else scratch, out)


class _Linear(torch.autograd.Function):
    """linear on the cpu GEMMs with a backward for y = x W^T + b + residual, over the rows x2 = x.reshape(-1, in):
    dx = dy W, dW = dy^T x2, db = the column sums of dy, d(residual) = dy (:func:`_cpu.linear_backward`). The
    forward keeps x and the weight; no double backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return module("cpu").linear(x, weight, bias, residual, None, None)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: it says so if asked
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dw, db = module("cpu").linear_backward(grad, x, weight, ctx.has_bias, needs[:3])
        return dx, dw, db, grad if needs[3] else None
