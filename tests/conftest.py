"""Test session set-up.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. TRITON_INTERPRET must be set
before the first kernel is defined (the kernels module is imported lazily by ddpm_fast.ops, after this file runs).

The CPU extension must have loaded wherever setup.py builds it (x86-64 and ARM, with a C++ compiler:
tests.helpers.cpu_extension_unbuildable): otherwise every test of the CPU kernels would skip and a broken build
would pass as a green run, so the session stops at once with the loader's reason. DDPM_FAST_ALLOW_NO_EXT=1 runs
the suite without the extension anyway (its tests then skip, each naming why).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ALLOW_NO_EXT = "DDPM_FAST_ALLOW_NO_EXT"


def pytest_sessionstart(session):
    from ddpm_fast import _ext
    from tests.helpers import cpu_extension_unbuildable

    why = _ext.cpu_unavailable_reason()
    if why is None or os.environ.get(ALLOW_NO_EXT) == "1" or cpu_extension_unbuildable() is not None:
        return
    pytest.exit(
        f"ddpm_fast's CPU extension did not load: {why}. Build it, or set {ALLOW_NO_EXT}=1 to run the tests "
        "without it.",
        returncode=1,
    )
