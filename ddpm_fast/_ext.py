"""The one place the compiled extensions are imported.

Three builds of the same CPU kernels exist (setup.py): ``_C_avx512`` for CPUs with AVX-512 (F/BW/DQ/VL),
``_C_avx2`` for CPUs with AVX2/FMA/F16C and ``_C`` for any other. The choice follows torch's own reading of the
CPU (``torch.backends.cpu.get_cpu_capability()``), the widest build first; ``DDPM_FAST_CPU_CAPABILITY`` set to
``default``, ``avx2`` or ``avx512`` asks for that build (falling back to narrower ones the CPU can run).

The Winograd convolution's matrix products run in oneDNN's brgemm micro-kernel, or in the BLAS torch links when
``DDPM_FAST_GEMM=blas`` (csrc/cpu/gemm.h says why oneDNN is the default).
"""

from __future__ import annotations

import importlib
import os

import torch

_module = None
_error = "not loaded yet"


_BUILDS = {"avx512": "_C_avx512", "avx2": "_C_avx2", "default": "_C"}  # capability -> module, widest first


def runnable_builds() -> list[str]:
    """The capabilities of the builds this CPU can run, widest first, from torch's reading of the CPU."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    names = list(_BUILDS)
    if cap.startswith("AVX512") or cap == "AMX":
        return names
    return names[1:] if cap == "AVX2" else names[2:]


def _candidates() -> list[str]:
    runnable = runnable_builds()
    forced = os.environ.get("DDPM_FAST_CPU_CAPABILITY", "").lower()
    if forced:
        if forced not in _BUILDS:
            raise ValueError(f"DDPM_FAST_CPU_CAPABILITY must be default, avx2 or avx512, got {forced!r}")
        narrower = list(_BUILDS)[list(_BUILDS).index(forced) :]
        runnable = [b for b in runnable if b in narrower]
    return [_BUILDS[b] for b in runnable]


def _check_gemm_variable():
    value = os.environ.get("DDPM_FAST_GEMM")
    if value is not None and value not in ("onednn", "blas"):
        raise ValueError(f"DDPM_FAST_GEMM must be onednn or blas, got {value!r}")


def _load():
    global _module, _error
    _check_gemm_variable()
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

_cuda_module = None
_cuda_error = "not loaded yet"


def _load_cuda():
    """ddpm_fast._C_cuda (built only with a CUDA torch); after the CPU module, whose TORCH_LIBRARY defines the
    schemas the CUDA kernels implement."""
    global _cuda_module, _cuda_error
    if torch.version.cuda is None:
        _cuda_error = "the installed torch has no CUDA"
        return
    try:
        _cuda_module = importlib.import_module("ddpm_fast._C_cuda")
        _cuda_error = None
    except ImportError as e:
        _cuda_error = (
            f"CUDA kernels not built (torch without CUDA, nvcc missing, or DDPM_FAST_NO_CUDA at build time): {e}"
        )


if _module is not None:
    _load_cuda()
else:
    _cuda_error = "the CPU extension (which defines the op schemas) is not loaded"


def cpu_module():
    """The loaded CPU extension, or None (see :func:`cpu_unavailable_reason`)."""
    return _module


def cpu_unavailable_reason() -> str | None:
    return _error


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA kernels are loaded (a device must still be present to run them)."""
    return _cuda_error


def cpu_capability() -> str | None:
    return _module.capability() if _module is not None else None


def gemm_library() -> str | None:
    """'onednn' or 'blas': the library of the CPU Winograd convolution's matrix products."""
    return _module.gemm_library() if _module is not None else None


def bf16_instructions() -> str | None:
    """The CPU's bf16 matrix instructions the bf16 Winograd products run on: 'amx_bf16' or 'avx512_bf16' (read
    from CPUID by the extension); None when it has neither or the extension predates the bf16 kernel."""
    if _module is None or not hasattr(_module, "bf16_instructions"):
        return None
    return _module.bf16_instructions() or None
