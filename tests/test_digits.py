"""Digits end to end, CI-sized: train a few steps, checkpoint, resume, sample, grid; the quality metric."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
import ddpm_fast as df  # noqa: E402
from ddpm_fast.digits import (  # noqa: E402
    DigitsClassifier,
    load_checkpoint,
    load_digits_tensor,
    model_from_checkpoint,
    save_grid,
    train_digits,
)


def test_train_resume_and_sample(tmp_path):
    out = str(tmp_path / "run")
    path = train_digits(out, steps=4, batch_size=8, checkpoint_every=2, timesteps=50, progress=False)
    state = load_checkpoint(path)
    assert state["step"] == 4 and len(state["losses"]) == 4
    first = state["model"]["conv_in.weight"].clone()
    train_digits(out, steps=6, batch_size=8, checkpoint_every=2, timesteps=50, progress=False)  # resumes at 4
    state = load_checkpoint(path)
    assert state["step"] == 6 and len(state["losses"]) == 6
    assert not torch.equal(first, state["model"]["conv_in.weight"])
    assert os.path.exists(os.path.join(out, "loss.png"))
    model, schedule = model_from_checkpoint(path)
    images = df.GaussianDiffusion(model, schedule).sample(4, seed=0, steps=10, method="ddim", progress=False)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    save_grid(images, str(tmp_path / "grid.png"), nrow=2)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        load_checkpoint(str(bad))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ddpm_fast digits checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    r = subprocess.run(
        [sys.executable, "-m", "ddpm_fast.cli", "sample", "--checkpoint", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "not a readable checkpoint" in r.stderr


def test_quality_metric_tells_real_from_shuffled_pixels():
    real = load_digits_tensor()
    clf = DigitsClassifier()
    same = clf.quality(real[:900], real[900:])
    shuffled = real[:900].reshape(900, -1)[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    other = clf.quality(shuffled.reshape(900, 1, 8, 8), real[900:])
    print(f"real vs real: {same}\nshuffled vs real: {other}")
    assert other.frechet_distance > 10 * same.frechet_distance
    assert same.mean_confidence > other.mean_confidence
    assert min(same.class_histogram) > 50  # every class present in real digits


def test_cli_samples_a_checkpoint(tmp_path):
    path = train_digits(str(tmp_path / "run"), steps=2, batch_size=8, timesteps=20, progress=False)
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "ddpm_fast.cli", "sample", "--checkpoint", path, "--out", str(out), "-n", "4"]
    cmd += ["--steps", "5", "--method", "ddim", "--quality", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0 and (out / "grid.png").exists() and "Frechet distance" in r.stdout
    assert np.load(out / "samples.npz")["arr_0"].shape == (4, 8, 8, 1)


def test_digits_quality_compares_bf16_with_fp32_over_seeds(tmp_path):
    """benchmarks/digits_quality.py --bf16: fp32 and bf16 rows per seed on the fused cpu kernels, the verdict
    against fp32's seed-to-seed spread in the record; a bad --seeds is one line and a non-zero exit."""
    import json

    path = train_digits(str(tmp_path / "run"), steps=2, batch_size=8, timesteps=20, progress=False)
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "digits_quality.py")
    record = tmp_path / "q.json"
    args = [sys.executable, script, "--checkpoint", path, "-n", "8", "--bf16", "--steps", "10", "--seeds", "0,1"]
    r = subprocess.run([*args, "--json", str(record)], capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0
    rec = json.loads(record.read_text())
    rows = rec["rows"]
    assert [(row["sampler"].split()[1], row["seed"]) for row in rows] == [
        ("fp32", 0), ("bf16", 0), ("fp32", 1), ("bf16", 1)
    ]  # fmt: skip
    assert all("cpu/" in row["served"] and "torch/" not in row["served"] for row in rows)
    assert rows[1]["max_abs_diff_vs_fp32"] > 0 and rec["verdict"].startswith("Frechet distance over seeds [0, 1]")
    bad = subprocess.run([*args[:-1], "0,x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--seeds" in bad.stderr and "Traceback" not in bad.stderr


def test_digits_quality_solvers_against_ddpm_over_seeds(tmp_path):
    """benchmarks/digits_quality.py --solvers: DDPM with every step and each fewer-step method at each step count,
    per seed, on the fused cpu kernels; the summary's means and speed over DDPM-T; CLI mistakes are one line."""
    import json

    path = train_digits(str(tmp_path / "run"), steps=2, batch_size=8, timesteps=20, progress=False)
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "digits_quality.py")
    record = tmp_path / "q.json"
    args = [sys.executable, script, "--checkpoint", path, "-n", "6", "--solvers", "--seeds", "0,1"]
    r = subprocess.run(
        [*args, "--steps-list", "4,10", "--json", str(record)], capture_output=True, text=True, timeout=600
    )
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0
    rec = json.loads(record.read_text())
    methods = ["ddim", "dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m", "unipc"]
    configs = [("ddpm", 20)] + [(m, s) for s in (4, 10) for m in methods]
    assert [(row["method"], row["steps"], row["seed"]) for row in rec["rows"]] == [
        (m, s, seed) for seed in (0, 1) for m, s in configs
    ]
    assert all("cpu/" in row["served"] and "torch/" not in row["served"] for row in rec["rows"])
    summary = {(row["method"], row["steps"]): row for row in rec["summary"]}
    assert list(summary) == configs and summary["ddpm", 20]["speed_vs_ddpm_T"] == 1.0
    for (method, steps), row in summary.items():
        fd = [x["frechet_distance"] for x in rec["rows"] if (x["method"], x["steps"]) == (method, steps)]
        assert abs(row["frechet_mean"] - sum(fd) / 2) < 1e-9
    assert summary["unipc", 4]["speed_vs_ddpm_T"] > 1.5  # 4 steps against 20 (the model dominates both)
    assert rec["verdict"].startswith("DDPM-20: Frechet distance")
    for extra, word in ((["--steps-list", "0"], "--steps-list"), (["--steps-list", "30"], "--steps-list"),
                        (["--bf16"], "--solvers")):  # fmt: skip
        bad = subprocess.run([*args, *extra], capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and word in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
