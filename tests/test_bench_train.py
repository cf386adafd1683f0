"""benchmarks/bench_train.py on the small U-Net, one round: the record holds every row, what served the ddpm_fast
rows (the ops with cpu kernels under autograd on them, the rest on the reference, labelled as such), gradients that
agree with the reference's, and each row's peak memory from its own process. No timing is asserted."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, needs_cpu

pytest.importorskip("diffusers")
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train.py")


def _run(*args, timeout=600):
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)
    print(r.stdout[-4000:], r.stderr[-2000:])
    return r


@needs_cpu
def test_one_round_on_the_small_unet_writes_every_row_and_what_served_it(tmp_path):
    path = tmp_path / "train.json"
    r = _run(
        "--model", "small", "--batch", "2", "--rounds", "1", "--no-compile", "--memory-steps", "1", "--json", str(path)
    )
    assert r.returncode == 0
    record = json.loads(path.read_text())
    rows = {row["provider"]: row for row in record["rows"]}
    assert list(rows) == ["ddpm_fast cpu", "ddpm_fast reference", "diffusers eager"]
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["repeats"] == 1 and row["speedup_vs_diffusers_eager"] > 0
        assert row["speedup_vs_diffusers_eager_fastest"] > 0
        assert row["memory"]["peak_rss_mb"] > row["memory"]["base_rss_mb"] > 0, row["memory"]

    ours = rows["ddpm_fast cpu"]
    assert ours["fused_ops"] == [
        "attention",
        "attention_backward",
        "conv2d",
        "conv2d_backward",
        "group_norm_silu",
        "group_norm_silu_backward",
        "linear",
        "linear_backward",
        "q_sample",
    ]
    assert ours["reference_ops"] == [] and ours["all_fused"] is True
    served = ("q_sample cpu/native x1", "group_norm_silu_backward cpu/native", "attention_backward cpu/native")
    served += ("conv2d cpu/onednn", "conv2d_backward cpu/winograd+aten", "conv2d_backward cpu/aten")
    served += ("conv2d_backward cpu/gemm",)
    for part in served + ("linear cpu/onednn", "linear_backward cpu/onednn+blas"):
        assert part in ours["served"], ours["served"]
    reference = rows["ddpm_fast reference"]
    assert reference["fused_ops"] == [] and "cpu/" not in reference["served"]
    assert "served" not in rows["diffusers eager"]

    agree = record["gradient_agreement"]
    grad = agree["grad_vs_reference"]
    print(grad["max_rel"], grad["worst_parameter"], grad["max_abs_diff_over_largest_grad"])
    assert grad["max_rel"] < 1e-4 and grad["max_abs_diff_over_largest_grad"] < 1e-5
    assert all(name.endswith("to_k.bias") for name in grad["negligible_left_out"])  # zero in exact arithmetic
    losses = agree["loss"]
    assert abs(losses["ddpm_fast cpu"] - losses["ddpm_fast reference"]) <= 1e-5 * losses["ddpm_fast reference"]
    assert abs(losses["diffusers eager"] - losses["ddpm_fast reference"]) <= 1e-5 * losses["ddpm_fast reference"]
    assert record["machine"]["device"].startswith("CPU") and record["batch"] == 2


def test_a_cli_mistake_is_refused_before_any_work():
    r = _run("--model", "big", "--no-memory", timeout=120)
    assert r.returncode == 2 and "invalid choice: 'big'" in r.stderr.splitlines()[-1]
    r = _run("--batch", "0", "--no-memory", timeout=120)
    assert r.returncode == 2 and "--batch: expected a positive integer, got '0'" in r.stderr.splitlines()[-1]
