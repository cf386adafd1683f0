"""Builds ddpm_fast and its compiled kernels.

- ``ddpm_fast._C``: the CPU kernels for any x86-64/ARM CPU (always built).
- ``ddpm_fast._C_avx2``: the same sources compiled for AVX2 + FMA + F16C (x86-64 only). ATen's
  ``at::vec::Vectorized<float>`` silently falls back to a slow generic version unless the translation unit
  defines CPU_CAPABILITY_AVX2 and is compiled with -mavx2 -mfma, so the ISA variant is a whole extension;
  ddpm_fast/_ext.py picks one at import time from the CPU's flags.
- CUDA kernels (csrc/cuda) only when the installed torch has CUDA and nvcc is found (their torch glue is not
  written yet: today they are compiled by tests/test_cuda_sources.py only).

Build against the installed torch: ``pip install --no-build-isolation -e .``
"""

import os
import platform
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/cpu/ddpm_step.cpp",
    "csrc/cpu/q_sample.cpp",
    "csrc/cpu/noise.cpp",
    "csrc/cpu/group_norm.cpp",
    "csrc/cpu/attention.cpp",
    "csrc/cpu/winograd.cpp",
]
BASE_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]


def cpu_extension(name, isa_flags):
    return cpp_extension.CppExtension(
        name,
        CPU_SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=BASE_FLAGS + isa_flags,
        extra_link_args=["-fopenmp"],  # resolves to the libgomp torch already loaded
    )


def extensions():
    exts = [cpu_extension("ddpm_fast._C", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        avx2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=avx2"]
        exts.append(cpu_extension("ddpm_fast._C_avx2", avx2))
    import torch

    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    cuda_sources = sorted(f for f in os.listdir(cuda_dir) if f.endswith(".cu")) if os.path.isdir(cuda_dir) else []
    if torch.version.cuda is None:
        print("ddpm_fast: the installed torch has no CUDA; building the CPU kernels only")
    elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        print("ddpm_fast: nvcc not found; building the CPU kernels only")
    elif not cuda_sources:
        print("ddpm_fast: no CUDA kernels in csrc/cuda; building the CPU kernels only")
    else:  # the .cu kernels compile (tests/test_cuda_sources.py) but have no torch glue yet
        print("ddpm_fast: csrc/cuda has no torch glue yet; the cuda backend is not built (triton serves CUDA tensors)")
    return exts


setup(
    name="ddpm_fast",
    version="0.1.0",
    description="Fused-kernel DDPM sampling and training (CPU C++, Triton, CUDA) with a PyTorch reference",
    packages=find_packages(include=["ddpm_fast", "ddpm_fast.*"]) + ["ddpm_fast.kernels"],
    package_dir={"ddpm_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"triton": ["triton"], "diffusers": ["diffusers"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["ddpm-fast = ddpm_fast.cli:main"]},
)
