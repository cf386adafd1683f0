"""Input validation shared by every op: readable ValueError/TypeError naming the argument, before any kernel."""

from __future__ import annotations

import numbers

import torch

from ..schedule import NoiseSchedule
from ._dispatch import FUSED_DTYPES

REFERENCE_DTYPES = FUSED_DTYPES + (torch.float64,)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


def tensor(name: str, x, *, min_dim: int = 1, dtypes=REFERENCE_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")
    return x


def like(name: str, x, ref: torch.Tensor, ref_name: str, *, shape=None) -> torch.Tensor:
    """x must be a tensor with ref's dtype, device and shape (or ``shape``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.device != ref.device:
        raise ValueError(f"{name}: on {x.device} but {ref_name} is on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} does not match {ref_name}'s {ref.dtype}")
    expected = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(x.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(x.shape)}")
    return x


def schedule(s) -> NoiseSchedule:
    if not isinstance(s, NoiseSchedule):
        raise TypeError(f"schedule: expected a ddpm_fast.NoiseSchedule, got {type(s).__name__}")
    return s


def timesteps(t, batch: int, num_timesteps: int, device, *, name: str = "t", allow_none: bool = False) -> torch.Tensor:
    """t as an int64 tensor of shape (batch,) on ``device``; an int or 0-d tensor applies to every sample.

    allow_none: -1 is allowed too ("no previous step", for t_prev). An int or a CPU tensor is range-checked on the
    host (ValueError). A t already on a GPU is range-checked there, without reading it back: a host read would
    make every step wait for the device, so an out-of-range value fails the device's next synchronisation
    (torch._assert_async) instead of raising here.
    """
    if isinstance(t, bool) or not isinstance(t, (numbers.Integral, torch.Tensor)):
        raise TypeError(f"{name}: expected an int or an integer tensor, got {type(t).__name__}")
    lowest = -1 if allow_none else 0
    expected = f"expected values in [{lowest}, {num_timesteps - 1}]"
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
        if t.dim() > 1 or (t.dim() == 1 and t.numel() != batch):
            raise ValueError(f"{name}: expected an int, a 0-d tensor or shape ({batch},), got shape {tuple(t.shape)}")
        if t.device.type == "cpu":
            lo, hi = (int(v) for v in torch.aminmax(t))
            if lo < lowest or hi >= num_timesteps:
                raise ValueError(f"{name}: {expected}, got {lo if lo < lowest else hi}")
        elif t.device.type == "cuda":
            torch._assert_async(((t >= lowest) & (t < num_timesteps)).all(), f"{name}: {expected}")
        return t.to(device=device, dtype=torch.int64).reshape(-1).expand(batch).contiguous()
    if t < lowest or t >= num_timesteps:
        raise ValueError(f"{name}: {expected}, got {t}")
    return torch.full((batch,), int(t), dtype=torch.int64, device=device)


def previous_timesteps(t_prev, t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """t_prev as an int64 (batch,) tensor beside t: each in [-1, t) (-1: no previous step); checked like t."""
    t_prev = timesteps(t_prev, t.shape[0], num_timesteps, t.device, name="t_prev", allow_none=True)
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


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value


def number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return float(value)
