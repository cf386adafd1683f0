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
  when the installed torch has CUDA and the CUDA toolkit is found; ``DDPM_FAST_NO_CUDA=1`` skips it
  (benchmarks/gpu_check.sh falls back to that if the CUDA build fails, so the CPU and Triton paths can still be
  measured). The toolkit is torch's guess (``CUDA_HOME``, else the folder above the ``nvcc`` on PATH); where that
  folder has no ``include/cuda_runtime.h`` (an ``nvcc`` wrapper script in /usr/local/bin), the one ``nvcc --dryrun``
  names is used.

``DDPM_FAST_CPU_ISA``: unset or ``all`` builds the three CPU variants; ``default``, ``avx2`` or ``avx512`` builds
only that one (a machine that needs one variant saves two thirds of the CPU build).

Build against the installed torch: ``pip install --no-build-isolation -e .``
"""

import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/cpu/ddpm_step.cpp",
    "csrc/cpu/dpmpp_step.cpp",
    "csrc/cpu/q_sample.cpp",
    "csrc/cpu/noise.cpp",
    "csrc/cpu/group_norm.cpp",
    "csrc/cpu/group_norm_backward.cpp",
    "csrc/cpu/attention.cpp",
    "csrc/cpu/attention_backward.cpp",
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


CPU_ISAS = ("default", "avx2", "avx512")


def cpu_isas(value, machine):
    """The CPU variants to build from DDPM_FAST_CPU_ISA's value: all of them by default (the x86 ones only on
    x86-64), or the one named."""
    x86 = machine.lower() in ("x86_64", "amd64")
    value = (value or "all").strip().lower()
    if value == "all":
        return list(CPU_ISAS) if x86 else ["default"]
    if value not in CPU_ISAS:
        raise SystemExit(f"ddpm_fast: DDPM_FAST_CPU_ISA must be all, default, avx2 or avx512, got {value!r}")
    if value != "default" and not x86:
        raise SystemExit(f"ddpm_fast: DDPM_FAST_CPU_ISA={value} needs an x86-64 machine, this one is {machine}")
    return [value]


def has_cuda_headers(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def toolkit_from_nvcc(nvcc="nvcc"):
    """The toolkit folder nvcc itself reports (``nvcc --dryrun`` prints its _HERE_/TOP variables), or None. torch
    guesses the folder above the nvcc on PATH, which is wrong when that nvcc is a wrapper script elsewhere."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            r = subprocess.run([nvcc, "--dryrun", "-c", src], capture_output=True, text=True, timeout=60, cwd=tmp)
        except (OSError, subprocess.SubprocessError):
            return None
    found = dict(re.findall(r"^#\$ (_HERE_|_THERE_|_TOP_|TOP)=(.*)$", r.stdout + r.stderr, flags=re.M))
    candidates = [found.get("TOP"), found.get("_TOP_")]
    candidates += [os.path.dirname(found[k]) for k in ("_HERE_", "_THERE_") if found.get(k)]
    for root in candidates:
        if root and has_cuda_headers(os.path.normpath(root)):
            return os.path.normpath(root)
    return None


def find_cuda_home():
    """The CUDA toolkit to build against, or None: torch's guess when it has the headers, else nvcc's own answer.
    A found toolkit goes into os.environ and cpp_extension.CUDA_HOME (which CUDAExtension and the nvcc command
    line read)."""
    guess = cpp_extension.CUDA_HOME
    if has_cuda_headers(guess):
        return guess
    nvcc = os.path.join(guess or "", "bin", "nvcc")
    root = toolkit_from_nvcc(nvcc if os.path.isfile(nvcc) else "nvcc")
    if root is not None:
        print(f"ddpm_fast: {guess}/include has no cuda_runtime.h; building against {root}, the toolkit nvcc reports")
        os.environ["CUDA_HOME"] = root
        cpp_extension.CUDA_HOME = root
    return root


def extensions():
    isa_flags = {
        "default": [],
        "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=avx2"],
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]
        + ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=avx512"],
    }
    names = {"default": "ddpm_fast._C", "avx2": "ddpm_fast._C_avx2", "avx512": "ddpm_fast._C_avx512"}
    isas = cpu_isas(os.environ.get("DDPM_FAST_CPU_ISA"), platform.machine())
    exts = [cpu_extension(names[isa], isa_flags[isa]) for isa in isas]
    import torch

    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    cuda_sources = sorted(f for f in os.listdir(cuda_dir) if f.endswith(".cu")) if os.path.isdir(cuda_dir) else []
    if os.environ.get("DDPM_FAST_NO_CUDA"):
        print("ddpm_fast: DDPM_FAST_NO_CUDA is set; building the CPU kernels only")
    elif torch.version.cuda is None:
        print("ddpm_fast: the installed torch has no CUDA; building the CPU kernels only")
    elif not cuda_sources:
        print("ddpm_fast: csrc/cuda has no sources; building the CPU kernels only")
    elif find_cuda_home() is None:
        print(
            "ddpm_fast: CUDA toolkit not found (no nvcc, or no include/cuda_runtime.h beside it); "
            "set CUDA_HOME=/path/to/cuda (the folder with bin/nvcc and include/) to build the CUDA kernels; "
            "building the CPU kernels only"
        )
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
    """Compiles each extension in its own folder under build/: _C, _C_avx2 and _C_avx512 share their sources, and in
    one folder their objects would overwrite each other (and ninja would rebuild every translation unit every time).
    The folder is build/temp.<platform>-<python> even under ``pip install -e``, whose own build folder is a fresh
    temporary one per install: ninja's objects persist, so a reinstall compiles only what changed."""

    def build_extension(self, ext):
        base = self.build_temp
        tag = f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        self.build_temp = os.path.join(ROOT, "build", tag, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


if __name__ == "__main__":  # setuptools runs this file as __main__; the tests import its helpers
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
