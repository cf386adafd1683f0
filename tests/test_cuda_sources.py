"""The CUDA sources compile here (nvcc, sm_80 and sm_90, warnings as errors), and the shared headers they use
(csrc/common/philox.h) are checked on the host through the CPU build."""

import os
import shutil
import subprocess

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import _ext
from ddpm_fast.reference.noise import keyed_normal
from tests.helpers import PHILOX_KNOWN_ANSWERS, ROOT, needs_cpu

CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
SOURCES = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", SOURCES)
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    cmd = [
        "nvcc",
        "-c",
        "-std=c++17",
        "-O3",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Werror",
        "-I",
        os.path.join(ROOT, "csrc"),
        os.path.join(CUDA_DIR, source),
        "-o",
        str(tmp_path / "out.o"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0


@needs_cpu
@pytest.mark.parametrize("counter, key, expected", PHILOX_KNOWN_ANSWERS)
def test_common_philox_header_known_answers(counter, key, expected):
    assert tuple(_ext.cpu_module().philox4x32_10(list(counter), *key)) == expected


@needs_cpu
def test_common_normal_transform_equals_the_reference():
    seed, g, t, stream = 2**40 + 17, 5, 321, 1
    ref = keyed_normal((1, 64), seed, t, stream, sample_offset=g).flatten()
    ours = torch.tensor([z for i4 in range(16) for z in _ext.cpu_module().philox_normal4(seed, i4, g, t, stream)])
    err = (ours - ref).abs().max().item()
    print(f"scalar philox_normal4 vs reference: max err {err:.3g}")
    assert err <= 1e-5 * max(1.0, ref.abs().max().item())
    assert df.backends()["cpu"].startswith("available")


def _cuda_include():
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


@pytest.mark.skipif(_cuda_include() is None, reason="CUDA toolkit headers not found")
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cuda_glue_compiles_against_torch_headers(tmp_path):
    """csrc/cuda_bindings.cpp is built only with a CUDA torch; here it is type-checked (-fsyntax-only) against this
    torch's headers. The CPU torch lacks only c10's generated c10/cuda/impl/cuda_cmake_macros.h, which a shim
    provides with the one macro a CUDA build of torch defines there."""
    import sysconfig

    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = ["g++", "-fsyntax-only", "-std=c++20", "-Wall", "-Werror", "-I", str(tmp_path), "-I", tinc]
    cmd += ["-I", os.path.join(tinc, "torch", "csrc", "api", "include"), "-I", _cuda_include()]
    cmd += ["-I", os.path.join(ROOT, "csrc"), "-I", sysconfig.get_paths()["include"]]
    cmd += ["-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    cmd += [os.path.join(ROOT, "csrc", "cuda_bindings.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0
