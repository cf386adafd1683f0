"""The ahead-of-time compile check (tests/triton_aot.py) as part of the suite: every Triton kernel compiled at every
launch configuration, without a GPU and without the interpreter, for sm_80 and sm_90 under the Triton installed
here, and for sm_90 under Triton 3.6 (the GPU machine's version and target) when tests/run.sh could make its
environment.

Each (Triton, target) runs in a fresh process: this one has TRITON_INTERPRET=1 set before the kernels were
defined (conftest.py), and the interpreter compiles nothing. The three runs go side by side on the cores there are.
"""

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRITON36 = Path(os.environ.get("DDPM_FAST_TRITON36_ENV", Path.home() / ".cache/ddpm_fast/triton36")) / "bin/python"
# The installed Triton for both targets; Triton 3.6, the GPU machine's, for its target only (H100/H200: sm_90).
RUNS = [("installed-triton", sys.executable, 80), ("installed-triton", sys.executable, 90)]
RUNS += [("triton-3.6", str(TRITON36), 90)]


def _triton_version(python) -> str | None:
    r = subprocess.run([str(python), "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _check(python, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [str(python), "-W", "ignore", "-m", "tests.triton_aot", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def _summary(r: subprocess.CompletedProcess) -> str:
    lines = r.stdout.splitlines()
    return "\n".join([line for line in lines if line.startswith("FAIL")][:40] + lines[-1:]) + "\n" + r.stderr[-3000:]


# Each run in two processes of similar length, so that the cores stay busy to the end: the step ops' launches
# (the most variants) and the others.
PARTS = (("step",), ("norm", "attention", "unet", "gpu_check"))


@pytest.fixture(scope="module")
def full_check():
    """{(name, arch): [the CompletedProcess of each part], or why it did not run}."""
    results, jobs = {}, []
    for name, python, arch in RUNS:
        if not Path(python).exists():
            results[name, arch] = (
                f"no Triton 3.6 environment at {TRITON36} (tests/run.sh makes it when it can download)"
            )
        elif _triton_version(python) is None:
            results[name, arch] = f"triton does not import under {python}"
        else:
            results[name, arch] = [None] * len(PARTS)
            jobs += [
                ((name, arch), i, [python, "--arch", str(arch)] + [a for f in part for a in ("--family", f)])
                for i, part in enumerate(PARTS)
            ]
    jobs.sort(key=lambda job: job[1])  # the longer part (the step ops) of every run first
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        futures = [(key, i, pool.submit(_check, *args)) for key, i, args in jobs]
        for key, i, f in futures:
            results[key][i] = f.result()
    return results


@pytest.mark.parametrize("name,python,arch", RUNS, ids=[f"{name}-sm{arch}" for name, _, arch in RUNS])
def test_every_triton_kernel_compiles(full_check, name, python, arch):
    """Every launch configuration of tests/triton_aot.py (every op, dtype, layout, seed half, autotune configuration,
    the U-Net's shapes and gpu_check's launches) compiles for the target with no problem; the count is printed."""
    parts = full_check[name, arch]
    if isinstance(parts, str):
        pytest.skip(parts)
    for part, r in zip(PARTS, parts):
        print(f"{', '.join(part)}:", _summary(r))
    for part, r in zip(PARTS, parts):
        assert r.returncode == 0, (
            f"{part}: Triton kernels that do not compile, overflow shared memory, spill or overrun the grid"
        )
        last = r.stdout.splitlines()[-1]
        assert "AOT check:" in last and f"(sm_{arch}: " in last and " 0 problems" in last, last


def test_triton36_environment_has_triton36():
    if not TRITON36.exists():
        pytest.skip(f"no Triton 3.6 environment at {TRITON36} (tests/run.sh makes it when it can download triton)")
    assert _triton_version(TRITON36) == "3.6.0"


def test_the_check_reports_each_kind_of_defect():
    """A kernel that specialises a seed half of 1, one past the shared memory limit and a grid past 65,535 on axis
    1 are each reported, and a clean launch is not: the check can fail."""
    r = _check(sys.executable, "--self-test")
    print(_summary(r))
    assert r.returncode == 0
