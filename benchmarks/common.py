"""Timing helpers shared by the benchmarks: interleaved repeats, medians, machine facts, JSON records, and the check
that a row labelled fused (ddpm_fast) was served by ddpm_fast's kernels, not by the reference."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch


def time_per_call(fn, min_time: float = 0.05, max_iters: int = 1000) -> float:
    """Seconds per call of fn(), averaged over enough calls to take about min_time."""
    fn()
    iters, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or iters >= max_iters:
            return elapsed / iters
        iters = min(max_iters, max(iters * 2, int(iters * min_time / max(elapsed, 1e-9))))


def interleaved_medians(providers: dict, repeats: int = 7, min_time: float = 0.05) -> dict[str, dict]:
    """Time every provider once per round, round after round; report median, quartiles, the fastest round and
    every round's time (paired_ratio compares two providers round by round)."""
    samples = {name: [] for name in providers}
    for fn in providers.values():  # warm-up: first-touch page faults, lazy init
        fn()
    for _ in range(repeats):
        for name, fn in providers.items():
            samples[name].append(time_per_call(fn, min_time))
    out = {}
    for name, xs in samples.items():
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        out[name] = {
            "median_s": statistics.median(xs),
            "q1_s": q[0],
            "q3_s": q[2],
            "min_s": min(xs),
            "repeats": len(xs),
            "rounds_s": xs,  # per round, in order: for ratios paired round by round
        }
    return out


def paired_ratio(res: dict, num: str, den: str) -> float:
    """Median over rounds of time(num) / time(den), each pair timed in the same round: a neighbour's load on this
    shared machine that slows a whole round cancels out, which a ratio of the two medians does not do."""
    return statistics.median(a / b for a, b in zip(res[num]["rounds_s"], res[den]["rounds_s"]))


def steady_malloc() -> bool:
    """Re-executes the script with glibc's mmap and trim thresholds raised (once; True after that), so that freed
    blocks are reused: a provider that allocates its result on every call (torch's eager ops, SDPA, oneDNN's
    linear) then runs in its fast mode instead of page-faulting a fresh multi-MB block each time."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**31 - 1), MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # glibc reads them at start-up only
    return True


def sgemm_providers(n: int = 1024) -> dict:
    """The machine's fp32 n^3 matrix product by each library torch links, as benchmark providers: MKL's sgemm
    (torch.mm, into a preallocated out=) and oneDNN's (its linear, which allocates its result: run it under
    steady_malloc). MKL takes its AVX2 path on AMD CPUs while oneDNN JIT-compiles for the widest ISA, so on an
    AVX-512 AMD CPU the two differ by about 2x; the ceiling is the faster one (best_sgemm)."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    bt = b.t().contiguous()  # linear computes a @ weight^T
    providers = {f"MKL sgemm {n}^3": lambda: torch.mm(a, b, out=c)}
    if torch.backends.mkldnn.is_available():
        providers[f"oneDNN sgemm {n}^3"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    return providers


def best_sgemm(res: dict, names, stat: str = "median_s") -> str:
    """The fastest of the providers `names` (sgemm_providers' keys) in interleaved_medians' result, by `stat`."""
    return min(names, key=lambda n: res[n][stat])


def check_fused(label: str, calls, backend: str | None = None, ops=None) -> str:
    """What served a fused row (``calls``: the ``ops.trace()`` of one run of it), as the row's ``served``. A row the
    reference served (any op of it), that ran no ddpm_fast op, or, where given, ran on another backend than
    ``backend`` or without one of ``ops``, ends the benchmark: non-zero exit, one line naming the row."""
    from ddpm_fast.ops import FusedPathError

    try:
        calls.require_fused(label, backend=backend, ops=ops)
    except FusedPathError as e:
        raise SystemExit(f"benchmark row not fused: {e}") from None
    return calls.summary()


def fused_row(label: str, fn, backend: str | None = None, ops=None) -> str:
    """Run a fused row's timed callable once under ``ops.trace()``: :func:`check_fused` of that run."""
    from ddpm_fast import ops as dops

    with dops.trace() as calls:
        fn()
    return check_fused(label, calls, backend, ops)


def served(fn) -> str:
    """What served one run of fn() (a reference row's ``served``)."""
    from ddpm_fast import ops as dops

    with dops.trace() as calls:
        fn()
    return calls.summary()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import ddpm_fast
    from ddpm_fast import _threads

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu}",
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "backends": ddpm_fast.backends(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cores": os.cpu_count(),
        "omp_wait_policy": _threads.wait_policy(),  # as OpenMP read it (ddpm_fast/_threads.py)
    }


def write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


class PeakMemory:
    """Peak memory of a block of work, in MB above the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, tensors only). CPU: the process's resident set read from
    /proc/self/statm every 2 ms by a thread (tensors, workspaces and allocator caches alike; None where /proc
    does not exist).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import threading

        try:
            self._base = self._peak = self._rss()
        except OSError:
            self._base = None
            return self
        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(0.002):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.peak_mb = (self._peak - self._base) / 2**20
        return False
