"""benchmarks/gpu_check.py: --smoke runs the GPU check end to end on CPU tensors through the Triton interpreter at
toy sizes, so the one prepared GPU run cannot die of a Python error (its timings here mean nothing); its launch
plan lists every row it times; one failing provider or case is recorded and the rest still runs."""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import ddpm_fast as df
from tests.helpers import ROOT, needs_cpu, needs_triton

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_cpu
def test_gpu_check_smoke(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads(out.read_text())
    print(f"{len(record['ops'])} op rows, {len(record['sampler'])} sampler rows, {len(record['skipped'])} skipped")
    assert record["complete"] and record["errors"] == []
    assert not [row for row in record["ops"] + record["sampler"] if "error" in row or "check_error" in row]
    ops = {row["op"] for row in record["ops"]}
    assert ops == {"ddpm_step", "q_sample", "group_norm_silu", "attention"}
    keyed = {(row["op"], row["provider"]) for row in record["ops"] if row["provider"] == "triton keyed"}
    assert keyed == {("ddpm_step", "triton keyed"), ("q_sample", "triton keyed")}  # seed 1
    providers = {row.get("provider") for row in record["sampler"] if row["op"] == "sampler_step"}
    assert {"ddpm_fast", "ddpm_fast + CUDA graph"} <= providers
    assert all(row["ms"] > 0 for row in record["ops"])
    assert all(row["max_err"] < 1e-5 for row in record["ops"] if "max_err" in row)
    assert {s["provider"] for s in record["skipped"] if "provider" in s} >= {"cuda", "cuda keyed"}


def test_launch_plan_lists_every_timed_row():
    g = _gpu_check()
    for quick in (False, True):
        plan = g.launch_plan(quick, "meta")
        cases = g.cases(quick, "meta")
        names = [launch.name for launch in plan]
        assert len(names) == len(set(names)), "row names must be unique"
        assert len(plan) == sum(len(c.providers) for c in cases)
        rows = {(launch.section, launch.provider) for launch in plan}
        assert {(c.section, name) for c in cases for name in c.providers} == rows
        by_provider = {}
        for launch in plan:
            by_provider.setdefault(launch.provider, set()).add(launch.needs)
        print(f"quick={quick}: {len(plan)} rows, {sum(launch.triton for launch in plan)} launch Triton kernels")
        assert by_provider["cuda"] == {frozenset({g.CUDA_EXT})}
        assert by_provider["triton keyed"] == {frozenset()} and by_provider["ddpm_fast + CUDA graph"] == {frozenset()}
        assert all(g.COMPILE in n for n in by_provider["diffusers torch.compile"])
        assert all(launch.triton for launch in plan if launch.provider.startswith(("triton", "ddpm_fast")))


def test_a_failing_provider_or_case_is_recorded_and_the_rest_runs(monkeypatch):
    g = _gpu_check()

    def boom():
        raise RuntimeError("kernel exploded")

    def no_inputs():
        raise RuntimeError("no memory for the inputs")

    def inputs():
        return SimpleNamespace(device=torch.device("cpu"), x=torch.ones(4))

    def report(name, ms, res):
        return {}

    def case(section, op, setup, providers):
        return g.Case(section, "ops", dict(op=op), setup, providers, report, 1, 1)

    ok = g.Provider(lambda v: lambda: v.x * 2)
    plan = [
        case("first", "a", inputs, {"ok": ok, "bad": g.Provider(lambda v: boom), "ok2": g.Provider(lambda v: v.x.neg)}),
        case("second", "b", no_inputs, {"ok": ok}),
        case("second", "c", inputs, {"ok": ok, "bad setup": g.Provider(lambda v: boom())}),
    ]
    monkeypatch.setattr(g, "cases", lambda quick, device, smoke=False: plan)
    record = dict(sections=[], ops=[], sampler=[], skipped=[], errors=[])
    saves = []
    args = SimpleNamespace(smoke=True, quick=False, no_compile=True, budget=None)
    g.run(args, record, lambda: saves.append(len(record["ops"])), lambda msg: None)
    rows = {(r["op"], r["provider"]): r for r in record["ops"]}
    print(rows, record["errors"])
    assert rows[("a", "ok")]["ms"] > 0 and rows[("a", "ok2")]["ms"] > 0
    assert rows[("a", "bad")]["error"] == "RuntimeError: kernel exploded"
    assert rows[("c", "bad setup")]["error"] == "RuntimeError: kernel exploded" and rows[("c", "ok")]["ms"] > 0
    assert [(e["case"], e["error"]) for e in record["errors"]] == [("b", "RuntimeError: no memory for the inputs")]
    assert [s["name"] for s in record["sections"]] == ["first", "second"]
    assert len(saves) == 2 + 3  # before each section and after each case


def test_budget_skips_the_cases_that_would_finish_too_late(monkeypatch):
    g = _gpu_check()
    inputs = lambda: SimpleNamespace(device=torch.device("cpu"), x=torch.ones(4))  # noqa: E731
    plan = [
        g.Case("s", "ops", dict(op=op), inputs, {"ok": g.Provider(lambda v: v.x.neg)}, lambda *a: {}, 1, cost)
        for op, cost in (("cheap", 1), ("dear", 10**6))
    ]
    monkeypatch.setattr(g, "cases", lambda quick, device, smoke=False: plan)
    record = dict(sections=[], ops=[], sampler=[], skipped=[], errors=[])
    g.run(SimpleNamespace(smoke=True, quick=False, no_compile=True, budget=60), record, lambda: None, lambda m: None)
    assert [r["op"] for r in record["ops"]] == ["cheap"]
    assert [s["case"] for s in record["skipped"]] == ["dear"] and "budget" in record["skipped"][0]["reason"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "gpu_check: no CUDA device"),
        (["--smoke"], "gpu_check --smoke: run with TRITON_INTERPRET=1"),
        (["--budget", "0"], "gpu_check: --budget: expected a positive number of seconds"),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path, args, message):
    if not args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, SCRIPT, "--json", str(tmp_path / "x.json"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    print(r.stderr)
    assert r.returncode != 0 and r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1


@needs_triton
def test_a_plan_launch_runs_the_fused_kernels_as_the_timed_row_does():
    """A Launch runs its row as the timing does (the sampler under inference_mode): every norm and attention of the
    U-Net goes to the Triton kernels, not to the reference that autograd would pick."""
    g = _gpu_check()
    plan = {launch.name: launch for launch in g.launch_plan(True, "cpu", smoke=True, unet_backend="triton")}
    launch = plan["sampler float32: sampler_step batch=1 dtype=torch.float32 ddpm_fast"]
    with df.ops.trace() as calls:
        out = launch.fn()
    print(calls.summary())
    assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()
    calls.require_fused("the sampler row", ops={"group_norm_silu", "attention", "ddpm_step", "conv2d", "linear"})
    # CPU tensors: the convolutions and linear layers run on the CPU kernels, everything else on Triton's.
    gemm = {"conv2d", "linear"}
    assert {c.backend for c in calls if c.op not in gemm} == {"triton"}
    assert {c.backend for c in calls if c.op in gemm} == {"cpu"}
