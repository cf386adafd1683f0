"""The one place the compiled extension is imported.

Two builds of the same CPU kernels exist (setup.py): ``_C_avx2`` for CPUs with AVX2/FMA/F16C and ``_C`` for
any other. The choice follows torch's own reading of the CPU (``torch.backends.cpu.get_cpu_capability()``);
``DDPM_FAST_CPU_CAPABILITY=default`` forces the portable build.
"""

from __future__ import annotations

import importlib
import os

import torch

_module = None
_error = "not loaded yet"


def _candidates() -> list[str]:
    forced = os.environ.get("DDPM_FAST_CPU_CAPABILITY", "").lower()
    if forced == "default":
        return ["_C"]
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return ["_C_avx2", "_C"] if cap in ("AVX2", "AVX512", "AVX512_BF16", "AVX512_VNNI", "AMX") else ["_C"]


def _load():
    global _module, _error
    errors = []
    for name in _candidates():
        try:
            _module = importlib.import_module(f"ddpm_fast.{name}")
            _error = None
            return
        except ImportError as e:  # not built, or built against another torch
            errors.append(f"{name}: {e}")
    _error = "extension not built (pip install --no-build-isolation -e .): " + "; ".join(errors)


_load()


def cpu_module():
    """The loaded CPU extension, or None (see :func:`cpu_unavailable_reason`)."""
    return _module


def cpu_unavailable_reason() -> str | None:
    return _error


def cpu_capability() -> str | None:
    return _module.capability() if _module is not None else None
