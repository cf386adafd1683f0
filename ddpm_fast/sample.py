"""Sharded, crash-safe sampling to a folder: ``python -m ddpm_fast.sample`` (or ``ddpm-fast sample``).

Run it as one process, or under ``torchrun`` for several (gloo on CPU, NCCL on GPUs; multi-node through
torchrun's rendezvous, with ``--out`` on a shared filesystem)::

    torchrun --nproc_per_node=2 -m ddpm_fast.sample --model runs/digits/checkpoint.pt --out runs/samples -n 50000

The samples 0..n-1 are cut into fixed chunks of ``--chunk-size`` global indices. Sample i draws all of its
noise from the keyed generator at (seed, i), so it is the same image whichever rank, world size or chunk
produces it (and, for a fixed ``--batch-size``, bit for bit). Each finished chunk is written atomically
(temporary file, fsync, rename) to ``OUT/chunks/`` and then recorded in ``OUT/manifest.jsonl``; a rerun with
the same settings skips every finished chunk, so a killed run resumes without writing any sample twice. At the
end rank 0 assembles ``OUT/samples.npz`` (``arr_0``: uint8 NHWC, what FID tools read) and ``OUT/grid.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import append_line, atomic_write, sha256_file

# settings that change the images: a rerun into the same folder must repeat them
_RUN_KEYS = ("model_sha256", "n", "seed", "chunk_size", "steps", "method", "eta", "dtype", "shape")


# ---------------------------------------------------------------------------------------------- process group
class _Group:
    """rank / world size from torchrun's environment; a process group only when there are several ranks."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.dist = dist

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def total(self, count: int) -> int:
        """Sum of ``count`` over the ranks."""
        if self.world == 1:
            return count
        t = torch.tensor([count], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.world > 1:
            self.dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the folder
def _model_fingerprint(path: str) -> str:
    """sha256 of the checkpoint file, or of a diffusers folder's configs and weights."""
    if not os.path.isdir(path):
        return sha256_file(path)
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.endswith((".json", ".safetensors", ".bin"))]
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(os.path.relpath(f, path).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def _chunk_name(c: int) -> str:
    return os.path.join("chunks", f"{c:06d}.npy")


def _read_manifest(out: str) -> dict[int, dict]:
    """Manifest entries by chunk; a line cut short by a kill (it cannot be, one write each, but still) is skipped."""
    entries: dict[int, dict] = {}
    path = os.path.join(out, "manifest.jsonl")
    if not os.path.exists(path):
        return entries
    with open(path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict) and "chunk" in e:
                entries.setdefault(int(e["chunk"]), e)
    return entries


def _chunk_ok(out: str, c: int, count: int, shape_hwc: tuple[int, ...], sha: str | None = None) -> bool:
    path = os.path.join(out, _chunk_name(c))
    if not os.path.exists(path):
        return False
    if sha is not None:
        return sha256_file(path) == sha
    try:
        a = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return a.dtype == np.uint8 and a.shape == (count, *shape_hwc)


def _prepare_folder(out: str, run: dict, num_chunks: int, counts, shape_hwc) -> None:
    """Rank 0, before anyone samples: check the run settings, drop temporary files, repair the manifest."""
    os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
    run_path = os.path.join(out, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            old = json.load(f)
        diff = [k for k in _RUN_KEYS if old.get(k) != run[k]]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {run[k]!r}" for k in diff)
            raise ValueError(
                f"out: {out} holds samples of other settings ({changes}); use a new --out or the same settings"
            )
    else:
        atomic_write(run_path, lambda f: f.write(json.dumps(run, indent=1).encode()))
    for name in os.listdir(os.path.join(out, "chunks")):
        if name.endswith(".tmp"):  # a write cut short by a kill: its chunk is not finished
            os.remove(os.path.join(out, "chunks", name))
    manifest = _read_manifest(out)
    for c in range(num_chunks):
        # a chunk renamed into place just before a kill, but not yet in the manifest: it is complete (renames are
        # atomic and follow an fsync), so record it rather than sample it again
        if c not in manifest and _chunk_ok(out, c, counts[c], shape_hwc):
            path = os.path.join(out, _chunk_name(c))
            entry = dict(chunk=c, first_index=c * run["chunk_size"], count=counts[c], file=_chunk_name(c))
            append_line(
                os.path.join(out, "manifest.jsonl"), json.dumps(dict(entry, sha256=sha256_file(path), recovered=True))
            )


def _finished(out: str, num_chunks: int, counts, shape_hwc) -> set[int]:
    manifest = _read_manifest(out)
    return {
        c
        for c in range(num_chunks)
        if c in manifest and _chunk_ok(out, c, counts[c], shape_hwc, manifest[c].get("sha256"))
    }


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounded as diffusers' pipelines do."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def save_image_grid(images: np.ndarray, path: str, scale: int | None = None) -> None:
    """uint8 NHWC images as one PNG grid (square-ish, 1-pixel white gutters)."""
    from PIL import Image

    n, h, w, c = images.shape
    nrow = math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = scale or max(1, 256 // max(grid.shape[:2]))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


# ---------------------------------------------------------------------------------------------- the job
def sample_to_folder(
    model: str,
    out: str,
    n: int,
    *,
    seed: int = 0,
    chunk_size: int = 64,
    batch_size: int = 64,
    steps: int | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
    backend: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    grid: int = 64,
    progress: bool = True,
) -> str | None:
    """Sample ``n`` images of the model at ``model`` (a checkpoint file or diffusers folder) into ``out``.

    Call it from every rank (or once, alone). Returns the path of ``samples.npz`` on rank 0, None elsewhere.
    """
    from .diffusion import GaussianDiffusion
    from .models import load_pretrained

    for name, v in (("n", n), ("chunk_size", chunk_size), ("batch_size", batch_size), ("grid", grid)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)

    net, schedule, sampling = load_pretrained(model)
    net = net.to(device=dev, dtype=getattr(torch, dtype))
    net.set_backend("torch" if backend == "torch" else None)
    diffusion = GaussianDiffusion(net, schedule, backend=backend, **sampling)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    shape_hwc = (shape[1], shape[2], shape[0])
    num_chunks = math.ceil(n / chunk_size)
    counts = [min(chunk_size, n - c * chunk_size) for c in range(num_chunks)]
    run = dict(
        model=os.path.abspath(model),
        n=n,
        seed=seed,
        chunk_size=chunk_size,
        steps=steps,
        method=method,
        eta=eta,
        dtype=dtype,
        shape=list(shape),
    )

    group = _Group(dev)
    try:
        error = None
        if group.rank == 0:  # only rank 0 checks the folder: it alone hashes the model
            try:
                _prepare_folder(out, dict(run, model_sha256=_model_fingerprint(model)), num_chunks, counts, shape_hwc)
            except ValueError as e:
                error = e
        if group.total(error is not None):  # every rank stops if rank 0 refuses the folder
            raise error or ValueError(f"out: rank 0 refused {out}")
        group.barrier()
        done = _finished(out, num_chunks, counts, shape_hwc)
        todo = [c for c in range(num_chunks) if c not in done]
        mine = todo[group.rank :: group.world]
        rounds = math.ceil(len(todo) / group.world)
        lead = group.rank == 0
        bar = tqdm(
            total=n,
            initial=sum(counts[c] for c in done),
            unit="img",
            desc=f"sampling ({group.world} rank{'s' if group.world > 1 else ''})",
            disable=not (progress and lead),
            dynamic_ncols=True,
        )
        bar.set_postfix(chunks=f"{len(done)}/{num_chunks}")
        start = time.perf_counter()
        for r in range(rounds):  # one chunk a rank a round, then the images/s over all ranks on rank 0's bar
            produced = 0
            if r < len(mine):
                produced = _sample_chunk(diffusion, out, mine[r], counts, run, batch_size, group, progress and lead)
            bar.update(group.total(produced))
            bar.set_postfix(chunks=f"{len(done) + min(len(todo), (r + 1) * group.world)}/{num_chunks}")
        bar.close()
        group.barrier()
        if not lead:
            return None
        path = _assemble(out, num_chunks, counts, shape_hwc, grid)
        elapsed = time.perf_counter() - start
        sampled = sum(counts[c] for c in todo)
        print(
            f"{n} samples in {path} ({sampled} sampled now in {elapsed:.1f} s on {group.world} rank(s), "
            f"{len(done)} chunk(s) from before); grid: {os.path.join(out, 'grid.png')}",
            file=sys.stderr,
        )
        return path
    finally:
        group.close()


def _sample_chunk(diffusion, out, c, counts, run, batch_size, group, inner_progress) -> int:
    t0 = time.perf_counter()
    first = c * run["chunk_size"]
    parts = []
    for s in range(0, counts[c], batch_size):
        b = min(batch_size, counts[c] - s)
        x = diffusion.sample(
            b,
            seed=run["seed"],
            sample_offset=first + s,
            steps=run["steps"],
            method=run["method"],
            eta=run["eta"],
            progress=inner_progress,
        )
        parts.append(to_uint8_nhwc(x))
    images = np.concatenate(parts)
    path = os.path.join(out, _chunk_name(c))
    atomic_write(path, lambda f: np.save(f, images))
    entry = dict(
        chunk=c,
        first_index=first,
        count=counts[c],
        file=_chunk_name(c),
        sha256=sha256_file(path),
        rank=group.rank,
        world_size=group.world,
        seconds=round(time.perf_counter() - t0, 3),
    )
    append_line(os.path.join(out, "manifest.jsonl"), json.dumps(entry))
    return counts[c]


def _assemble(out, num_chunks, counts, shape_hwc, grid) -> str:
    done = _finished(out, num_chunks, counts, shape_hwc)
    missing = [c for c in range(num_chunks) if c not in done]
    if missing:
        raise RuntimeError(f"out: chunks {missing[:10]} are missing after every rank finished")
    images = np.concatenate([np.load(os.path.join(out, _chunk_name(c))) for c in range(num_chunks)])
    path = os.path.join(out, "samples.npz")
    atomic_write(path, lambda f: np.savez(f, arr_0=images))
    save_image_grid(images[:grid], os.path.join(out, "grid.png"))
    return path


# ---------------------------------------------------------------------------------------------- command line
def build_parser(prog: str = "python -m ddpm_fast.sample") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", required=True, help="checkpoint file or diffusers folder")
    p.add_argument("--out", required=True, help="output folder (resumes when it holds a run of the same settings)")
    p.add_argument("-n", "--num-samples", dest="n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=64, help="global indices per chunk file (fixed per folder)")
    p.add_argument("--batch-size", type=int, default=64, help="images per U-Net forward")
    p.add_argument("--steps", type=int, default=None, help="respaced steps (default: every timestep)")
    p.add_argument("--method", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--backend", default=None, choices=["torch", "cpu", "triton", "cuda"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--grid", type=int, default=64, help="images in grid.png")
    p.add_argument("--quality", action="store_true", help="digits models: print the digits quality figures")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None, prog: str = "python -m ddpm_fast.sample") -> None:
    args = build_parser(prog).parse_args(argv)
    try:
        path = sample_to_folder(
            args.model,
            args.out,
            args.n,
            seed=args.seed,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            steps=args.steps,
            method=args.method,
            eta=args.eta,
            backend=args.backend,
            device=args.device,
            dtype=args.dtype,
            grid=args.grid,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, TypeError) as e:
        sys.exit(f"{prog}: {e}")
    if path is not None:
        print(path)
        if args.quality:
            from .digits import DigitsClassifier

            images = np.load(path)["arr_0"]
            if images.shape[1:] != (8, 8, 1):
                sys.exit(f"{prog}: --quality needs digits (8x8x1 images), got {images.shape[1:]}")
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            print(DigitsClassifier().quality(x))


if __name__ == "__main__":
    main()
