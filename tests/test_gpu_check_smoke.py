"""benchmarks/gpu_check.py --smoke: the GPU check script end to end on CPU tensors through the Triton interpreter
at toy sizes, so the one prepared GPU run cannot die of a Python error (its timings here mean nothing)."""

import json
import os
import subprocess
import sys

import pytest

import ddpm_fast as df

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not df.backends()["cpu"].startswith("available"), reason="cpu extension not built")
def test_gpu_check_smoke(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads(out.read_text())
    ops = {row["op"] for row in record["ops"]}
    assert ops == {"ddpm_step", "q_sample", "group_norm_silu", "attention"}
    providers = {row.get("provider") for row in record["sampler"] if row["op"] == "sampler_step"}
    assert {"ddpm_fast", "ddpm_fast + CUDA graph"} <= providers
    assert all(row["ms"] > 0 for row in record["ops"])
