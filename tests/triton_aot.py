"""Ahead-of-time compile check: every Triton kernel of ddpm_fast compiled for real GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks the kernels' numbers but never compiles them: it does not specialise
arguments, lower to PTX, allocate shared memory or registers. This check does. A compile-only Triton driver
reports a target (sm_80 and sm_90) and turns every launch into a compile (``warmup``), and the autotuner into a
compile of each configuration it would time, so the package's own launch wrappers run unchanged through the public
ops and get exactly the argument specialisation of a real launch (an int argument equal to 1 becomes a constant,
multiples of 16 get divisibility hints, pointers alignment hints, ints past 2**31 become i64).

The tensors are on torch's ``meta`` device: shapes and strides without memory (so batch sizes whose element
offsets pass 2**31 cost nothing), and any read of a device value on the host in a launch path (a host
synchronisation per step on a GPU) raises. Each compiled variant must:

- compile (ptxas included, with the wheel's own ptxas);
- fit the target's shared memory per block (sm_80: 166,912 B, sm_90: 232,448 B), and its registers x threads
  the 65,536 registers of a block;
- use no local memory (register spills; ``cuobjdump --dump-resource-usage`` of the cubin);
- be launched with a grid within CUDA's limits (x < 2**31, y and z <= 65,535).

    python -m tests.triton_aot            # every launch configuration, both targets; prints the variant count
    python -m tests.triton_aot --quick    # one dtype and layout each (a smoke run)
    python -m tests.triton_aot --arch 90 --family step   # one target, one family of launches
    python -m tests.triton_aot --self-test  # the check catches each kind of defect it looks for

Works with the Triton version installed (3.9 here; 3.6 on the H200 machine: tests/test_triton_aot.py runs it
under each Triton it finds).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("tests/triton_aot.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import autotuner as _autotuner  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

# target -> (shared memory a block may use, bytes)
TARGETS = {80: 166_912, 90: 232_448}
REGISTERS_PER_BLOCK = 65_536
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)
META = torch.device("meta")


class CompileOnlyDriver(DriverBase):
    """A Triton driver with a target and no device: what JITFunction needs to compile, nothing to launch."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("compile-only driver: nothing is launched")

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"aot-sm{self.target.arch}"  # JITFunction keeps one kernel cache per device: one per target

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return META

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing is timed")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("compile-only driver: nothing is timed")

    def clear_cache(self, cache):
        pass


@dataclass
class Variant:
    name: str
    arch: int
    shared: int
    num_warps: int
    registers: int = -1
    local: int = -1
    launches: list[str] = field(default_factory=list)


@dataclass
class Report:
    variants: dict = field(default_factory=dict)  # (arch, hash) -> Variant
    failures: list = field(default_factory=list)  # (launch, arch, message)
    launches: int = 0

    def problems(self) -> list[str]:
        out = [f"sm_{arch} {launch}: {message}" for launch, arch, message in self.failures]
        for v in self.variants.values():
            if v.shared > TARGETS[v.arch]:
                out.append(f"sm_{v.arch} {v.name}: {v.shared} B of shared memory > {TARGETS[v.arch]} ({v.launches[0]})")
            if v.local != 0:
                out.append(f"sm_{v.arch} {v.name}: {v.local} B of local memory (register spills) ({v.launches[0]})")
            if v.registers * 32 * v.num_warps > REGISTERS_PER_BLOCK:
                out.append(
                    f"sm_{v.arch} {v.name}: {v.registers} registers x {32 * v.num_warps} threads > "
                    f"{REGISTERS_PER_BLOCK} ({v.launches[0]})"
                )
        return out


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"cuobjdump not found at {path} (it ships with the triton wheel)")
    return path


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers a thread, local memory bytes a thread) of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    reg, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    if reg is None or local is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text}")
    return int(reg.group(1)), int(local.group(1))


class _Recorder:
    """Patches JITFunction.run (every launch a compile, recorded with its grid) and Autotuner.run (every
    configuration it would time compiled, none timed)."""

    def __init__(self, report: Report):
        self.report = report
        self.launch = "?"
        self.arch = 0

    def jit_run(self, fn, *args, grid, warmup, **kwargs):
        kernel = self._original_jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
        if callable(grid):
            grid = grid({**dict(zip(fn.arg_names, args)), **kwargs})
        grid = tuple(grid) + (1,) * (3 - len(grid))
        for axis, (g, limit) in enumerate(zip(grid, GRID_LIMITS)):
            if not 0 < int(g) <= limit:
                self.report.failures.append((self.launch, self.arch, f"{fn.__name__}: grid axis {axis} = {g}"))
        key = (self.arch, kernel.hash)
        v = self.report.variants.get(key)
        if v is None:
            v = self.report.variants[key] = Variant(
                fn.__name__, self.arch, kernel.metadata.shared, kernel.metadata.num_warps
            )
            v.registers, v.local = resource_usage(kernel.asm["cubin"])
        v.launches.append(self.launch)
        return kernel

    def autotune_run(self, tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            for config in tuner.prune_configs(kwargs):
                tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()})
        finally:
            tuner.nargs = None

    @contextlib.contextmanager
    def installed(self):
        self._original_jit_run = _jit.JITFunction.run
        original_driver = driver._active
        original_tune = _autotuner.Autotuner.run
        recorder = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            return recorder.jit_run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        def autotune_run(tuner, *args, **kwargs):
            return recorder.autotune_run(tuner, *args, **kwargs)

        _jit.JITFunction.run = jit_run
        _autotuner.Autotuner.run = autotune_run
        try:
            yield
        finally:
            _jit.JITFunction.run = self._original_jit_run
            _autotuner.Autotuner.run = original_tune
            driver._active = original_driver

    def compile_all(self, launches, arches) -> None:
        for arch in arches:
            driver.set_active(CompileOnlyDriver(arch))
            self.arch = arch
            for description, fn in launches:
                self.launch = description
                self.report.launches += 1
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - every failure is recorded, the rest still compiles
                    message = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                    self.report.failures.append((description, arch, message))
                    if os.environ.get("DDPM_FAST_AOT_VERBOSE"):
                        traceback.print_exc()


@contextlib.contextmanager
def triton_on_meta():
    """ddpm_fast's dispatch with the Triton backend available for meta tensors (nothing else changes)."""
    from ddpm_fast.ops import _triton

    original = _triton.unavailable
    _triton.unavailable = lambda: None
    try:
        yield
    finally:
        _triton.unavailable = original


# ------------------------------------------------------------------------------------------ launch configurations
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 32-bit halves 0, 1 and 2**32 - 1 (an argument equal to 1 is specialised to a constant by Triton's JIT)
SEEDS = (0, 1, 2**32, 2**32 - 1, 2**64 - 1, (2**32 - 1) << 32 | 1)
# odd, the CIFAR-10 batch, and one whose element offsets pass 2**31 (256x256 RGB, 16384 images: 3.2e9 elements)
STEP_SHAPES = ((3, 3, 5, 7), (1, 1, 1, 1), (256, 3, 32, 32), (64, 4, 256, 256), (16384, 3, 256, 256), (70000, 3, 8, 8))
# the CIFAR-10 U-Net's GroupNorm inputs (32 groups), an odd one, and a large batch
NORM_SHAPES = ((8, 128, 32, 32), (8, 256, 16, 16), (8, 256, 8, 8), (8, 256, 4, 4), (64, 256, 32, 32), (3, 12, 5, 7))
NORM_SHAPES += ((1, 6, 1, 1), (2, 96, 15, 15), (4096, 128, 32, 32), (70000, 32, 2, 2))


def _tensor(shape, dtype, channels_last=False):
    x = torch.empty(shape, dtype=dtype, device=META)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _unipc_rows(B, order, corrector_order, s):
    """UniPC's (B, 14) rows of a middle step (host tensors: the launch reads them before any kernel runs)."""
    from ddpm_fast.reference.unipc_step import unipc_coefficients

    t, t_next, *hist = (torch.full((B,), v) for v in (500, 400, 600, 700, 800))
    return unipc_coefficients(t, t_next, s, "epsilon", hist, order, corrector_order).float()


def step_launches(quick: bool):
    import ddpm_fast as df

    s = df.NoiseSchedule.linear()
    dtypes = DTYPES[:1] if quick else DTYPES
    shapes = STEP_SHAPES[:3] if quick else STEP_SHAPES
    for dtype, shape, cl in itertools.product(dtypes, shapes, (False, True)):
        if quick and cl:
            continue
        B = shape[0]
        x, m, z = (_tensor(shape, dtype, cl) for _ in range(3))
        t_dev = torch.zeros(B, dtype=torch.int64, device=META)
        tag = f"{tuple(shape)} {str(dtype)[6:]} {'NHWC' if cl else 'NCHW'}"
        for clip, x0 in ((False, False), (True, True), (True, False)):
            yield (
                f"ddpm_step given {tag} clip={clip} x0_out={x0}",
                lambda x=x, m=m, z=z, clip=clip, x0=x0: df.ops.ddpm_step(
                    x, m, 500, s, z, clip_sample=clip, backend="triton", x0_out=torch.empty_like(x) if x0 else None
                ),
            )
        yield f"ddpm_step last step (no noise) {tag}", lambda x=x, m=m: df.ops.ddpm_step(x, m, 0, s, backend="triton")
        yield (
            f"ddpm_step device t {tag}",
            lambda x=x, m=m, t=t_dev: df.ops.ddpm_step(x, m, t, s, seed=3, backend="triton"),
        )
        yield f"q_sample given {tag}", lambda x=x, z=z, t=t_dev: df.ops.q_sample(x, t, z, s, backend="triton")
        # The multistep kernel (dpmpp_step and unipc_step) has a constexpr configuration per order and variant: the
        # ones with the most operands (third order, UniPC 3/3, the keyed SDE below) compile at every dtype, shape and
        # layout; the lighter ones, whose loads are a subset of those, in fp32 and on the odd shape.
        light = dtype == torch.float32 or shape == STEP_SHAPES[0]
        if light:
            yield (
                f"dpmpp_step first order {tag}",
                lambda x=x, m=m: df.ops.dpmpp_step(x, m, 500, 400, s, backend="triton"),
            )
            yield (
                f"dpmpp_step second order {tag}",
                lambda x=x, m=m, z=z: df.ops.dpmpp_step(x, m, 500, 400, s, z, 600, backend="triton"),
            )
        yield (
            f"dpmpp_step third order {tag}",
            lambda x=x, m=m, z=z: df.ops.dpmpp_step(
                x, m, 500, 400, s, z, 600, x0_last2=m, t_last2=700, backend="triton"
            ),
        )
        for p_order, c_order in ((2, 1), (3, 2), (3, 3)) if light else ((3, 3),):
            yield (
                f"unipc_step predictor {p_order} corrector {c_order} {tag}",
                lambda x=x, m=m, z=z, p=p_order, c=c_order: df.ops.unipc_step(
                    x, m, _unipc_rows(x.shape[0], p, c, s), (z, m, z), x, backend="triton"
                ),
            )
        if light:
            yield (
                f"dpmpp_step sde given noise {tag}",
                lambda x=x, m=m, z=z: df.ops.dpmpp_step(x, m, 500, 400, s, z, 600, sde=True, noise=m, backend="triton"),
            )
        for seed in SEEDS[:2] if quick else SEEDS:
            yield (
                f"ddpm_step keyed {tag} seed={seed:#x}",
                lambda x=x, m=m, seed=seed: df.ops.ddpm_step(
                    x, m, 500, s, seed=seed, clip_sample=True, backend="triton", sample_offset=1
                ),
            )
            yield (
                f"dpmpp_step sde keyed {tag} seed={seed:#x}",
                lambda x=x, m=m, z=z, seed=seed: df.ops.dpmpp_step(
                    x, m, 500, 400, s, z, 600, x0_last2=m, t_last2=700, sde=True, seed=seed, backend="triton"
                ),
            )
            yield (
                f"q_sample keyed {tag} seed={seed:#x}",
                lambda x=x, t=t_dev, seed=seed: df.ops.q_sample(
                    x, t, None, s, seed=seed, sample_offset=seed & 1, backend="triton"
                ),
            )
            yield (
                f"keyed_normal {tag} seed={seed:#x}",
                lambda shape=shape, dtype=dtype, cl=cl, seed=seed: df.ops.keyed_normal(
                    shape,
                    seed=seed,
                    t=7,
                    dtype=dtype,
                    device=META,
                    memory_format=torch.channels_last if cl else torch.contiguous_format,
                    backend="triton",
                ),
            )
        yield (
            f"ddim_step {tag}",
            lambda x=x, m=m: df.ops.ddim_step(x, m, 500, 450, s, eta=0.5, seed=1, backend="triton"),
        )


def norm_launches(quick: bool):
    import ddpm_fast as df

    dtypes = DTYPES[:1] if quick else DTYPES
    shapes = NORM_SHAPES[:2] if quick else NORM_SHAPES
    for dtype, shape, cl in itertools.product(dtypes, shapes, (False, True)):
        groups = 32 if shape[1] % 32 == 0 else 3 if shape[1] % 3 == 0 else 1
        C = shape[1]
        x = _tensor(shape, dtype, cl)
        w, b = torch.empty(C, dtype=dtype, device=META), torch.empty(C, dtype=dtype, device=META)
        add = torch.empty(shape[:2], dtype=dtype, device=META)
        tag = f"{tuple(shape)} {str(dtype)[6:]} {'NHWC' if cl else 'NCHW'}"
        for silu, with_add in ((True, True), (True, False), (False, False)):
            yield (
                f"group_norm_silu {tag} silu={silu} add={with_add}",
                lambda x=x, w=w, b=b, a=add, s=silu, wa=with_add, g=groups: df.ops.group_norm_silu(
                    x, g, w, b, silu=s, add=a if wa else None, backend="triton"
                ),
            )
        yield (
            f"group_norm_silu in place {tag}",
            lambda x=x, w=w, b=b, g=groups: df.ops.group_norm_silu(x, g, w, b, backend="triton", out=x),
        )


# (B, heads, N queries, M keys, head dim, value head dim): the U-Net's (16x16 and 4x4 at 256 channels), odd ones,
# and head dims up to 512
ATTENTION_SHAPES = ((8, 1, 256, 256, 256, 256), (8, 1, 16, 16, 256, 256), (256, 4, 256, 256, 64, 64))
ATTENTION_SHAPES += ((2, 2, 70, 130, 24, 40), (1, 4, 7, 5, 3, 3), (1, 1, 33, 40, 512, 512), (1, 1, 33, 40, 320, 320))
ATTENTION_SHAPES += ((1, 1, 64, 64, 128, 128), (4096, 16, 1024, 1024, 32, 32))


def attention_launches(quick: bool):
    import ddpm_fast as df

    dtypes = DTYPES[:1] if quick else DTYPES
    shapes = ATTENTION_SHAPES[:3] if quick else ATTENTION_SHAPES
    for dtype, (B, H, N, M, D, Dv) in itertools.product(dtypes, shapes):
        tag = f"{(B, H, N, M, D, Dv)} {str(dtype)[6:]}"

        def qkv(B=B, H=H, N=N, M=M, D=D, Dv=Dv, dtype=dtype):  # the U-Net's layout: heads inside a (B, N, 3C) row
            if N == M and D == Dv:
                rows = torch.empty(B, N, 3 * H * D, dtype=dtype, device=META)
                return [rows[..., i * H * D : (i + 1) * H * D].view(B, N, H, D).transpose(1, 2) for i in range(3)]
            return [torch.empty(B, H, n, d, dtype=dtype, device=META) for n, d in ((N, D), (M, D), (M, Dv))]

        yield f"attention {tag}", lambda qkv=qkv: df.ops.attention(*qkv(), backend="triton")
        yield (
            f"attention residual {tag}",
            lambda qkv=qkv, B=B, H=H, N=N, Dv=Dv, dtype=dtype: df.ops.attention(
                *qkv(), residual=torch.empty(B, H, N, Dv, dtype=dtype, device=META), backend="triton"
            ),
        )


def unet_launches(quick: bool):
    """The CIFAR-10 U-Net's forward on the Triton backend, and the graphed sampler's body, as gpu_check runs them."""
    import ddpm_fast as df
    from ddpm_fast.graphs import GraphedSampler

    s = df.NoiseSchedule.linear()
    for dtype, B in itertools.product(DTYPES[:1] if quick else (torch.float32, torch.bfloat16), (1, 256)):

        def forward(dtype=dtype, B=B):
            model = df.UNet.ddpm_cifar10().to(META, dtype).eval().set_backend("triton")
            with torch.inference_mode():
                x = torch.empty(B, 3, 32, 32, dtype=dtype, device=META)
                df.ops.ddpm_step(
                    x, model(x, torch.zeros(B, dtype=torch.int64, device=META)), 500, s, seed=1, backend="triton"
                )

        def graphed(dtype=dtype, B=B):
            model = df.UNet.ddpm_cifar10().to(META, dtype).eval()
            d = df.GaussianDiffusion(model, s, backend="triton")
            GraphedSampler(d, B, (3, 32, 32), [999, 500], device=META, dtype=dtype, capture=False).sample(seed=1)

        yield f"U-Net forward + step, batch {B} {str(dtype)[6:]}", forward
        yield f"graphed sampler body, batch {B} {str(dtype)[6:]}", graphed


def gpu_check_launches(quick: bool):
    """Every row benchmarks/gpu_check.py times that launches the package's Triton kernels (its launch_plan, the
    one that drives its timing), on meta tensors: the quick plan with --quick, else the full one."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import gpu_check

    for launch in gpu_check.launch_plan(quick, "meta"):
        if launch.triton and not launch.needs:
            yield f"gpu_check {launch.name}", launch.fn


FAMILIES = {
    "step": step_launches,
    "norm": norm_launches,
    "attention": attention_launches,
    "unet": unet_launches,
    "gpu_check": gpu_check_launches,
}


def all_launches(quick: bool, families=tuple(FAMILIES)):
    for name in families:
        yield from FAMILIES[name](quick)


# -------------------------------------------------------------------------------- the check's own defects caught
@triton.jit
def _specialised_key(out_ptr, k0):  # the keyed-noise defect: k0 == 1 becomes a constant, which has no .to
    tl.store(out_ptr, k0.to(tl.uint32))


@triton.jit
def _big_tiles(a_ptr, out_ptr, BLOCK: tl.constexpr):  # fp32 tiles past any target's shared memory
    r = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for i in range(0, 4):
        a = tl.load(a_ptr + i * BLOCK * BLOCK + r[:, None] * BLOCK + r[None, :])
        acc += tl.dot(a, a, input_precision="ieee")
    tl.store(out_ptr + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def _copy(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def self_test() -> int:
    """Runs one launch of each defect kind the check looks for; every one must be reported (0 when all are)."""
    x = torch.empty(1 << 20, device=META)
    expect = {
        "seed half 1 specialised": (lambda: _specialised_key[(1,)](x, 1), "AttributeError"),
        "shared memory": (lambda: _big_tiles[(1,)](x, x, BLOCK=128, num_stages=5), "shared memory"),
        "grid axis 1": (lambda: _copy[(1, 70000)](x, x, 16, BLOCK=16), "grid axis 1"),
    }
    report = run(launches=[(name, fn) for name, (fn, _) in expect.items()])
    problems = report.problems()
    missed = [
        f"{name} (expected {needle!r})"
        for name, (_, needle) in expect.items()
        if not any(name in p and needle in p for p in problems)
    ]
    if len(problems) == 0 or missed:
        print("self-test FAILED: not reported:", "; ".join(missed))
        return 1
    clean = run(launches=[("clean copy", lambda: _copy[(4,)](x, x, 1000, BLOCK=256))]).problems()
    if clean:
        print("self-test FAILED: a clean launch was reported:", clean)
        return 1
    # the keyed kernels compile once whatever the seed: no seed half is specialised, typed i64 or made a constant
    import ddpm_fast as df

    keyed = run(
        arches=(90,),
        launches=[
            (
                f"keyed_normal seed={seed:#x}",
                lambda seed=seed: df.ops.keyed_normal((2, 3, 4, 4), seed=seed, t=7, device=META, backend="triton"),
            )
            for seed in SEEDS
        ],
    )
    if keyed.problems() or len(keyed.variants) != 1:
        print(f"self-test FAILED: {len(SEEDS)} seeds made {len(keyed.variants)} keyed_normal variants, not 1")
        return 1
    print(
        f"self-test: all {len(expect)} defect kinds reported ({len(problems)} problems), a clean launch passes, "
        f"{len(SEEDS)} seeds share one keyed-noise variant"
    )
    return 0


def run(arches=tuple(TARGETS), quick: bool = False, launches=None, families=tuple(FAMILIES)) -> Report:
    report = Report()
    recorder = _Recorder(report)
    with triton_on_meta(), recorder.installed():
        recorder.compile_all(list(launches if launches is not None else all_launches(quick, families)), arches)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one dtype and layout per op: a smoke run")
    p.add_argument("--arch", type=int, action="append", choices=sorted(TARGETS), help="a target (default: all)")
    p.add_argument("--family", action="append", choices=list(FAMILIES), help="one family of launches (default: all)")
    p.add_argument("--self-test", action="store_true", help="check that each kind of defect is reported")
    args = p.parse_args(argv)
    if args.self_test:
        return self_test()
    t0 = time.perf_counter()
    report = run(tuple(args.arch or TARGETS), args.quick, families=tuple(args.family or FAMILIES))
    problems = report.problems()
    by_arch = {a: sum(1 for v in report.variants.values() if v.arch == a) for a in TARGETS}
    for v in sorted(report.variants.values(), key=lambda v: (v.arch, v.name, v.shared)):
        print(
            f"sm_{v.arch} {v.name:24s} warps {v.num_warps} regs {v.registers:3d} local {v.local} shared {v.shared:6d}"
        )
    for line in problems:
        print("FAIL", line)
    counts = ", ".join(f"sm_{a}: {n}" for a, n in by_arch.items() if n)
    print(
        f"triton {triton.__version__} AOT check: {len(report.variants)} variants compiled ({counts}) from "
        f"{report.launches} launches, {len(problems)} problems, {time.perf_counter() - t0:.0f} s"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
