"""Provenance of op calls: which backend and kernel served each call of a ``ddpm_fast.ops`` op.

    with ddpm_fast.ops.trace() as calls:
        model(x, t)
    calls.require_fused()          # raises FusedPathError if any op ran on the reference (or none ran)
    print(calls.summary())         # "attention cpu/flash x3, conv2d cpu/winograd x22, ..."

Every op records one :class:`Call` where its kernel is chosen, after validation and resolution and after any
per-op fallback (attention's cuda -> triton, a dtype a kernel lacks): the record names what actually ran. With no
trace open the cost is one truth test per call. Traces nest; each open trace sees every call made on any thread
while it is open.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass

REFERENCE = "torch"  # the backend name of the plain-PyTorch reference (ddpm_fast/reference)


class FusedPathError(RuntimeError):
    """A path that should have run ddpm_fast's kernels ran the reference (or ran no op at all)."""


@dataclass(frozen=True)
class Call:
    op: str  # the public op: "ddpm_step", "conv2d", "linear", ...
    backend: str  # "torch" (the reference), "cpu", "triton" or "cuda"
    kernel: str  # what served it within the backend: "reference", "winograd", "onednn", "mkl", "flash", ...

    @property
    def fused(self) -> bool:
        return self.backend != REFERENCE

    def __str__(self) -> str:
        return f"{self.op} {self.backend}/{self.kernel}"


class Trace(list):
    """The calls recorded while a :func:`trace` was open, in order."""

    def counts(self) -> collections.Counter:
        """How often each (op, backend, kernel) served."""
        return collections.Counter((c.op, c.backend, c.kernel) for c in self)

    def ops(self) -> set[str]:
        return {c.op for c in self}

    def backends(self) -> set[str]:
        return {c.backend for c in self}

    def reference(self) -> list[Call]:
        """The calls the reference served."""
        return [c for c in self if not c.fused]

    def summary(self) -> str:
        if not self:
            return "no ddpm_fast op ran"
        return ", ".join(f"{op} {b}/{k} x{n}" for (op, b, k), n in sorted(self.counts().items()))

    def require_fused(self, what: str = "this path", backend: str | None = None, ops=None) -> Trace:
        """Raise FusedPathError unless some op ran and every call was served by a fused backend (``backend``, if
        given); ``ops``: op names that must each have run at least once. Returns self."""
        if not self:
            raise FusedPathError(f"{what}: no ddpm_fast op ran (nothing fused served it)")
        bad = [c for c in self if not c.fused or (backend is not None and c.backend != backend)]
        if bad:
            served = Trace(bad).summary()
            wanted = f"the {backend} backend" if backend else "a fused backend"
            raise FusedPathError(f"{what}: expected every op on {wanted}, but {served}")
        missing = sorted(set(ops or ()) - self.ops())
        if missing:
            raise FusedPathError(f"{what}: expected {', '.join(missing)} to run; ran {self.summary()}")
        return self


_lock = threading.Lock()
_open: list[Trace] = []


def record(op: str, backend: str, kernel: str) -> None:
    """Called by each op where its kernel is chosen."""
    if _open:
        call = Call(op, backend, kernel)
        with _lock:
            for t in _open:
                t.append(call)


@contextlib.contextmanager
def trace():
    """Record every op call made while open (see the module docstring)."""
    t = Trace()
    with _lock:
        _open.append(t)
    try:
        yield t
    finally:
        with _lock:
            del _open[next(i for i, u in enumerate(_open) if u is t)]  # by identity: traces are lists
