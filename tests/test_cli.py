"""The command line against a hostile user: every mistake one line on stderr and a non-zero exit, checked before
any work; run folders that a refused setting, a torn manifest, a lost manifest or a damaged chunk cannot poison;
train-digits that checks --out before training, cleans up after a kill and applies --lr on resume."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast.models import save_model

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model") / "tiny.pt")
    save_model(path, df.UNet(**TINY), df.NoiseSchedule.linear(1000), clip_sample=True)
    return path


def cli(argv, capsys):
    """``ddpm-fast ...`` in this process: (exit status, stderr). A traceback would fail the test as an exception."""
    from ddpm_fast.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    err = capsys.readouterr().err
    print(err)
    return code, err


def one_line_error(code, err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert "Traceback" not in err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def sample(tiny, out, *extra):
    return ["sample", "--model", tiny, "--out", str(out), "-n", "6", "--chunk-size", "2", "--batch-size", "2",
            "--steps", "2", "--no-progress", *extra]  # fmt: skip


def _images(out):
    return np.load(os.path.join(out, "samples.npz"))["arr_0"]


def _manifest_lines(out):
    with open(os.path.join(out, "manifest.jsonl"), "rb") as f:
        return f.read().splitlines(keepends=True)


def _unwritable_folder(tmp_path):
    """A folder path this process cannot create: under a regular file (root writes into read-only folders)."""
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "out"


# ---------------------------------------------------------------------------------------------- sample: mistakes
def test_sample_mistakes_are_one_line_and_write_nothing(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    cases = [
        (["--steps", "0"], "steps"),
        (["--steps", "-3"], "steps"),
        (["--steps", "1001"], "steps"),
        (["--eta", "nan", "--method", "ddim"], "eta"),
        (["--eta", "inf", "--method", "ddim"], "eta"),
        (["--eta", "-1", "--method", "ddim"], "eta"),
        (["--eta", "0.5"], "eta"),  # eta with DDPM sampling would be ignored
        (["--eta", "0.5", "--method", "sde_dpmpp_2m"], "eta"),
        (["--method", "dpmpp_4m"], "--method"),
        (["-n", "0"], "n:"),
        (["--chunk-size", "0"], "chunk_size"),
        (["--batch-size", "-1"], "batch_size"),
        (["--grid", "0"], "grid"),
        (["--seed", "-1"], "seed"),
        (["--steps", "abc"], "--steps"),
        (["--device", "tpu"], "device"),
        (["--backend", "cuda"], "backend"),
        (["--dtype", "float64"], "--dtype"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU"))
    for extra, word in cases:
        code, err = cli(sample(tiny, out, *extra), capsys)
        one_line_error(code, err, word)
        assert not out.exists(), f"{extra} wrote {out}"
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        code, err = cli(sample(tiny, out, "--backend", "triton"), capsys)
        one_line_error(code, err, "backend", "triton")
        assert not out.exists()


def test_sample_out_a_file_or_unwritable(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = cli(sample(tiny, tmp_path / "file"), capsys)
    one_line_error(code, err, "is a file, not a folder")
    code, err = cli(sample(tiny, _unwritable_folder(tmp_path)), capsys)
    one_line_error(code, err, "a_file is a file")
    if os.geteuid() != 0:  # root writes into read-only folders: the case above stands for it there
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            code, err = cli(sample(tiny, ro / "out"), capsys)
            one_line_error(code, err, "not writable")
        finally:
            ro.chmod(0o700)


def test_a_refused_setting_does_not_poison_the_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    ref = tmp_path / "ref"
    assert cli(sample(tiny, ref), capsys)[0] == 0
    for bad in (["--steps", "0"], ["--method", "ddim", "--eta", "nan"], ["--steps", "5000"]):
        one_line_error(*cli(sample(tiny, out, *bad), capsys), bad[-2].lstrip("-"))
        code, err = cli(sample(tiny, out), capsys)  # the corrected rerun into the same folder
        assert code == 0, err
        assert np.array_equal(_images(out), _images(ref))
        shutil.rmtree(out)


def test_the_run_identity_holds_every_setting_that_changes_bits(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(sample(tiny, out), capsys)[0] == 0
    run = json.load(open(out / "run.json"))
    for key in ("model_sha256", "n", "seed", "chunk_size", "batch_size", "steps", "method", "eta", "dtype"):
        assert key in run, key
    assert run["backend"] in ("cpu", "torch") and run["device"] == "cpu" and run["steps"] == 2
    before = _images(out)
    one_line_error(*cli(sample(tiny, out, "--seed", "1"), capsys), "seed: 0 -> 1")
    one_line_error(*cli(sample(tiny, out, "--batch-size", "1"), capsys), "batch_size: 2 -> 1")
    one_line_error(*cli(sample(tiny, out, "--backend", "torch"), capsys), "backend:")
    assert np.array_equal(_images(out), before)
    # a run.json that names other settings over a folder without samples yet gives way
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(out / "run.json", fresh / "run.json")
    code, err = cli(sample(tiny, fresh, "--seed", "3"), capsys)
    assert code == 0 and "holds no samples yet" in err


def test_a_corrupt_run_json_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(sample(tiny, out), capsys)[0] == 0
    for junk in ("{not json", "[1, 2]", ""):
        (out / "run.json").write_text(junk)
        one_line_error(*cli(sample(tiny, out), capsys), "run.json")
    (out / "run.json").write_bytes(b"\xff\xfe\x00")
    one_line_error(*cli(sample(tiny, out), capsys), "run.json")


# ---------------------------------------------------------------------------------------------- sample: healing
def test_the_latest_verified_record_wins_and_torn_lines_are_skipped(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(sample(tiny, out), capsys)[0] == 0
    ref = _images(out)
    lines = _manifest_lines(out)
    # an earlier record of chunk 0 with other bytes (e.g. sampled before and lost), then chunk 2 lost with a torn
    # last line: the chunk regenerated after it must not be swallowed
    stale = dict(json.loads(lines[0]), chunk=0, sha256="0" * 64)
    kept = [json.dumps(stale).encode() + b"\n"] + [l for l in lines if json.loads(l)["chunk"] != 2]
    with open(out / "manifest.jsonl", "wb") as f:
        f.writelines(kept)
        f.write(b'{"chunk": 2, "first_in')
    os.remove(out / "chunks" / "000002.npz")
    os.remove(out / "samples.npz")
    code, err = cli(sample(tiny, out), capsys)
    assert code == 0 and "skipped 1 unreadable line" in err, err
    assert np.array_equal(_images(out), ref)
    records = [json.loads(l) for l in _manifest_lines(out)]  # every line whole again
    assert sorted({r["chunk"] for r in records}) == [0, 1, 2]
    assert cli(sample(tiny, out), capsys)[0] == 0  # and it stays complete


def test_a_lost_manifest_re_verifies_the_chunks(tiny, tmp_path, capsys):
    out, other = tmp_path / "out", tmp_path / "other"
    assert cli(sample(tiny, out), capsys)[0] == 0
    assert cli(sample(tiny, other, "--seed", "5"), capsys)[0] == 0
    ref = _images(out)
    os.remove(out / "manifest.jsonl")
    os.remove(out / "samples.npz")
    # chunk 1 damaged in place (one pixel byte flipped), chunk 2 replaced by the same chunk of another run
    path = out / "chunks" / "000001.npz"
    data = bytearray(path.read_bytes())
    with np.load(path) as z:
        pixels = z["images"].tobytes()
    at = bytes(data).index(pixels) + 5
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    shutil.copy(other / "chunks" / "000002.npz", out / "chunks" / "000002.npz")
    inode0 = os.stat(out / "chunks" / "000000.npz").st_ino
    code, err = cli(sample(tiny, out), capsys)
    assert code == 0 and "[1, 2] failed their check" in err, err
    assert np.array_equal(_images(out), ref)
    assert os.stat(out / "chunks" / "000000.npz").st_ino == inode0  # the intact chunk adopted, not resampled
    records = {json.loads(l)["chunk"]: json.loads(l) for l in _manifest_lines(out)}
    assert records[0].get("recovered") and not records[1].get("recovered")


# ---------------------------------------------------------------------------------------------- train-digits
@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a training step starts."""
    import ddpm_fast.digits as digits

    def refuse(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(digits.GaussianDiffusion, "loss", refuse)


def train(out, *extra):
    return ["train-digits", "--out", str(out), "--batch", "4", "--no-progress", *extra]


def test_train_mistakes_fail_before_training(tmp_path, capsys, no_training):
    pytest.importorskip("sklearn")
    (tmp_path / "file").write_text("x")
    one_line_error(*cli(train(tmp_path / "file", "--steps", "1"), capsys), "is a file, not a folder")
    one_line_error(*cli(train(_unwritable_folder(tmp_path), "--steps", "1"), capsys), "a_file is a file")
    out = tmp_path / "out"
    for extra, word in [
        (["--steps", "0"], "steps"),
        (["--lr", "nan"], "lr"),
        (["--lr", "-1"], "lr"),
        (["--lr", "0"], "lr"),
        (["--batch", "0"], "batch_size"),
        (["--minutes", "0"], "max_minutes"),
        (["--minutes", "nan"], "max_minutes"),
        (["--seed", "-2"], "seed"),
        (["--steps", "x"], "--steps"),
        (["--bogus"], "unrecognized"),
    ]:
        one_line_error(*cli(train(out, *extra), capsys), word)
        assert not out.exists()
    if os.geteuid() != 0:  # root writes into read-only folders: the path under a file stands for it there
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            one_line_error(*cli(train(ro / "out", "--steps", "1"), capsys), "not writable")
        finally:
            ro.chmod(0o700)


def test_train_resume_cleans_up_applies_lr_and_refuses_a_tampered_checkpoint(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    from ddpm_fast.digits import load_checkpoint

    out = tmp_path / "run"
    assert cli(train(out, "--steps", "1"), capsys)[0] == 0
    (out / "checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # a kill during a save
    (out / "loss.png.x.tmp").write_bytes(b"")
    code, err = cli(train(out, "--steps", "2", "--lr", "1e-3"), capsys)
    assert code == 0 and "lr 0.0005 -> 0.001 from step 1" in err, err
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == 2 and state["settings"]["lr"] == 1e-3 and state["settings"]["batch_size"] == 4
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert state["setting_changes"] == [dict(step=1, setting="lr", old=5e-4, new=1e-3)]
    code, err = cli(["train-digits", "--out", str(out), "--steps", "3", "--no-progress"], capsys)  # lr kept
    assert code == 0 and load_checkpoint(str(out / "checkpoint.pt"))["settings"]["lr"] == 1e-3
    import ddpm_fast.digits as digits

    monkeypatch.setattr(digits.GaussianDiffusion, "loss", lambda *a, **k: pytest.fail("a training step ran"))
    one_line_error(*cli(train(out, "--steps", "4", "--seed", "1"), capsys), "seed")
    data = bytearray((out / "checkpoint.pt").read_bytes())
    raw = load_checkpoint(str(out / "checkpoint.pt"))["model"]["conv_in.weight"].numpy().tobytes()
    data[bytes(data).index(raw) + 8] ^= 0x01
    (out / "checkpoint.pt").write_bytes(bytes(data))
    one_line_error(*cli(train(out, "--steps", "4"), capsys), "fails its checksum", "checkpoint.pt")


def test_train_stops_on_a_non_finite_loss(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    import ddpm_fast.digits as digits

    out = tmp_path / "run"
    assert cli(train(out, "--steps", "1"), capsys)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(
        digits.GaussianDiffusion, "loss", lambda self, x0: torch.tensor(float("nan"), requires_grad=True)
    )
    one_line_error(*cli(train(out, "--steps", "3"), capsys), "loss is nan at step 2", "keeps step 1")
    assert (out / "checkpoint.pt").read_bytes() == before
