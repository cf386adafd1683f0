"""Benchmark rows labelled fused run once under ops.trace() (benchmarks/common.py: fused_row, check_fused) and record
what served them; a row the reference served ends the benchmark in one line (gpu_check: fails that row only)."""

import importlib.util
import os
import sys

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import ops
from tests.helpers import needs_cpu

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
TINY = dict(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), sample_size=16, num_res_blocks=1)
UNET_OPS = ["conv2d", "linear", "group_norm_silu", "attention"]


def _bench(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit_line(excinfo) -> str:
    message = str(excinfo.value.code)
    print(message)
    assert len(message.splitlines()) == 1  # one line, non-zero exit (SystemExit with a message exits 1)
    return message


@needs_cpu
def test_fused_row_passes_on_the_cpu_kernels_and_ends_the_run_on_the_reference(monkeypatch):
    common = _bench("common")
    model = df.UNet(**TINY).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    with torch.inference_mode():
        served = common.fused_row("ddpm_fast cpu", lambda: model(x, t), backend="cpu", ops=UNET_OPS)
        print(served)
        assert "conv2d cpu/winograd" in served and "attention cpu/native" in served and "torch/" not in served
        monkeypatch.setattr(ops._cpu, "unavailable", lambda: "hidden for this test")  # auto quietly runs the reference
        with pytest.raises(SystemExit) as e:
            common.fused_row("ddpm_fast cpu", lambda: model(x, t), backend="cpu", ops=UNET_OPS)
    assert _exit_line(e).startswith(
        "benchmark row not fused: ddpm_fast cpu: expected every op on the cpu backend, but attention torch/reference"
    )
    with pytest.raises(SystemExit) as e:
        common.check_fused("empty row", ops.Trace())
    assert _exit_line(e) == "benchmark row not fused: empty row: no ddpm_fast op ran (nothing fused served it)"


@needs_cpu
def test_a_benchmark_row_on_a_small_shape_records_what_served_it_or_fails(monkeypatch):
    bench_step = _bench("bench_step")
    res, err = bench_step.bench_case((2, 3, 4, 4), torch.float32, False, 1, with_diffusers=False)
    print(res["fused"]["served"], "|", res["reference"]["served"], f"| max err {err:.2g}")
    assert res["fused"]["served"] == "ddpm_step cpu/native x1"
    assert res["reference"]["served"] == "ddpm_step torch/reference x1"
    resolve = ops.resolve
    # a dispatch that quietly hands the row to the reference, even with backend="cpu" asked for by name
    monkeypatch.setattr(ops, "resolve", lambda op, *a, **k: "torch" if op == "ddpm_step" else resolve(op, *a, **k))
    with pytest.raises(SystemExit) as e:
        bench_step.bench_case((2, 3, 4, 4), torch.float32, False, 1, with_diffusers=False)
    assert _exit_line(e) == (
        "benchmark row not fused: ddpm_step 2x3x4x4 torch.float32 given noise, fused: "
        "expected every op on the cpu backend, but ddpm_step torch/reference x1"
    )
    monkeypatch.setattr(ops, "resolve", resolve)
    monkeypatch.setattr(ops._cpu, "unavailable", lambda: "hidden for this test")  # by name: an error already
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable: hidden for this test"):
        bench_step.bench_case((2, 3, 4, 4), torch.float32, False, 1, with_diffusers=False)


@needs_cpu
def test_group_norm_row_records_what_served_it(monkeypatch):
    bench_group_norm = _bench("bench_group_norm")
    res, _ = bench_group_norm.bench((1, 32, 4, 4), 8, True, torch.float32, False, 1)
    assert res["fused"]["served"] == "group_norm_silu cpu/native x1"
    monkeypatch.setattr(ops, "resolve", lambda op, *a, **k: "torch")
    with pytest.raises(SystemExit) as e:
        bench_group_norm.bench((1, 32, 4, 4), 8, True, torch.float32, False, 1)
    assert "group_norm_silu 1x32x4x4 channels_last torch.float32 fused: expected every op on the cpu" in _exit_line(e)


@needs_cpu
def test_gpu_check_fails_the_row_the_reference_served_and_runs_the_others():
    from types import SimpleNamespace

    g = _bench("gpu_check")
    s = df.NoiseSchedule.linear(10, 1e-3, 0.2)

    def step(backend):
        return lambda v: lambda: ops.ddpm_step(v.x, v.x, 5, s, seed=1, backend=backend)

    providers = {
        "baseline": g.Provider(step("torch")),
        "ours": g.Provider(step("cpu"), fused="cpu"),
        "ours on the reference": g.Provider(step("torch"), fused=True),
        "ours on another backend": g.Provider(step("cpu"), fused="triton"),
    }
    inputs = lambda: SimpleNamespace(device=torch.device("cpu"), x=torch.randn(2, 3, 4, 4))  # noqa: E731
    case = g.Case("ops", "ops", dict(op="ddpm_step"), inputs, providers, lambda *a: {}, 1, 1)
    rows, _ = g.time_case(case, 1, {}, lambda msg: None)
    rows = {r["provider"]: r for r in rows}
    print(rows)
    assert "served" not in rows["baseline"] and rows["baseline"]["ms"] > 0
    assert rows["ours"]["served"] == "ddpm_step cpu/native x1" and rows["ours"]["ms"] > 0
    bad = rows["ours on the reference"]
    assert bad["served"] == "ddpm_step torch/reference x1" and "ms" not in bad
    assert bad["error"].startswith("FusedPathError: ddpm_step ours on the reference: expected every op on a fused")
    assert rows["ours on another backend"]["error"].endswith("on the triton backend, but ddpm_step cpu/native x1")
