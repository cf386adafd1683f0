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
import numbers
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import append_line, atomic_write, check_output_folder, sha256_file

# every setting that changes the images' bits: a rerun into the same folder must repeat them
_RUN_KEYS = (
    "model_sha256",
    "n",
    "seed",
    "chunk_size",
    "batch_size",
    "steps",
    "method",
    "eta",
    "dtype",
    "shape",
    "device",
    "backend",
)
RUN_FORMAT = "ddpm_fast.samples/2"


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


def _run_id(identity: dict) -> str:
    return hashlib.sha256(json.dumps({k: identity[k] for k in _RUN_KEYS}, sort_keys=True).encode()).hexdigest()


def _chunk_name(c: int) -> str:
    return os.path.join("chunks", f"{c:06d}.npz")


def _write_chunk(out: str, c: int, images: np.ndarray, run: dict) -> str:
    """The chunk's images and what they are (run, chunk, count, sha256 of the pixels), in one file, atomically."""
    meta = dict(
        run_id=run["run_id"],
        chunk=c,
        first_index=c * run["chunk_size"],
        count=len(images),
        sha256=hashlib.sha256(np.ascontiguousarray(images).data).hexdigest(),
    )
    path = os.path.join(out, _chunk_name(c))
    atomic_write(path, lambda f: np.savez(f, images=images, meta=np.array(json.dumps(meta))))
    return path


def _check_chunk(out: str, c: int, count: int, shape_hwc, run_id: str) -> str | None:
    """None when the chunk's file holds this run's chunk ``c`` intact; else why not ("missing" or the damage)."""
    path = os.path.join(out, _chunk_name(c))
    if not os.path.exists(path):
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as z:
            images, meta = z["images"], json.loads(str(z["meta"]))
    except Exception as e:  # noqa: BLE001 - a damaged zip, array or JSON: the chunk is not usable
        return f"unreadable ({type(e).__name__})"
    if not isinstance(meta, dict) or meta.get("run_id") != run_id or meta.get("chunk") != c:
        return "of another run"
    if images.dtype != np.uint8 or images.shape != (count, *shape_hwc):
        return f"of another shape {images.dtype}{images.shape}"
    if hashlib.sha256(np.ascontiguousarray(images).data).hexdigest() != meta.get("sha256"):
        return "damaged (its pixels fail their sha256)"
    return None


def _read_manifest(out: str, run_id: str) -> tuple[dict[int, list[dict]], int]:
    """This run's manifest records by chunk, oldest first, and the number of lines that could not be read.

    A line cut short (a kill or a power loss during its write) or otherwise unreadable is skipped; so are records
    of another run.
    """
    entries: dict[int, list[dict]] = {}
    torn = 0
    path = os.path.join(out, "manifest.jsonl")
    if not os.path.exists(path):
        return entries, torn
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                e = json.loads(raw)
                ok = isinstance(e, dict) and isinstance(e.get("chunk"), int) and isinstance(e.get("sha256"), str)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if not ok or not raw.endswith(b"\n"):
                torn += 1
            elif e.get("run_id") == run_id:
                entries.setdefault(e["chunk"], []).append(e)
    return entries, torn


def _read_run(run_path: str) -> dict:
    try:
        with open(run_path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"out: {run_path} is not a readable run record ({type(e).__name__}: {e}); move it away to start the "
            "folder afresh, or use a new --out"
        ) from None
    if not isinstance(old, dict):
        raise ValueError(f"out: {run_path} holds a {type(old).__name__}, not a run record; use a new --out")
    return old


def _holds_samples(out: str) -> bool:
    chunks = os.path.join(out, "chunks")
    return (os.path.isdir(chunks) and any(n.endswith(".npz") for n in os.listdir(chunks))) or os.path.exists(
        os.path.join(out, "manifest.jsonl")
    )


def _check_folder(out: str, run: dict) -> bool:
    """Rank 0, before anything is written: whether ``out`` may take this run (True: write its run.json).

    A folder holding samples of other settings is refused (ValueError); one whose run.json names other settings
    but that holds no samples yet takes the new ones.
    """
    check_output_folder(out)
    run_path = os.path.join(out, "run.json")
    if not os.path.exists(run_path):
        return True
    old = _read_run(run_path)
    if old.get("format") != RUN_FORMAT:
        if not _holds_samples(out):
            return True
        raise ValueError(
            f"out: {out} holds samples of another format ({old.get('format', 'an older ddpm_fast')}); use a new --out"
        )
    diff = [k for k in _RUN_KEYS if old.get(k) != run[k]]
    if not diff:
        return False
    if not _holds_samples(out):
        print(f"out: {out} holds no samples yet: its settings are replaced", file=sys.stderr)
        return True
    changes = ", ".join(f"{k}: {old.get(k)!r} -> {run[k]!r}" for k in diff)
    raise ValueError(f"out: {out} holds samples of other settings ({changes}); use a new --out or the same settings")


def _prepare_folder(out: str, run: dict, fresh: bool, num_chunks: int, counts, shape_hwc) -> None:
    """Rank 0, before anyone samples: write run.json, drop temporary files, re-verify chunks, repair the manifest."""
    os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
    manifest_path = os.path.join(out, "manifest.jsonl")
    if fresh:
        if os.path.exists(manifest_path):
            os.remove(manifest_path)  # the records of settings replaced (the folder held no samples)
        atomic_write(os.path.join(out, "run.json"), lambda f: f.write(json.dumps(run, indent=1).encode()))
    ours = ("run.json.", "manifest.jsonl.", "samples.npz.", "grid.png.")
    for folder, prefixes in ((out, ours), (os.path.join(out, "chunks"), ("",))):
        for name in os.listdir(folder):
            if name.endswith(".tmp") and name.startswith(prefixes):  # a write cut short by a kill: not finished
                os.remove(os.path.join(folder, name))
    manifest, torn = _read_manifest(out, run["run_id"])
    if torn:  # rewrite the manifest without them, so that the next record starts on a line of its own
        print(f"out: {manifest_path}: skipped {torn} unreadable line(s) (a write cut short)", file=sys.stderr)
        records = [e for c in sorted(manifest) for e in manifest[c]]
        atomic_write(manifest_path, lambda f: f.write("".join(json.dumps(e) + "\n" for e in records).encode()))
    damaged = []
    for c in range(num_chunks):
        why = _check_chunk(out, c, counts[c], shape_hwc, run["run_id"])
        path = os.path.join(out, _chunk_name(c))
        if why == "missing":
            continue
        if why is not None:
            damaged.append(c)
            os.remove(path)
            continue
        # a verified chunk that no record matches (renamed into place just before a kill, or the manifest lost):
        # it is complete (renames are atomic and follow an fsync), so record it rather than sample it again
        sha = sha256_file(path)
        if not any(e["sha256"] == sha for e in manifest.get(c, [])):
            entry = dict(chunk=c, first_index=c * run["chunk_size"], count=counts[c], file=_chunk_name(c))
            append_line(manifest_path, json.dumps(dict(entry, sha256=sha, run_id=run["run_id"], recovered=True)))
    if damaged:
        print(f"out: chunk(s) {damaged[:10]} failed their check and are sampled again", file=sys.stderr)


def _finished(out: str, num_chunks: int, counts, shape_hwc, run_id: str) -> set[int]:
    """The chunks whose files hold this run's samples intact (the latest record matching each file is its own)."""
    return {c for c in range(num_chunks) if _check_chunk(out, c, counts[c], shape_hwc, run_id) is None}


def _lock(out: str):
    """Rank 0's exclusive lock on ``out`` for the run: a second sampling job into it is refused."""
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        os.close(fd)
        raise ValueError(f"out: another sampling job is writing into {out}") from None
    return fd


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
def _positive_int(name: str, v, high: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 or (high is not None and v > high):
        raise ValueError(f"{name}: expected a positive int{f' <= {high}' if high else ''}, got {v!r}")
    return int(v)


def _device(device) -> torch.device:
    """The device to sample on (under torchrun: this rank's GPU), or ValueError saying why it cannot be used."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected cpu or cuda, got {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device: cuda asked for, but no CUDA GPU is usable here (torch.cuda.is_available() is False)"
            )
        local = int(os.environ.get("LOCAL_RANK", dev.index or 0))
        if local >= torch.cuda.device_count():
            raise ValueError(f"device: cuda:{local} asked for, but there are {torch.cuda.device_count()} GPU(s)")
        dev = torch.device("cuda", local)
    return dev


def _backend(backend, dev: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs the sampler's steps (None: the one chosen automatically), or ValueError why not."""
    from .ops._registry import resolve

    if backend is not None and backend not in ("torch", "cpu", "triton", "cuda"):
        raise ValueError(f"backend: expected torch, cpu, triton or cuda, got {backend!r}")
    try:
        return resolve("ddpm_step", backend, dev, dtype=dtype)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise ValueError(f"backend: {e}") from None


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

    Every setting, the model file and the folder are checked before anything is written (ValueError, or
    FileNotFoundError for a missing model). ``OUT/run.json`` records each setting that changes the images' bits
    (model sha256, n, seed, chunk and batch size, steps, method, eta, dtype, device type, backend); a rerun with
    other settings is refused while the folder holds samples. A chunk whose chain gives NaN or inf is not written:
    :class:`ddpm_fast.NonFiniteSampleError` names the chunk and the step.
    """
    from .diffusion import GaussianDiffusion, NonFiniteSampleError
    from .models import load_pretrained

    n = _positive_int("n", n, 2**32)
    chunk_size = _positive_int("chunk_size", chunk_size)
    batch_size = _positive_int("batch_size", batch_size)
    grid = _positive_int("grid", grid)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")
    if steps is not None:
        steps = _positive_int("steps", steps)
    from .diffusion import METHODS

    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a finite number >= 0, got {eta!r}")
    if method != "ddim" and eta != 0:
        raise ValueError(f"eta: only DDIM takes eta (--method ddim), got eta={eta} with method {method}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
    dev = _device(device)
    step_backend = _backend(backend, dev, getattr(torch, dtype))
    check_output_folder(out)

    net, schedule, sampling = load_pretrained(model)  # checked: a damaged, changed or NaN model is refused here
    T = len(schedule)
    if steps is not None and steps > T:
        raise ValueError(f"steps: expected an int in [1, {T}] (the model's timesteps), got {steps}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    net = net.to(device=dev, dtype=getattr(torch, dtype))
    net.set_backend("torch" if backend == "torch" else None)
    diffusion = GaussianDiffusion(net, schedule, backend=backend, **sampling)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    shape_hwc = (shape[1], shape[2], shape[0])
    num_chunks = math.ceil(n / chunk_size)
    counts = [min(chunk_size, n - c * chunk_size) for c in range(num_chunks)]
    run = dict(
        format=RUN_FORMAT,
        model=os.path.abspath(model),
        n=n,
        seed=int(seed),
        chunk_size=chunk_size,
        batch_size=batch_size,
        steps=steps or T,
        method=method,
        eta=float(eta),
        dtype=dtype,
        shape=list(shape),
        device=dev.type,
        backend=step_backend,
    )

    group = _Group(dev)
    lock = None
    try:
        error = None
        if group.rank == 0:  # only rank 0 checks the folder: it alone hashes the model
            try:
                run["model_sha256"] = _model_fingerprint(model)
                run["run_id"] = _run_id(run)
                fresh = _check_folder(out, run)  # nothing written until the folder is known to take this run
                os.makedirs(out, exist_ok=True)
                lock = _lock(out)
                _prepare_folder(out, run, fresh, num_chunks, counts, shape_hwc)
            except (ValueError, OSError) as e:
                error = e
        if group.total(error is not None):  # every rank stops if rank 0 refuses the folder
            raise error or ValueError(f"out: rank 0 refused {out}")
        group.barrier()
        if group.rank != 0:
            run = _read_run(os.path.join(out, "run.json"))
        done = _finished(out, num_chunks, counts, shape_hwc, run["run_id"])
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
                try:
                    produced = _sample_chunk(diffusion, out, mine[r], counts, run, group, progress and lead)
                except NonFiniteSampleError as e:
                    c = mine[r]
                    first = c * chunk_size
                    raise NonFiniteSampleError(
                        f"chunk {c} (samples {first}..{first + counts[c] - 1}): {e}; nothing written for it",
                        e.step,
                        e.timestep,
                        e.where,
                    ) from None
            bar.update(group.total(produced))
            bar.set_postfix(chunks=f"{len(done) + min(len(todo), (r + 1) * group.world)}/{num_chunks}")
        bar.close()
        group.barrier()
        if not lead:
            return None
        path = _assemble(out, num_chunks, counts, shape_hwc, grid, run["run_id"])
        elapsed = time.perf_counter() - start
        sampled = sum(counts[c] for c in todo)
        print(
            f"{n} samples in {path} ({sampled} sampled now in {elapsed:.1f} s on {group.world} rank(s), "
            f"{len(done)} chunk(s) from before); grid: {os.path.join(out, 'grid.png')}",
            file=sys.stderr,
        )
        return path
    finally:
        if lock is not None:
            os.close(lock)
        group.close()


def _sample_chunk(diffusion, out, c, counts, run, group, inner_progress) -> int:
    t0 = time.perf_counter()
    first = c * run["chunk_size"]
    parts = []
    for s in range(0, counts[c], run["batch_size"]):
        b = min(run["batch_size"], counts[c] - s)
        x = diffusion.sample(
            b,
            seed=run["seed"],
            sample_offset=first + s,
            steps=run["steps"],
            method=run["method"],
            eta=run["eta"],
            progress=inner_progress,
            check_finite=True,
        )
        parts.append(to_uint8_nhwc(x))
    path = _write_chunk(out, c, np.concatenate(parts), run)
    entry = dict(
        chunk=c,
        first_index=first,
        count=counts[c],
        file=_chunk_name(c),
        sha256=sha256_file(path),
        run_id=run["run_id"],
        rank=group.rank,
        world_size=group.world,
        seconds=round(time.perf_counter() - t0, 3),
    )
    append_line(os.path.join(out, "manifest.jsonl"), json.dumps(entry))
    return counts[c]


def _assemble(out, num_chunks, counts, shape_hwc, grid, run_id) -> str:
    done = _finished(out, num_chunks, counts, shape_hwc, run_id)
    missing = [c for c in range(num_chunks) if c not in done]
    if missing:
        raise RuntimeError(f"out: chunks {missing[:10]} are missing after every rank finished")
    parts = []
    for c in range(num_chunks):
        with np.load(os.path.join(out, _chunk_name(c)), allow_pickle=False) as z:
            parts.append(z["images"])
    images = np.concatenate(parts)
    path = os.path.join(out, "samples.npz")
    atomic_write(path, lambda f: np.savez(f, arr_0=images))
    save_image_grid(images[:grid], os.path.join(out, "grid.png"))
    return path


# ---------------------------------------------------------------------------------------------- command line
def build_parser(prog: str = "python -m ddpm_fast.sample") -> argparse.ArgumentParser:
    from ._console import Parser

    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", required=True, help="checkpoint file or diffusers folder")
    p.add_argument("--out", required=True, help="output folder (resumes when it holds a run of the same settings)")
    p.add_argument("-n", "--num-samples", dest="n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=64, help="global indices per chunk file (fixed per folder)")
    p.add_argument("--batch-size", type=int, default=64, help="images per U-Net forward")
    p.add_argument("--steps", type=int, default=None, help="respaced steps (default: every timestep)")
    p.add_argument(
        "--method", default="ddpm", choices=["ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m", "unipc"]
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--backend", default=None, choices=["torch", "cpu", "triton", "cuda"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--grid", type=int, default=64, help="images in grid.png")
    p.add_argument("--quality", action="store_true", help="digits models: print the digits quality figures")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None, prog: str = "python -m ddpm_fast.sample") -> None:
    from ._console import USER_ERRORS, one_line_warnings

    args = build_parser(prog).parse_args(argv)
    one_line_warnings()
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
    except USER_ERRORS as e:
        sys.exit(f"{prog}: {e}")
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted; rerun the same command to resume (finished chunks are kept)")
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
