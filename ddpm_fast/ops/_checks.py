"""Input validation shared by every op: readable ValueError/TypeError naming the argument, before any kernel."""

from __future__ import annotations

import math
import numbers

import torch

from ..schedule import NoiseSchedule
from ._layout import FUSED_DTYPES, REFERENCE_DTYPES  # noqa: F401 - FUSED_DTYPES used as C.FUSED_DTYPES

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
META = torch.device("meta")


def _strided(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")


def tensor(name: str, x, *, min_dim: int = 1, dtypes=REFERENCE_DTYPES) -> torch.Tensor:
    _strided(name, x)
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")
    return x


def listing(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


OUTPUTS = ("out", "x0_out")


def _odd_one_out(values: dict):
    """(name, expected value, names holding it) for the first argument whose value differs from the most common
    one; (name, None, None) on a tie (no value is held by more arguments than any other); None when all agree."""
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) <= 1:
        return None
    counts = [sum(v == d for v in values.values()) for d in distinct]
    majority = [d for d, c in zip(distinct, counts) if c == max(counts)]
    if len(majority) > 1:
        return next(name for name, v in values.items() if v != next(iter(values.values()))), None, None
    return (
        next(name for name, v in values.items() if v != majority[0]),
        majority[0],
        [name for name, v in values.items() if v == majority[0]],
    )


def _invalid_alone(what: str, value) -> bool:
    """A value wrong whatever the other arguments hold: a dtype no op takes, or no data (meta) beside data."""
    return value not in REFERENCE_DTYPES if what == "dtype" else what == "device" and value == META


def alike(group: dict, *, same=("device", "dtype", "shape"), required=()) -> None:
    """The tensors of ``group`` (name -> tensor or None, the op's main input first; None only for names not in
    ``required``) must share device, dtype and shape (those named in ``same``).

    The error names the argument at fault: among the inputs, the one that differs from most of the others (so a
    wrong main input is named as such), or on a tie one invalid on its own (an integer dtype, a meta tensor beside
    real ones), else both; an output (``out``, ``x0_out``) that differs from the inputs is always the one at fault.
    """
    present = []
    for name, x in group.items():
        if x is not None or name in required:
            _strided(name, x)
            present.append((name, x))
    for what in same:
        first = getattr(present[0][1], what)
        if any(getattr(x, what) != first for _, x in present[1:]):
            _mismatch(what, {name: getattr(x, what) for name, x in present})


def _mismatch(what: str, values: dict) -> None:
    """Raises the error of alike for arguments whose ``what`` (device, dtype or shape) differ."""
    inputs = {k: v for k, v in values.items() if k not in OUTPUTS}
    found = _odd_one_out(inputs)
    if found is None:  # the inputs agree: an output that differs is wrong
        ref = next(iter(inputs.values()))
        found = next(k for k, v in values.items() if v != ref), ref, list(inputs)
    name, expected, holders = found
    if holders is None:  # a tie between inputs
        alone = [k for k, v in inputs.items() if _invalid_alone(what, v)]
        if 0 < len(alone) < len(inputs):
            name = alone[0]
            holders = [k for k in inputs if k not in alone][:1]
            expected = inputs[holders[0]]
    error = TypeError if what == "dtype" else ValueError
    got = values[name]
    if holders is None:
        first = next(iter(inputs))
        show = (lambda v: tuple(v)) if what == "shape" else str  # noqa: E731
        raise error(f"{first} and {name}: {what}s differ ({first}: {show(inputs[first])}, {name}: {show(got)})")
    if what == "device":
        verb = "is" if len(holders) == 1 else "are"
        raise error(f"{name}: on {got} but {listing(holders)} {verb} on {expected}")
    if what == "dtype":
        raise error(f"{name}: dtype {got} does not match {listing(h + chr(39) + 's' for h in holders)} {expected}")
    raise error(f"{name}: expected shape {tuple(expected)} like {listing(holders)}, got {tuple(got)}")


def parameter(name: str, p, x: torch.Tensor):
    """None, or a per-channel parameter of shape (C,) for x's C channels (dim 1): x's device and dtype, or float32
    beside a float16/bfloat16 x (mixed precision)."""
    if p is None:
        return None
    _strided(name, p)
    if p.device != x.device:
        raise ValueError(f"{name}: on {p.device} but x is on {x.device}")
    low = x.dtype in (torch.float16, torch.bfloat16)
    if p.dtype != x.dtype and not (low and p.dtype == torch.float32):
        also = " or float32" if low else ""
        raise TypeError(f"{name}: dtype {p.dtype} does not match x's {x.dtype}{also}")
    if p.dim() != 1 or p.shape[0] != x.shape[1]:
        C = x.shape[1]
        raise ValueError(
            f"{name}: expected shape ({C},) (x's {C} channels, dim 1 of its shape {tuple(x.shape)}), got {tuple(p.shape)}"
        )
    return p


# ----------------------------------------------------------------------------------------------- memory overlap
# PyTorch's rules for out= (at::assert_no_internal_overlap, at::assert_no_partial_overlap, at::assert_no_overlap):
# an output may not have two elements at one address (an expanded, stride-0 tensor); it may be the very same
# tensor as an input (same address, sizes and strides) only where the op is safe in place, and may not overlap an
# input otherwise; two outputs may not overlap at all. PyTorch decides only dense tensors and lets the others
# ("too hard") pass; here strided ones are decided exactly too, by bounded integer search over the strides.
_SEARCH_BUDGET = 100_000


def _reachable(terms, lo: int, hi: int) -> bool:
    """Whether sum(k_i s_i) for integers k_i in [a_i, b_i] can land in [lo, hi], for terms (s_i > 0, a_i, b_i).
    Depth-first over the terms by decreasing stride, each level keeping only the k that leave the rest able to
    reach the interval: exact, and two or three candidates a level for tensors whose strides nest. Past the
    search budget it answers True (may overlap: the caller refuses rather than risk garbage)."""
    terms = sorted(terms, key=lambda term: -term[0])
    n = len(terms)
    low, high = [0] * (n + 1), [0] * (n + 1)  # what terms i.. can add, at least and at most
    for i in range(n - 1, -1, -1):
        s, a, b = terms[i]
        low[i], high[i] = low[i + 1] + a * s, high[i + 1] + b * s
    budget = [_SEARCH_BUDGET]

    def search(i: int, lo: int, hi: int) -> bool:
        if hi < low[i] or lo > high[i]:
            return False
        if i == n:
            return True
        budget[0] -= 1
        if budget[0] < 0:
            return True
        s, a, b = terms[i]
        first = max(a, -((high[i + 1] - lo) // s))  # ceil((lo - high[i+1]) / s)
        last = min(b, (hi - low[i + 1]) // s)
        return any(search(i + 1, lo - k * s, hi - k * s) for k in range(first, last + 1))

    return search(0, lo, hi)


def _span(x: torch.Tensor) -> tuple[int, int]:
    """The first and one past the last byte address x's elements occupy (x not empty)."""
    begin = x.data_ptr()
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return begin, begin + x.numel() * x.element_size()
    return begin, begin + x.element_size() * (1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride())))


def _dims(x: torch.Tensor, sign: int = 1):
    """x's dims that move through memory, as (byte stride, k range) search terms (sign -1: k in [-(n-1), 0])."""
    e = x.element_size()
    return [(s * e, 0, n - 1) if sign > 0 else (s * e, 1 - n, 0) for n, s in zip(x.shape, x.stride()) if n > 1 and s]


def has_internal_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of x share memory (e.g. an expanded, stride-0 dimension)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return False
    if any(n > 1 and s == 0 for n, s in zip(x.shape, x.stride())):
        return True
    dims = sorted(((s, n) for n, s in zip(x.shape, x.stride()) if n > 1), key=lambda d: d[0])
    if all(dims[i][0] >= dims[i - 1][0] * dims[i - 1][1] for i in range(1, len(dims))):
        return False  # nested strides: each dimension steps over the whole span of the smaller ones
    # two index vectors i != j at one address: k = i - j != 0 with sum(k s) = 0; the first nonzero k positive
    for lead in range(len(dims)):
        s, n = dims[lead]
        terms = [(s, 1, n - 1)] + [(s2, 1 - n2, n2 - 1) for s2, n2 in dims[lead + 1 :]]
        if _reachable(terms, 0, 0):
            return True
    return False


def overlap(a: torch.Tensor, b: torch.Tensor, spans=None) -> str | None:
    """None, "same" (the same memory, sizes and strides: elementwise in place) or "partial" (any other overlap).
    ``spans``: a and b's _span, where the caller has them."""
    if a.numel() == 0 or b.numel() == 0:
        return None
    (a0, a1), (b0, b1) = spans or (_span(a), _span(b))
    if a1 <= b0 or b1 <= a0 or a.device != b.device:
        return None
    if a0 == b0 and a.dtype == b.dtype and a.shape == b.shape:
        moving = [(n, s1, s2) for n, s1, s2 in zip(a.shape, a.stride(), b.stride()) if n > 1]
        if all(s1 == s2 for _, s1, s2 in moving):
            return "same"
    ea, eb = a.element_size(), b.element_size()
    # an element of a at byte p and one of b at q overlap where p - q is in (-ea, eb)
    if _reachable(_dims(a) + _dims(b, -1), b0 - a0 - ea + 1, b0 - a0 + eb - 1):
        return "partial"
    return None


def outputs(outs: dict, inputs: dict, *, in_place=()) -> None:
    """PyTorch's memory-overlap rules for an op's out= arguments (name -> tensor or None), against its tensor
    inputs (name -> anything; tensors are checked). ``in_place``: the inputs an output may be the very same tensor
    as (the op is elementwise there, or copes). Checked before any kernel runs; meta tensors have no memory."""
    outs = {k: v for k, v in outs.items() if isinstance(v, torch.Tensor) and not v.is_meta}
    if not outs or torch.compiler.is_compiling():
        return
    inputs = {
        k: (v, _span(v))
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_meta and v.numel()
    }
    names = list(outs)
    for i, name in enumerate(names):
        out = outs[name]
        if out.requires_grad and torch.is_grad_enabled():  # as PyTorch's out= functions: not differentiable
            raise ValueError(f"{name}: requires grad, and out= arguments do not support automatic differentiation")
        if has_internal_overlap(out):
            raise ValueError(
                f"{name}: more than one of its elements refers to the same memory (an expanded or stride-0 tensor); "
                "pass a tensor with memory of its own for every element"
            )
        for other in names[i + 1 :]:
            if overlap(out, outs[other]) is not None:
                raise ValueError(f"{name} and {other}: overlap in memory; pass two tensors that do not")
        span = _span(out)
        for arg, (x, x_span) in inputs.items():
            found = overlap(out, x, (span, x_span))
            if found == "same" and arg not in in_place:
                raise ValueError(
                    f"{name}: is {arg} itself, and this op cannot write {arg} in place; pass another tensor"
                )
            if found == "partial":
                raise ValueError(
                    f"{name}: overlaps {arg} in memory without being {arg} itself (a view into the same storage at "
                    f"another offset or with other strides); pass a tensor that does not share memory with {arg}"
                )


def schedule(s) -> NoiseSchedule:
    if not isinstance(s, NoiseSchedule):
        raise TypeError(f"schedule: expected a ddpm_fast.NoiseSchedule, got {type(s).__name__}")
    return s


def timesteps(
    t, batch: int, num_timesteps: int, device, *, name: str = "t", allow_none: bool = False, data=None
) -> torch.Tensor:
    """t as an int64 tensor of shape (batch,) on ``device``; an int or 0-d tensor applies to every sample.

    allow_none: -1 is allowed too ("no previous step", for t_prev). An int or a CPU tensor is range-checked on the
    host (ValueError). A t already on a GPU is range-checked there, without reading it back: a host read would
    make every step wait for the device, so an out-of-range value fails the device's next synchronisation
    (torch._assert_async) instead of raising here. Any integer dtype is taken (unsigned ones too: their values are
    checked as they are, never wrapped). ``data``: (name, device) of the tensor t indexes; a meta t (no values)
    goes only with meta data, and only where t is not needed on the host.
    """
    if isinstance(t, bool) or not isinstance(t, (numbers.Integral, torch.Tensor)):
        raise TypeError(f"{name}: expected an int or an integer tensor, got {type(t).__name__}")
    lowest = -1 if allow_none else 0
    expected = f"expected values in [{lowest}, {num_timesteps - 1}]"
    if isinstance(t, torch.Tensor):
        if t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
        if t.dim() > 1 or (t.dim() == 1 and t.numel() != batch):
            raise ValueError(f"{name}: expected an int, a 0-d tensor or shape ({batch},), got shape {tuple(t.shape)}")
        target = torch.device(device)
        if t.device.type == "meta":
            data_name, data_device = data if data is not None else ("the data", target)
            if data_device.type != "meta":
                raise ValueError(
                    f"{name}: on the meta device (a tensor without values) but {data_name} is on {data_device}; "
                    f"pass {name} on {data_device}, on the CPU or as an int"
                )
            if target.type != "meta":
                raise ValueError(
                    f"{name}: this op reads {name}'s values on the host, and a meta tensor has none; pass an int"
                )
        # int64 holds every value of the narrower dtypes; uint64 values past 2**63 - 1 wrap to negatives, which the
        # range check refuses (and reports as they were)
        t64 = t.to(torch.int64)
        if t.device.type == "cpu":
            lo, hi = (int(v) for v in torch.aminmax(t64))
            if lo < lowest or hi >= num_timesteps:
                bad = lo if lo < lowest else hi
                if t.dtype == torch.uint64 and bad < 0:
                    bad += 2**64
                raise ValueError(f"{name}: {expected}, got {bad}")
        elif t.device.type == "cuda":
            torch._assert_async(((t64 >= lowest) & (t64 < num_timesteps)).all(), f"{name}: {expected}")
        return t64.to(device=target).reshape(-1).expand(batch).contiguous()
    if t < lowest or t >= num_timesteps:
        raise ValueError(f"{name}: {expected}, got {t}")
    return torch.full((batch,), int(t), dtype=torch.int64, device=device)


def previous_timesteps(t_prev, t: torch.Tensor, num_timesteps: int, *, data=None) -> torch.Tensor:
    """t_prev as an int64 (batch,) tensor beside t: each in [-1, t) (-1: no previous step); checked like t."""
    t_prev = timesteps(t_prev, t.shape[0], num_timesteps, t.device, name="t_prev", allow_none=True, data=data)
    message = "t_prev: every previous timestep must be smaller than its t"
    if t.device.type == "cpu":
        if (t_prev >= t).any():
            raise ValueError(message)
    elif t.device.type == "cuda":
        torch._assert_async((t_prev < t).all(), message)
    return t_prev


def coefficient_table(name: str, c, batch: int, n: int):
    """None, or a contiguous float32 CPU (batch, n) table of finite numbers (one row may be given for all)."""
    if c is None:
        return None
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of shape ({batch}, {n}), got {type(c).__name__}")
    _strided(name, c)
    if not c.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {c.dtype}")
    if c.device.type == "meta":
        raise ValueError(f"{name}: a meta tensor has no values; the coefficients are read on the host")
    if c.dim() == 1 and c.numel() == n:
        c = c.view(1, n).expand(batch, n)
    if tuple(c.shape) != (batch, n):
        raise ValueError(f"{name}: expected shape ({batch}, {n}) or ({n},), got {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError(f"{name}: contains non-finite values")
    return c.to(device="cpu", dtype=torch.float32).contiguous()


def seed_value(seed) -> int:
    """A 64-bit seed; None draws one from torch's default generator (so torch.manual_seed reproduces it)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected 0 <= seed < 2**64, got {seed}")
    return int(seed)


def sample_offset(offset, batch: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"sample_offset: expected an int, got {type(offset).__name__}")
    if offset < 0 or offset + batch > 2**32:
        raise ValueError(f"sample_offset: expected 0 <= sample_offset and sample_offset + batch <= 2**32, got {offset}")
    return int(offset)


def device(name: str, value) -> torch.device:
    """A torch.device from a str, int or device, else a ValueError/TypeError naming the argument."""
    if not isinstance(value, (str, int, torch.device)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a torch.device or a str such as 'cpu' or 'cuda', got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"{name}: {value!r} is not a device ({str(e).split(',')[0]}, ...)") from None


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value


def number(name: str, value, *, positive: bool = False, finite: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)
