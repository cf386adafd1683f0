"""What the tests share: the backends' skip markers, the scheduler option grid, the tolerances of the design
(with the error printed before every assertion), known answers, and a fresh-process runner."""

from __future__ import annotations

import itertools
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import ddpm_fast as df

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the GPU backends' tests put their tensors

# Each backend's marker skips with the backend's own reason (what is missing, and why). tests/conftest.py fails the
# session when the CPU extension is missing where it should have been built (cpu_extension_unbuildable), so
# needs_cpu skips only where it cannot have been built or the run opted out (DDPM_FAST_ALLOW_NO_EXT=1).
BACKEND_STATUS = df.backends()
HAS_CPU = BACKEND_STATUS["cpu"].startswith("available")
HAS_TRITON = BACKEND_STATUS["triton"] == "available"
HAS_CUDA = BACKEND_STATUS["cuda"] == "available"
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=f"cpu backend: {BACKEND_STATUS['cpu']}")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"triton backend: {BACKEND_STATUS['triton']}")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=f"cuda backend: {BACKEND_STATUS['cuda']}")


def cpu_extension_unbuildable() -> str | None:
    """Why the CPU extension cannot have been built on this machine, or None where it should have been: setup.py
    builds ddpm_fast._C on x86-64 and ARM, with the C++ compiler torch's build uses (CXX, else c++)."""
    machine, compiler = platform.machine(), os.environ.get("CXX", "c++")
    if machine.lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"setup.py builds no CPU extension for a {machine} machine"
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build the CPU extension"
    return None


# (prediction_type, variance_type, clip_sample): every combination the reverse step supports
OPTIONS = list(itertools.product(["epsilon", "sample", "v_prediction"], ["fixed_small", "fixed_large"], [False, True]))

LOWP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (out.double() - ref.double()).abs()
    return d.max().item(), d.mean().item()


def assert_fp32_close(name: str, out, ref, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """max |out - ref| <= atol + rtol * |ref|, elementwise."""
    mx, mean = errors(out, ref)
    bound = atol + rtol * ref.double().abs()
    worst = ((out.double() - ref.double()).abs() - bound).max().item()
    print(f"{name}: max err {mx:.3g}, mean err {mean:.3g}")
    assert out.shape == ref.shape
    assert worst <= 0, f"{name}: error exceeds {atol} + {rtol}*|ref| by {worst:.3g}"


def assert_lowp_close(name: str, out, ref_fp32, ref_lowp) -> None:
    """Low precision: error vs the fp32 reference <= 2x PyTorch's own error in that dtype + atol."""
    mx, mean = errors(out, ref_fp32)
    torch_mx, _ = errors(ref_lowp, ref_fp32)
    bound = 2 * torch_mx + LOWP_ATOL[out.dtype]
    print(f"{name}: max err {mx:.3g} (mean {mean:.3g}), torch {out.dtype} max err {torch_mx:.3g}, bound {bound:.3g}")
    assert mx <= bound, f"{name}: {mx:.3g} > {bound:.3g}"


def layout_cases(shapes):
    """(shape, layout) pairs: every shape contiguous and strided, 4-D shapes also channels_last."""
    return [
        (s, lay)
        for s in shapes
        for lay in ("contiguous", "channels_last", "strided")
        if len(s) == 4 or lay != "channels_last"
    ]


# Random123's Philox4x32-10 known-answer vectors: (counter, key, output)
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
]


def diffusers_float64(scheduler_cls, **config):
    """A diffusers scheduler with its linear schedule rebuilt in float64: its own float32 alphas_cumprod puts
    1 - abar_t off by up to 1.7e-4 relative, so a float32 comparison would measure its rounding, not ours."""
    sched = scheduler_cls(**config)
    c = sched.config
    sched.betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "one"):
        sched.one = one
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = one
    return sched


def run_python(code: str, *args: str, **env: str) -> int:
    """Runs code in a fresh Python process (for what is fixed per process: the loaded build, the GEMM library),
    with env added to this process's environment; prints its output and returns its exit status."""
    r = subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    print(r.stdout, r.stderr[-2000:])
    return r.returncode
