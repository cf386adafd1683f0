"""Hostile and damaged files: no code in a checkpoint runs on load; damaged, cut-short, changed or mismatched
checkpoints are refused naming the file; NaN weights and non-finite chains never become silent images."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast._io import save_state, state_digest
from ddpm_fast.models import load_pretrained, save_model
from ddpm_fast.models.loading import UncheckedCheckpointWarning, read_checkpoint

TINY = dict(
    in_channels=1,
    out_channels=1,
    sample_size=8,
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_groups=4,
    dropout=0.0,
)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return df.UNet(**TINY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "tiny.pt")
    save_model(path, _tiny_model(), df.NoiseSchedule.linear(1000), clip_sample=True)
    return path


class _WritesMarker:
    """A pickle payload: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sample_cli(argv):
    """``ddpm-fast sample`` in this process: (exit status, what it said on stderr)."""
    from ddpm_fast.sample import main

    try:
        main([*argv, "--no-progress"], prog="ddpm-fast sample")
    except SystemExit as e:
        return (1, str(e.code)) if isinstance(e.code, str) else (e.code, "")
    return 0, ""


# ---------------------------------------------------------------------------------------------- code on load
@pytest.mark.parametrize("fmt", ["ddpm_fast.unet/1", "ddpm_fast.unet/2", "ddpm_fast.digits/2"])
def test_a_crafted_pickle_runs_no_code(tmp_path, fmt):
    from ddpm_fast.digits import load_checkpoint, train_digits

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"format": fmt, "unet": TINY, "model": {}, "payload": _WritesMarker(str(marker))}, evil)
    with pytest.raises(ValueError, match=f"{evil}.*not a readable checkpoint"):
        load_pretrained(str(evil))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(evil))
    code, err = _sample_cli(["--model", str(evil), "--out", str(tmp_path / "out")])
    print(err)
    assert code != 0 and str(evil) in err and "\n" not in err
    assert "none of it ran" in err and "weights_only" not in err  # no advice to load it unsafely
    # the same file as a training folder's checkpoint: refused at resume, before any training
    run = tmp_path / "run"
    run.mkdir()
    os.replace(evil, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train_digits(str(run), steps=1, batch_size=2, progress=False)
    assert not marker.exists()
    assert sorted(os.listdir(run)) == ["checkpoint.pt"] and not (tmp_path / "out").exists()


def test_a_diffusers_folder_bin_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "unet"
    folder.mkdir()
    from ddpm_fast.models.loading import DIFFUSERS_CIFAR10_CONFIG

    cfg = dict(DIFFUSERS_CIFAR10_CONFIG, sample_size=8, block_out_channels=(32, 32, 32, 32), norm_num_groups=8)
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save({"w": _WritesMarker(str(marker))}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_pretrained(str(folder))
    assert not marker.exists()
    (folder / "config.json").write_text('{"sample_size": 8, ')  # cut short
    with pytest.raises(ValueError, match=r"config\.json is not readable JSON"):
        load_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------- damage
def test_flipped_bytes_are_detected(tiny, tmp_path):
    data = open(tiny, "rb").read()
    ref = torch.load(tiny, weights_only=True)
    # a byte of a weight tensor: the file still unpickles, only the checksum can tell
    raw = ref["model"]["conv_in.weight"].numpy().tobytes()
    at = data.index(raw) + len(raw) // 2
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
    with pytest.raises(ValueError, match=f"{bad} fails its checksum"):
        load_pretrained(str(bad))
    # a single flipped byte anywhere: refused naming the file, unless it fell where nothing is stored (padding)
    silent = 0
    for at in np.linspace(0, len(data) - 1, 41).astype(int):
        bad.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
        try:
            state = torch.load(str(bad), weights_only=True)
            same = state_digest(state) == state_digest(ref)
        except Exception:  # noqa: BLE001 - unreadable: must be refused below
            same = False
        try:
            load_pretrained(str(bad))
        except ValueError as e:
            assert str(bad) in str(e)
            continue
        assert same, f"a flipped byte at {at} changed the checkpoint and loaded silently"
        silent += 1
    print(f"41 flipped bytes: {41 - silent} refused, {silent} in unused bytes (contents unchanged)")
    assert silent < 10


def test_truncated_and_empty_files_are_refused(tiny, tmp_path):
    data = open(tiny, "rb").read()
    for size in (0, 10, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{size}.pt"
        bad.write_bytes(data[:size])
        with pytest.raises(ValueError, match=f"{bad} is not a readable checkpoint"):
            load_pretrained(str(bad))


def test_a_checksum_removed_or_a_format_changed_is_refused(tiny, tmp_path):
    state = torch.load(tiny, weights_only=True)
    del state["sha256"]
    torch.save(state, tmp_path / "nosum.pt")
    with pytest.raises(ValueError, match="has no checksum"):
        load_pretrained(str(tmp_path / "nosum.pt"))
    torch.save({"format": "something/9", "sha256": "0"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="fails its checksum|not a ddpm_fast checkpoint"):
        load_pretrained(str(tmp_path / "other.pt"))
    save_state(str(tmp_path / "fmt.pt"), {"format": "ddpm_fast.unet/9"})
    with pytest.raises(ValueError, match="not a ddpm_fast checkpoint"):
        load_pretrained(str(tmp_path / "fmt.pt"))


def test_an_older_checkpoint_without_a_checksum_is_still_read(tmp_path):
    net = _tiny_model()
    old = {
        "format": "ddpm_fast.unet/1",
        "unet": TINY,
        "model": net.state_dict(),
        "betas": torch.linspace(1e-4, 0.02, 50),
    }
    torch.save(old, tmp_path / "old.pt")
    with pytest.warns(UncheckedCheckpointWarning, match="has no checksum"):
        model, schedule, _ = load_pretrained(str(tmp_path / "old.pt"))
    assert len(schedule) == 50 and torch.equal(model.conv_in.weight, net.conv_in.weight)


def test_mismatched_config_and_weights_are_refused(tmp_path):
    weights = _tiny_model().state_dict()
    cases = {
        "wider": (dict(TINY, ch=32, num_groups=4), "do not match its U-Net config"),
        "deeper": (dict(TINY, ch_mult=(1, 2, 2)), "do not match its U-Net config"),
        "unknown field": (dict(TINY, colour="red"), "unknown fields"),
        "bad value": (dict(TINY, ch=-3), "invalid ch"),
        "huge": (dict(TINY, ch=2**40), "invalid ch"),
    }
    for name, (cfg, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        save_state(
            str(path), {"format": "ddpm_fast.unet/2", "unet": cfg, "model": weights, "betas": torch.full((10,), 0.01)}
        )
        with pytest.raises(ValueError, match=message) as e:
            load_pretrained(str(path))
        print(f"{name}: {e.value}")
        assert str(path) in str(e.value)
    code, err = _sample_cli(["--model", str(tmp_path / "wider.pt"), "--out", str(tmp_path / "out")])
    assert code != 0 and "do not match" in err and "\n" not in err and not (tmp_path / "out").exists()


def test_read_checkpoint_names_the_file_for_a_non_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt is not a ddpm_fast checkpoint"):
        read_checkpoint(str(tmp_path / "list.pt"), "model", ("ddpm_fast.unet/2",))
    with pytest.raises(ValueError, match="is a folder"):
        read_checkpoint(str(tmp_path), "model", ("ddpm_fast.unet/2",))


# ---------------------------------------------------------------------------------------------- non-finite
def test_nan_weights_are_refused_before_anything_is_written(tmp_path):
    net = _tiny_model()
    with torch.no_grad():
        net.mid_block.resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    path = str(tmp_path / "nan.pt")
    save_model(path, net, df.NoiseSchedule.linear(1000))
    with pytest.raises(ValueError, match=r"weight mid_block\.resnets\.0\.conv1\.weight holds NaN or inf"):
        load_pretrained(path)
    out = tmp_path / "out"
    # the command line, in its own process: non-zero exit, one line, no traceback, nothing written
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpm_fast.cli",
            "sample",
            "--model",
            path,
            "--out",
            str(out),
            "-n",
            "2",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(r.stderr)
    assert r.returncode != 0 and "NaN" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_chain_that_overflows_writes_no_chunk(tmp_path):
    net = _tiny_model()
    with torch.no_grad():
        net.conv_out.weight.fill_(3e38)  # finite weights, infinite output
    path = str(tmp_path / "inf.pt")
    save_model(path, net, df.NoiseSchedule.linear(1000), clip_sample=True)
    out = tmp_path / "out"
    code, err = _sample_cli(["--model", path, "--out", str(out), "-n", "4", "--chunk-size", "2", "--steps", "3"])
    print(err)
    assert code != 0 and "\n" not in err
    assert "chunk 0 (samples 0..1)" in err and "model output holds NaN or inf at step 1 of 3 (t=666)" in err
    assert not [n for n in os.listdir(out / "chunks") if n.endswith(".npz")]
    assert not (out / "samples.npz").exists()


def test_sample_check_finite_names_the_step():
    schedule = df.NoiseSchedule.linear(100)

    def model(x, t):  # NaN from t = 40 down
        return x * float("nan") if int(t[0]) <= 40 else torch.zeros_like(x)

    d = df.GaussianDiffusion(model, schedule)
    with pytest.raises(df.NonFiniteSampleError, match=r"model output holds NaN or inf at step 6 of 10 \(t=40\)") as e:
        d.sample(2, shape=(1, 4, 4), seed=0, steps=10, progress=False)
    assert (e.value.step, e.value.timestep, e.value.where) == (6, 40, "model output")
    assert torch.isnan(d.sample(2, shape=(1, 4, 4), seed=0, steps=10, progress=False, check_finite=False)).all()
    # without clipping a huge but finite model output overflows x_t
    d = df.GaussianDiffusion(lambda x, t: torch.full_like(x, 3e38), schedule, clip_sample=False)
    with pytest.raises(df.NonFiniteSampleError, match=r"x_t holds NaN or inf at step [1-4] of 4"):
        d.sample(1, shape=(1, 2, 2), seed=0, steps=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finite = df.GaussianDiffusion(lambda x, t: torch.zeros_like(x), schedule).sample(
            2, shape=(1, 4, 4), seed=0, steps=5, progress=False
        )
    assert torch.isfinite(finite).all()
    for eta in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="eta"):
            d.sample(1, shape=(1, 2, 2), seed=0, steps=4, method="ddim", eta=eta, progress=False)


def test_save_model_names_an_argument_of_the_wrong_type(tmp_path):
    from ddpm_fast.models import save_model

    model, schedule = df.UNet(**TINY), df.NoiseSchedule.linear(10)
    for args, name in (((model, schedule, tmp_path / "a.pt"), "path"), ((tmp_path / "a.pt", schedule, model), "model")):
        with pytest.raises(TypeError, match=f"^{name}:"):
            save_model(*args)
    with pytest.raises(TypeError, match="^schedule:"):
        save_model(tmp_path / "a.pt", model, "linear")
    assert not (tmp_path / "a.pt").exists()
