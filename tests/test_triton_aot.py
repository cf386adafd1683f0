"""The ahead-of-time compile check (tests/triton_aot.py) as part of the suite: every Triton kernel compiled for
sm_80 and sm_90 at every launch configuration, without a GPU and without the interpreter, under the Triton
installed here and under Triton 3.6 (the GPU machine's version) when tests/run.sh could make its environment.

It runs in a fresh process: this one has TRITON_INTERPRET=1 set before the kernels were defined (conftest.py),
and the interpreter compiles nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRITON36 = Path(os.environ.get("DDPM_FAST_TRITON36_ENV", Path.home() / ".cache/ddpm_fast/triton36")) / "bin/python"


def _triton_version(python) -> str | None:
    r = subprocess.run([str(python), "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _check(python, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [str(python), "-W", "ignore", "-m", "tests.triton_aot", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = r.stdout.splitlines()
    print("\n".join([line for line in lines if line.startswith("FAIL")][:40] + lines[-1:]), r.stderr[-3000:])
    return r


def _pythons():
    yield pytest.param(sys.executable, id="installed-triton")
    if TRITON36.exists():
        yield pytest.param(str(TRITON36), id="triton-3.6")
    else:
        yield pytest.param(
            None, id="triton-3.6", marks=pytest.mark.skip(reason=f"no Triton 3.6 environment at {TRITON36}")
        )


@pytest.mark.parametrize("python", _pythons())
def test_every_triton_kernel_compiles_for_sm80_and_sm90(python):
    """The quick set (one dtype and layout per op, seeds 0 and 1) by default; DDPM_FAST_AOT_FULL=1 compiles every
    configuration (about 2,600 variants: tens of minutes cold on two cores, so not part of the default run)."""
    if _triton_version(python) is None:
        pytest.skip(f"triton does not import under {python}")
    r = _check(python, *(() if os.environ.get("DDPM_FAST_AOT_FULL") == "1" else ("--quick",)))
    assert r.returncode == 0, "Triton kernels that do not compile, overflow shared memory, spill or overrun the grid"
    assert "AOT check:" in r.stdout and " 0 problems" in r.stdout.splitlines()[-1]


def test_triton36_environment_has_triton36():
    if not TRITON36.exists():
        pytest.skip(f"no Triton 3.6 environment at {TRITON36} (tests/run.sh makes it when it can download triton)")
    assert _triton_version(TRITON36) == "3.6.0"


def test_the_check_reports_each_kind_of_defect():
    """A kernel that specialises a seed half of 1, one past the shared memory limit and a grid past 65,535 on axis
    1 are each reported, and a clean launch is not: the check can fail."""
    r = _check(sys.executable, "--self-test")
    assert r.returncode == 0
