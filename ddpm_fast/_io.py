"""Crash-safe file writes: a file is either absent or complete, never half written."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def fsync_dir(folder: str) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A kill at any point leaves either the previous ``path`` or the new one, plus at most a ``*.tmp`` file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def append_line(path: str, line: str) -> None:
    """Append one line with a single O_APPEND write and fsync: lines from several processes never interleave."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write appending to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- checkpoints
def state_digest(state) -> str:
    """sha256 of a checkpoint's contents: tensors (dtype, shape, bytes), dicts, lists, numbers, strings.

    Computed over the values, not the file, so it is the same however the file was pickled; any other type
    is a ValueError (a checkpoint holds nothing else).
    """
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def _digest(obj, h) -> None:
    import struct

    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, dict):
        keys = sorted(obj, key=lambda k: (type(k).__name__, repr(k)))
        h.update(f"D{len(keys)}:".encode())
        for k in keys:
            _digest(k, h)
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, bool):
        h.update(f"B{obj}:".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj}:".encode())
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}:".encode() + data)
    elif isinstance(obj, bytes):
        h.update(f"Y{len(obj)}:".encode() + obj)
    else:
        raise ValueError(f"holds a value of type {type(obj).__name__}, which no checkpoint holds")


def save_state(path: str, state: dict) -> None:
    """``state`` (plain tensors, dicts, lists, numbers, strings) to ``path`` with its ``sha256``, atomically."""
    import torch

    state = {k: v for k, v in state.items() if k != "sha256"}
    state["sha256"] = state_digest(state)
    atomic_write(path, lambda f: torch.save(state, f))


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _unpickle_refusal(e: BaseException) -> str:
    """What a weights_only load refused, without torch's advice to load the file with weights_only=False."""
    text = str(e)
    if "Weights only load failed" not in text:
        return _short(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next(
        (line for line in lines if line.startswith(("Trying to load", "Unsupported"))),
        lines[-2] if len(lines) > 1 else "",
    )
    if "GLOBAL" in detail:
        return f"it names Python code or objects a checkpoint does not hold ({detail.rstrip('.')}); none of it ran"
    return f"not a tensor file ({detail.rstrip('.')})"


def load_state(path: str, what: str) -> tuple[dict, bool]:
    """``(state, checked)`` of a file written by :func:`save_state` (or an older checkpoint without a checksum).

    Reads with ``torch.load(weights_only=True)``: tensors, dicts, lists, numbers and strings only, so no code in
    the file runs. ``checked``: the file carried a ``sha256`` and it matched. A file that cannot be read, is not a
    dict, or fails its checksum is a ValueError naming ``what`` and the file.
    """
    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no file at {path}")
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path} is a folder, not a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever fails to unpickle is not a checkpoint
        raise ValueError(
            f"{what}: {path} is not a readable checkpoint (damaged, cut short, or not one: {_unpickle_refusal(e)})"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} is not a ddpm_fast checkpoint (it holds a {type(state).__name__})")
    if "sha256" not in state:
        return state, False
    stored = state["sha256"]
    try:
        actual = state_digest({k: v for k, v in state.items() if k != "sha256"})
    except ValueError as e:
        raise ValueError(f"{what}: {path} is not a ddpm_fast checkpoint (it {e})") from None
    if actual != stored:
        raise ValueError(f"{what}: {path} fails its checksum: the file was changed or damaged after it was written")
    return state, True


# ---------------------------------------------------------------------------------------------- folders
def check_output_folder(path: str, what: str = "out") -> None:
    """ValueError unless ``path`` is a folder (or can be made one) that this process can write into.

    Writes nothing: checks the path and the nearest existing folder above it.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{what}: expected a folder path, got {path!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}: {path} is a file, not a folder")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{what}: cannot create {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {probe} is not writable" + (f" (cannot create {path})" if probe != path else ""))
