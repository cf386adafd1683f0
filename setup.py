"""Builds ddpm_fast and its compiled kernels.

- ``ddpm_fast._C``: the CPU kernels for any x86-64/ARM CPU (always built).
- ``ddpm_fast._C_avx2``: the same sources compiled for AVX2 + FMA + F16C (x86-64 only). ATen's
  ``at::vec::Vectorized<float>`` silently falls back to a slow generic version unless the translation unit
  defines CPU_CAPABILITY_AVX2 and is compiled with -mavx2 -mfma, so the ISA variant is a whole extension;
  ddpm_fast/_ext.py picks one at import time from the CPU's flags.
- ``ddpm_fast._C_avx512``: the same again for AVX-512 (F, BW, DQ, VL: what torch's own AVX512 capability
  requires), x86-64 only: 16-lane ``Vectorized<float>`` and the attention kernel's 16-lane tiles. On an AVX-512
  CPU, MKL's sgemm runs 512-bit FMAs, and an AVX2 kernel reached half of it (measured: fused attention at 40% of
  sgemm GFLOP/s, 0.6x SDPA).
- ``ddpm_fast._C_cuda``: the CUDA kernels (csrc/cuda/*.cu) and their torch glue (csrc/cuda_bindings.cpp), only
  when the installed torch has CUDA and nvcc is found; ``DDPM_FAST_NO_CUDA=1`` skips it (benchmarks/gpu_check.sh
  falls back to that if the CUDA build fails, so the CPU and Triton paths can still be measured).

Build against the installed torch: ``pip install --no-build-isolation -e .``
"""

import os
import platform

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
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]
        avx512 += ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=avx512"]
        exts.append(cpu_extension("ddpm_fast._C_avx512", avx512))
    import torch

    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    cuda_sources = sorted(f for f in os.listdir(cuda_dir) if f.endswith(".cu")) if os.path.isdir(cuda_dir) else []
    if os.environ.get("DDPM_FAST_NO_CUDA"):
        print("ddpm_fast: DDPM_FAST_NO_CUDA is set; building the CPU kernels only")
    elif torch.version.cuda is None:
        print("ddpm_fast: the installed torch has no CUDA; building the CPU kernels only")
    elif cpp_extension.CUDA_HOME is None or not cuda_sources:
        print("ddpm_fast: nvcc / CUDA_HOME not found; building the CPU kernels only")
    else:
        gencode = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        exts.append(
            cpp_extension.CUDAExtension(
                "ddpm_fast._C_cuda",
                ["csrc/cuda_bindings.cpp"] + [os.path.join("csrc", "cuda", f) for f in cuda_sources],
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},
            )
        )
    return exts


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Compiles each extension in its own temporary folder: _C, _C_avx2 and _C_avx512 share their sources, and in
    one folder their objects would overwrite each other (and ninja would rebuild every translation unit every time)."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    name="ddpm_fast",
    version="0.1.0",
    description="Fused-kernel DDPM sampling and training (CPU C++, Triton, CUDA) with a PyTorch reference",
    packages=find_packages(include=["ddpm_fast", "ddpm_fast.*"]) + ["ddpm_fast.kernels"],
    package_dir={"ddpm_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"triton": ["triton"], "diffusers": ["diffusers"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["ddpm-fast = ddpm_fast.cli:main"]},
)
