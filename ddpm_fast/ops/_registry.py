"""The one registry of backends: which backend runs an op, decided once per call.

Each backend is a module exporting the same op functions (``_torch`` the reference, ``_cpu``, ``_triton``,
``_cuda``), the set of ops it implements (``OPS``), why it cannot run here (``unavailable()``) and per-op capability
rules (``refuses(op, **facts)``: None, or why this call is not one its kernel takes). The public ops in
``ops/__init__.py`` validate their arguments, call :func:`resolve` once and then the chosen backend's function.

- ``backend=None`` / ``"auto"``: ``DDPM_FAST_BACKEND`` if set, else the fastest backend for the tensors' device
  that implements the op and takes this call; else the reference. What served each call is recorded for
  ``ops.trace()``, so a quiet fallback is visible where it matters (benchmarks, drop-in tests).
- a backend asked for by name that cannot run raises, saying why (RuntimeError unavailable, NotImplementedError no
  kernel for the op, ValueError wrong device, TypeError a call its kernel does not take).
- when autograd needs a gradient through an op, the reference runs (the fused kernels have no backward; q_sample,
  which has one, resolves without asking, group_norm_silu, conv2d and linear take the cpu kernels' backward in fp32
  and attention theirs in any fused dtype).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

from . import _cpu, _cuda, _torch, _triton
from ._layout import FUSED_DTYPES  # float64 always runs on the reference

log = logging.getLogger("ddpm_fast")

_MODULES: dict[str, ModuleType] = {m.NAME: m for m in (_torch, _cpu, _triton, _cuda)}
BACKENDS = tuple(_MODULES)  # ("torch", "cpu", "triton", "cuda")
REFERENCE = _torch.NAME

# Fastest first, per device type. On CUDA tensors Triton comes before the CUDA kernels until a GPU run has
# measured them side by side (benchmarks/gpu_check.py has rows for both); backend="cuda" picks them by name.
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def module(name: str) -> ModuleType:
    """The backend module of a resolved backend name."""
    return _MODULES[name]


def implements(name: str) -> frozenset[str]:
    """The ops backend ``name`` has kernels for."""
    return _MODULES[name].OPS


def why_unavailable(name: str) -> str | None:
    """None when the backend can run here, else the reason."""
    if name not in _MODULES:
        raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {name!r}")
    return _MODULES[name].unavailable()


def check_backend(name) -> str | None:
    """``name`` if it names a backend (or is None / "auto"), else a TypeError/ValueError naming ``backend``: for
    settings stored before any op runs (a model's or a sampler's backend)."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend: expected a str or None, got {type(name).__name__}")
    if name not in (None, "auto") and name not in _MODULES:
        raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {name!r}")
    return name


def why_not_fused(device: torch.device, requested: str | None = None) -> str | None:
    """None when ops on tensors on ``device`` can run on a fused backend (``requested``, or with None/"auto" any
    backend auto would pick there), else why every such call would run the reference."""
    device = torch.device(device)
    name = requested if requested not in (None, "auto") else os.environ.get("DDPM_FAST_BACKEND") or "auto"
    if name == REFERENCE:
        return "backend 'torch' is the reference"
    if name != "auto":
        why = why_unavailable(name)
        if why is not None:
            return f"backend {name!r} is unavailable: {why}"
        try:
            _MODULES[name].check_device(device)
        except ValueError as e:
            return str(e)
        return None
    reasons = {c: _MODULES[c].unavailable() for c in _AUTO_ORDER.get(device.type, ()) if c != REFERENCE}
    if any(why is None for why in reasons.values()):
        return None
    listed = "; ".join(f"{c}: {why}" for c, why in reasons.items())
    return f"no fused backend for {device.type} tensors" + (f" ({listed})" if listed else "")


def backends() -> dict[str, str]:
    """Each backend and 'available' (with what it runs on) or why it is not."""
    report = {}
    for name, m in _MODULES.items():
        why = m.unavailable()
        report[name] = m.describe() if why is None else why
    return report


def resolve(op: str, requested, device: torch.device, needs_grad: bool = False, dtype=None, **facts) -> str:
    """The name of the backend that runs ``op`` on tensors of ``dtype`` on ``device``.

    ``facts``: what the backends' capability rules look at (the op's tensors, its options). A backend asked for by
    name is returned even for a dtype outside FUSED_DTYPES: the op then raises a TypeError naming the argument.
    """
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend: expected a str or None, got {type(requested).__name__}")
    name = requested if requested not in (None, "auto") else os.environ.get("DDPM_FAST_BACKEND") or "auto"
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, (REFERENCE,)):
            if candidate == REFERENCE:
                return REFERENCE
            m = _MODULES[candidate]
            if needs_grad or op not in m.OPS or (dtype is not None and dtype not in FUSED_DTYPES):
                continue
            why = m.unavailable() or m.refuses(op, dtype=dtype, **facts)
            if why is None:
                return candidate
            log.debug("ddpm_fast: %s backend not used for %s (%s)", candidate, op, why)
        return REFERENCE
    if name not in _MODULES:
        raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {name!r}")
    if name == REFERENCE:
        return name
    m = _MODULES[name]
    why = m.unavailable()
    if why is not None:
        raise RuntimeError(f"backend {name!r} is unavailable: {why}")
    if op not in m.OPS:
        raise NotImplementedError(f"backend {name!r} has no {op} kernel yet; use backend='torch' or 'auto'")
    m.check_device(device)
    if needs_grad:
        log.debug("ddpm_fast: %s needs a gradient; running the reference instead of %s", op, name)
        return REFERENCE
    if dtype is None or dtype in FUSED_DTYPES:
        why = m.refuses(op, dtype=dtype, **facts)
        if why is not None:
            raise TypeError(why)
    return name
