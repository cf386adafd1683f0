"""Sharded, crash-safe sampling (ddpm_fast.sample): same images whatever the world size, resume after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast.models import load_pretrained, save_model
from ddpm_fast.sample import sample_to_folder, to_uint8_nhwc

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


def _manifest(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def _stats(out):
    folder = os.path.join(out, "chunks")
    return {
        n: (os.stat(os.path.join(folder, n)).st_ino, os.stat(os.path.join(folder, n)).st_mtime_ns)
        for n in os.listdir(folder)
    }


def test_folder_holds_the_keyed_samples(tiny, tmp_path):
    out = str(tmp_path / "out")
    path = sample_to_folder(tiny, out, 10, seed=3, chunk_size=4, batch_size=2, steps=20, progress=False)
    images = np.load(path)["arr_0"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    # the same samples drawn directly, in the same forward batches: bit for bit
    model, schedule, sampling = load_pretrained(tiny)
    d = df.GaussianDiffusion(model, schedule, **sampling)
    direct = [to_uint8_nhwc(d.sample(2, seed=3, sample_offset=o, steps=20, progress=False)) for o in range(0, 10, 2)]
    assert np.array_equal(images, np.concatenate(direct))
    entries = _manifest(out)
    assert sorted(e["chunk"] for e in entries) == [0, 1, 2] and [
        e["count"] for e in sorted(entries, key=lambda e: e["chunk"])
    ] == [4, 4, 2]
    assert os.path.getsize(os.path.join(out, "grid.png")) > 0
    assert not [n for n in os.listdir(os.path.join(out, "chunks")) if n.endswith(".tmp")]


def test_rerun_skips_finished_chunks_and_recovers_unrecorded_ones(tiny, tmp_path):
    out = str(tmp_path / "out")
    sample_to_folder(tiny, out, 12, seed=1, chunk_size=4, batch_size=4, steps=10, progress=False)
    full = np.load(os.path.join(out, "samples.npz"))["arr_0"]
    # a crash: chunk 2 lost, chunk 1 renamed into place but killed before its manifest line, a stray temp file
    os.remove(os.path.join(out, "chunks", "000002.npz"))
    keep = [e for e in _manifest(out) if e["chunk"] == 0]
    with open(os.path.join(out, "manifest.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in keep)
    open(os.path.join(out, "chunks", "000002.npz.abc.tmp"), "wb").write(b"partial")
    os.remove(os.path.join(out, "samples.npz"))
    before = _stats(out)
    sample_to_folder(tiny, out, 12, seed=1, chunk_size=4, batch_size=4, steps=10, progress=False)
    after = _stats(out)
    assert after["000000.npz"] == before["000000.npz"] and after["000001.npz"] == before["000001.npz"]
    assert "000002.npz.abc.tmp" not in after
    entries = _manifest(out)
    assert sorted(e["chunk"] for e in entries) == [0, 1, 2]  # each chunk recorded once
    assert [e.get("recovered", False) for e in sorted(entries, key=lambda e: e["chunk"])] == [False, True, False]
    assert np.array_equal(np.load(os.path.join(out, "samples.npz"))["arr_0"], full)


def test_refuses_a_folder_of_other_settings_and_bad_input(tiny, tmp_path):
    out = str(tmp_path / "out")
    sample_to_folder(tiny, out, 4, seed=0, chunk_size=4, steps=5, progress=False)
    with pytest.raises(ValueError, match=r"out: .*seed: 0 -> 1"):
        sample_to_folder(tiny, out, 4, seed=1, chunk_size=4, steps=5, progress=False)
    with pytest.raises(ValueError, match="n: expected a positive int"):
        sample_to_folder(tiny, str(tmp_path / "o2"), 0)
    with pytest.raises(ValueError, match="chunk_size"):
        sample_to_folder(tiny, str(tmp_path / "o2"), 4, chunk_size=-1)
    with pytest.raises(ValueError, match="dtype"):
        sample_to_folder(tiny, str(tmp_path / "o2"), 4, dtype="float64")
    with pytest.raises(FileNotFoundError, match="model"):
        sample_to_folder(str(tmp_path / "missing.pt"), str(tmp_path / "o2"), 4)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpm_fast.cli",
            "sample",
            "--model",
            str(tmp_path / "junk.pt"),
            "--out",
            str(tmp_path / "o3"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "not a readable checkpoint" in r.stderr


def test_loads_a_diffusers_pipeline_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ddpm_fast.models.loading import DIFFUSERS_CIFAR10_CONFIG

    torch.manual_seed(0)
    cfg = dict(DIFFUSERS_CIFAR10_CONFIG, sample_size=8, block_out_channels=(32, 32, 32, 32), norm_num_groups=8)
    pipe = diffusers.DDPMPipeline(
        unet=diffusers.UNet2DModel(**cfg), scheduler=diffusers.DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    )
    pipe.save_pretrained(tmp_path / "pipe")
    model, schedule, sampling = load_pretrained(str(tmp_path / "pipe"))
    assert torch.equal(schedule.betas, pipe.scheduler.betas.double()) and sampling["clip_sample"] is False
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        err = (model(x, t) - pipe.unet(x, t).sample).abs().max().item()
    print(f"diffusers folder: forward max error {err:.2e}")
    assert err < 1e-4
    path = sample_to_folder(str(tmp_path / "pipe"), str(tmp_path / "out"), 3, steps=4, progress=False)
    assert np.load(path)["arr_0"].shape == (3, 8, 8, 3)


# ---------------------------------------------------------------------------------------------- torchrun
def _torchrun(tiny, out, nproc, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "ddpm_fast.sample", "--model", tiny, "--out", out, "-n", "40", "--chunk-size", "4"]
    cmd += ["--batch-size", "4", "--steps", "60", "--seed", "7", "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_torchrun_two_ranks_equal_one_and_survive_a_killed_rank(tiny, tmp_path):
    single = str(tmp_path / "single")
    ref = np.load(sample_to_folder(tiny, single, 40, seed=7, chunk_size=4, batch_size=4, steps=60, progress=False))[
        "arr_0"
    ]

    two = str(tmp_path / "two")
    p = _torchrun(tiny, two, 2)
    log = p.communicate(timeout=240)[0]
    assert p.returncode == 0, log
    assert np.array_equal(np.load(os.path.join(two, "samples.npz"))["arr_0"], ref)
    assert {e["rank"] for e in _manifest(two)} == {0, 1}

    killed = str(tmp_path / "killed")
    p = _torchrun(tiny, killed, 2)
    manifest, deadline = os.path.join(killed, "manifest.jsonl"), time.time() + 120
    while time.time() < deadline and not (os.path.exists(manifest) and len(open(manifest).read().splitlines()) >= 2):
        time.sleep(0.02)
    workers = _children(p.pid)
    assert len(workers) == 2, f"expected 2 worker processes under torchrun, found {workers}"
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-run; torchrun tears the other down
    log = p.communicate(timeout=120)[0]
    assert p.returncode != 0, log
    finished = _manifest(killed)
    print(f"killed after {len(finished)} of 10 chunks")
    assert 2 <= len(finished) < 10 and not os.path.exists(os.path.join(killed, "samples.npz"))
    before = _stats(killed)

    p = _torchrun(tiny, killed, 2)
    log = p.communicate(timeout=240)[0]
    assert p.returncode == 0, log
    after = _stats(killed)
    assert all(after[name] == before[name] for name in before if name.endswith(".npz"))  # finished chunks untouched
    chunks = [e["chunk"] for e in _manifest(killed)]
    assert sorted(chunks) == list(range(10))  # every chunk exactly once, none lost
    assert np.array_equal(np.load(os.path.join(killed, "samples.npz"))["arr_0"], ref)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m", "unipc"])
def test_multistep_folder_holds_the_keyed_samples(tiny, tmp_path, method):
    out = str(tmp_path / "out")
    path = sample_to_folder(tiny, out, 4, seed=5, chunk_size=4, batch_size=2, steps=8, method=method, progress=False)
    model, schedule, sampling = load_pretrained(tiny)
    d = df.GaussianDiffusion(model, schedule, **sampling)
    opts = dict(seed=5, steps=8, method=method, progress=False)
    direct = [to_uint8_nhwc(d.sample(2, sample_offset=o, **opts)) for o in (0, 2)]
    assert np.array_equal(np.load(path)["arr_0"], np.concatenate(direct))
    with pytest.raises(ValueError, match="eta"):
        sample_to_folder(tiny, str(tmp_path / "o2"), 4, method=method, eta=0.5)
    with pytest.raises(ValueError, match="method"):
        sample_to_folder(tiny, str(tmp_path / "o3"), 4, method=method + "_4m")
