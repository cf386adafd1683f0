"""The one dispatch point: which backend runs an op.

- ``backend=None`` / ``"auto"``: ``DDPM_FAST_BACKEND`` if set, else the fastest backend that implements the op
  for the tensors' device; an unavailable choice falls back quietly (one debug log line) to the reference.
- a backend asked for by name that is unavailable raises, saying why.
- when autograd needs a gradient through an op and the backend has no backward, the reference runs.
"""

from __future__ import annotations

import logging
import os

import torch

from .. import _ext

log = logging.getLogger("ddpm_fast")

BACKENDS = ("torch", "cpu", "triton", "cuda")
# Ops each compiled backend implements; everything else runs on the reference ("torch").
_IMPLEMENTS = {
    "cpu": {"q_sample", "ddpm_step", "keyed_normal", "group_norm_silu", "attention", "conv3x3"},
    "triton": {"q_sample", "ddpm_step", "keyed_normal", "group_norm_silu", "attention"},
    "cuda": {"q_sample", "ddpm_step", "keyed_normal", "group_norm_silu", "attention"},
}
# Fastest first, per device type. On CUDA tensors Triton comes before the CUDA kernels until a GPU run has
# measured them side by side (benchmarks/gpu_check.py has rows for both); backend="cuda" picks them by name.
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def _why_unavailable(name: str) -> str | None:
    """None when the backend can run here, else the reason."""
    if name == "torch":
        return None
    if name == "cpu":
        return _ext.cpu_unavailable_reason()
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "no GPU: triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
        return None
    if name == "cuda":
        if not torch.cuda.is_available():
            return "no GPU: torch.cuda.is_available() is False"
        return _ext.cuda_unavailable_reason()
    raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {name!r}")


def backends() -> dict[str, str]:
    """Each backend and 'available' or why it is not."""
    report = {}
    for name in BACKENDS:
        why = _why_unavailable(name)
        if why is None and name == "cpu":
            report[name] = f"available ({_ext.cpu_capability()} build, {_ext.gemm_library()} GEMMs)"
        else:
            report[name] = "available" if why is None else why
    return report


# dtypes the compiled kernels take (fp32 maths inside); float64 always runs on the reference.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve(op: str, requested, device: torch.device, needs_grad: bool = False, dtype=None) -> str:
    """The backend that runs ``op`` on tensors of ``dtype`` on ``device``.

    A backend asked for by name is returned even for a dtype it lacks: the op then raises a TypeError naming
    the argument.
    """
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend: expected a str or None, got {type(requested).__name__}")
    name = requested if requested not in (None, "auto") else os.environ.get("DDPM_FAST_BACKEND") or "auto"
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if candidate == "torch":
                return "torch"
            if needs_grad or op not in _IMPLEMENTS[candidate] or (dtype is not None and dtype not in FUSED_DTYPES):
                continue
            why = _why_unavailable(candidate)
            if why is None:
                return candidate
            log.debug("ddpm_fast: %s backend unavailable for %s (%s)", candidate, op, why)
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {name!r}")
    if name == "torch":
        return name
    why = _why_unavailable(name)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is unavailable: {why}")
    if op not in _IMPLEMENTS[name]:
        raise NotImplementedError(f"backend {name!r} has no {op} kernel yet; use backend='torch' or 'auto'")
    wants = "cuda" if name == "cuda" else None
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    if wants and device.type != wants:
        raise ValueError(f"backend {name!r} needs CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1; use CUDA tensors")
    if needs_grad:
        log.debug("ddpm_fast: %s needs a gradient; running the reference instead of %s", op, name)
        return "torch"
    return name
