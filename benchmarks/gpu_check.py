"""GPU check: every fused op against torch eager, and the DDPM CIFAR-10 U-Net sampler step against diffusers
(eager, torch.compile, and CUDA graphs on both sides), on one CUDA device; writes one JSON record with the
device name.

    python benchmarks/gpu_check.py [--json PATH] [--quick] [--budget SECONDS] [--no-compile]
    python benchmarks/gpu_check.py --smoke --json PATH     # CPU tensors, TRITON_INTERPRET=1, toy sizes (CI)
    python benchmarks/gpu_check.py --list [--quick | --smoke]   # the rows it times and what each needs

Run by benchmarks/gpu_check.sh after the install. Memory-bound ops report GB/s next to the device's copy
bandwidth measured in the same rounds; attention reports GFLOP/s; rows whose output has a reference in the same
case carry max_err against it. CUDA events, medians of interleaved rounds. Each row of ddpm_fast's kernels carries
``served``: what ``ops.trace()`` recorded over its setup and first run (a CUDA-graph row's ops run at its capture;
replaying a graph captured by an earlier case records only the noise draw); a row the reference served, or another
backend than its own, is an error row and the others still run.

Sections run in order (the op rows, the sampler per dtype, then the torch.compile rows, whose first compile
takes about a minute each) and each case (one shape/dtype of one op) is wrapped: a provider that fails records
its error in its row and the others still run, a case that fails records its error, and the JSON is written
again before every section and after every case, so a run cut short still leaves what it measured. ``--budget``
skips the cases that would start too late to finish within that many seconds (recorded as skipped).

The launch plan: ``launch_plan(quick, device)`` returns one :class:`Launch` per timed row, whose ``fn`` runs that
row's work once on ``device`` (building its case's inputs there on first use). The timing below runs the same
cases, so a compile check that runs every launch of the plan covers every launch this script makes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddpm_fast as df  # noqa: E402
from ddpm_fast.models.loading import DIFFUSERS_CIFAR10_CONFIG, config_from_diffusers  # noqa: E402

# What a row cannot run without (Launch.needs / Provider.needs).
CUDA = "cuda"  # a CUDA device (CUDA graphs of torch.compile's reduce-overhead mode)
CUDA_EXT = "cuda_ext"  # ddpm_fast's CUDA kernels (ddpm_fast._C_cuda) on a CUDA device
DIFFUSERS = "diffusers"  # the diffusers package
COMPILE = "torch.compile"  # inductor on a CUDA device (off with --no-compile)

SEED = 1  # the keyed rows' seed: a key half equal to 1 is the edge case of Triton's argument specialisation
GRAPH_STEPS = 10  # steps one CUDA-graph call replays: 999, 949, ..., 549


class Provider(NamedTuple):
    """One row of a case. ``make(inputs)`` returns the row's work as a no-argument callable (called once per
    case; anything slow it does, such as a capture or a compile, is reported as the row's setup seconds)."""

    make: Callable[[Any], Callable[[], object]]
    needs: frozenset = frozenset()
    triton: bool = False  # launches ddpm_fast's Triton kernels
    steps: int = 1  # sampler steps one call runs: the row reports ms per step
    ref: str | None = None  # the provider whose output this one's is compared with (max_err)
    check: Callable[[Any, object], dict] | None = None  # (inputs, output) -> extra fields, once, after the warm-up
    setup_op: str | None = None  # the op name of a row reporting make()'s seconds (a capture, a compile)
    fused: bool | str = False  # a row of ddpm_fast's kernels (True: any fused backend; a name: that backend)


class Case:
    """One shape/dtype of one op: its inputs, built on first use on the plan's device, and its providers.

    ``report(name, ms, results)`` gives a row's extra fields (GB/s, GFLOP/s, images/s) from its ms and the whole
    case's results (the copy's bandwidth). ``cost_s`` is a rough guess of the case's first run, for --budget.
    """

    def __init__(self, section, kind, fields, setup, providers, report, iters, cost_s, needs=frozenset()):
        self.section, self.kind, self.fields = section, kind, fields
        self._setup, self.providers, self.report = setup, providers, report
        self.iters, self.cost_s = iters, cost_s
        self.needs = needs  # without these the case is pointless (its other rows are baselines): skipped whole
        self._inputs, self._fns, self.setup_s = None, {}, {}

    @property
    def label(self) -> str:
        f = self.fields
        return " ".join([str(f["op"])] + [f"{k}={str(v).replace(' ', '')}" for k, v in f.items() if k != "op"])

    def inputs(self):
        if self._inputs is None:
            self._inputs = self._setup()
        return self._inputs

    def fn(self, name: str) -> Callable[[], object]:
        """The row's work (its inputs and the provider's setup done on first use)."""
        if name not in self._fns:
            inputs = self.inputs()
            t0 = time.perf_counter()
            self._fns[name] = self.providers[name].make(inputs)
            synchronize(inputs.device)
            self.setup_s[name] = time.perf_counter() - t0
        return self._fns[name]

    def release(self) -> None:
        self._inputs, self._fns = None, {}

    def grad_mode(self):
        """How its rows run: the sampler under inference_mode (as GaussianDiffusion.sample), ops under no_grad. With
        autograd on, the U-Net would run its differentiable path (the reference ops), other launches than timed."""
        return torch.inference_mode() if self.kind == "sampler" else torch.no_grad()


class Launch(NamedTuple):
    """One timed row of gpu_check: ``fn()`` runs its work once on the plan's device.

    ``needs``: what it cannot run without (CUDA, CUDA_EXT, DIFFUSERS, COMPILE); a caller without one of them
    skips the row. ``triton``: it launches ddpm_fast's Triton kernels. The CUDA-graph rows need none of these:
    off CUDA their sampler runs the same step body eagerly (``GraphedSampler(capture=False)``), so the same
    Triton launches as the captured graph.
    """

    name: str
    fn: Callable[[], object]
    needs: frozenset
    triton: bool
    section: str
    provider: str


def launch_plan(quick: bool, device, *, smoke: bool = False, unet_backend: str | None = "default") -> list[Launch]:
    """Every row gpu_check times, as a callable that runs that row's work once on ``device``.

    ``quick``: the --quick shapes; ``smoke``: the --smoke toy sizes. Inputs are built on ``device`` when a row of
    their case first runs (the U-Nets are initialised on the CPU with seed 0, then moved). Rows of a case share
    its inputs, so run them in order and drop the list to free them. On ``device="meta"`` the launches are those
    of a CUDA run (NCHW U-Net); on "cpu" the U-Net runs its CPU inference layout (channels_last), so its
    group-norm launches are the NHWC variants, and with ``unet_backend=None`` (what "cpu" gets unless told) it
    runs the CPU kernels: then only the sampler's step and noise kernels launch Triton. ``unet_backend``: the
    backend of the U-Nets' norms and attention (default "triton", what backend=None picks on CUDA tensors, on
    every device but "cpu").
    """
    return [
        Launch(f"{case.section}: {case.label} {name}", _runner(case, name), p.needs, p.triton, case.section, name)
        for case in cases(quick, device, smoke=smoke, unet_backend=unet_backend)
        for name, p in case.providers.items()
    ]


def _runner(case: Case, name: str) -> Callable[[], object]:
    def run():
        with case.grad_mode():
            return case.fn(name)()

    return run


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ the cases
def cases(quick: bool, device, *, smoke: bool = False, unet_backend: str | None = "default") -> list[Case]:
    """The cases gpu_check times, in order: ops, then the sampler per dtype, then the torch.compile rows."""
    dev = torch.device(device)
    if unet_backend == "default":
        unet_backend = None if dev.type == "cpu" else "triton"
    if smoke:
        step_shapes = [(2, 3, 4, 4)]
        gn = [((2, 64, 4, 4), False), ((2, 64, 4, 4), True)]
        attn, attn_cn = [(2, 1, torch.float32), (2, 4, torch.float32)], (64, 16)
        dtypes, batches, compile_dtypes = [torch.float32], [1, 2], [torch.float32]
    elif quick:
        step_shapes = [(64, 4, 256, 256)]
        gn = [((64, 256, 32, 32), False), ((64, 256, 32, 32), True)]
        attn, attn_cn = [(256, 1, torch.float32), (256, 4, torch.bfloat16)], (256, 256)
        dtypes, batches, compile_dtypes = [torch.float32, torch.bfloat16], [1, 256], [torch.bfloat16]
    else:
        step_shapes = [(256, 3, 32, 32), (64, 4, 256, 256)]
        gn = [((8, 128, 32, 32), False), ((8, 128, 32, 32), True), ((64, 256, 32, 32), True)]
        attn, attn_cn = [(8, 1, torch.float32), (256, 1, torch.bfloat16), (256, 4, torch.bfloat16)], (256, 256)
        dtypes, batches, compile_dtypes = [torch.float32, torch.bfloat16], [1, 256], [torch.bfloat16, torch.float32]
    iters = (1, 1) if smoke else (10, 3) if quick else (20, 5)  # calls per round: ops, sampler
    out = []
    for shape in step_shapes:
        out += [_ddpm_step_case(dev, shape, iters[0]), _q_sample_case(dev, shape, iters[0])]
    out += [_group_norm_case(dev, shape, cl, iters[0]) for shape, cl in gn]
    out += [_attention_case(dev, B, heads, dtype, *attn_cn, iters[0]) for B, heads, dtype in attn]
    models = _Models(dev, smoke, unet_backend)
    for dtype in dtypes:
        out += [_sampler_case(models, dtype, B, iters[1]) for B in batches]
    for dtype in compile_dtypes:
        out += [_compile_case(models, dtype, B, iters[1]) for B in batches]
    return out


def _bandwidth(moved: dict, nbytes: int):
    """report() of a memory-bound case: GB/s from the bytes each provider moves (multiples of one tensor's
    bytes), and that as a share of the copy's GB/s measured in the same rounds."""

    def report(name, ms, res):
        gbs = moved.get(name, moved["*"]) * nbytes / ms / 1e6
        copy_gbs = 2 * nbytes / res["copy"] / 1e6 if res.get("copy") else None
        return dict(gbs=gbs, pct_copy=100 * gbs / copy_gbs if copy_gbs else None)

    return report


def _ddpm_step_case(dev, shape, iters) -> Case:
    s = df.NoiseSchedule.linear()

    def setup():
        x, m, z = (torch.randn(shape, device=dev) for _ in range(3))
        abar = s.alphas_cumprod.to(dev).float()
        t = torch.full((shape[0],), 500, device=dev)
        return SimpleNamespace(
            device=dev, x=x, m=m, z=z, out=torch.empty_like(x), dst=torch.empty_like(x), abar=abar, t=t
        )

    def torch_step(v):
        def run():
            a = v.abar[v.t].view(-1, 1, 1, 1)
            ap = v.abar[v.t - 1].view(-1, 1, 1, 1)
            x0 = ((v.x - (1 - a).sqrt() * v.m) / a.sqrt()).clamp(-1, 1)
            beta = 1 - a / ap
            mean = ap.sqrt() * beta / (1 - a) * x0 + (a / ap).sqrt() * (1 - ap) / (1 - a) * v.x
            return mean + ((1 - ap) / (1 - a) * beta).sqrt() * v.z

        return run

    def step(backend, keyed):
        def make(v):
            noise, seed = (None, SEED) if keyed else (v.z, None)
            return lambda: df.ops.ddpm_step(
                v.x, v.m, 500, s, noise, seed=seed, clip_sample=True, backend=backend, out=v.out
            )

        return make

    providers = {
        "copy": Provider(lambda v: lambda: v.dst.copy_(v.x)),
        "torch eager": Provider(torch_step),
        "triton": Provider(step("triton", False), triton=True, ref="torch eager", fused="triton"),
        "triton keyed": Provider(step("triton", True), triton=True, fused="triton"),
        "cuda": Provider(step("cuda", False), frozenset({CUDA_EXT}), ref="torch eager", fused="cuda"),
        "cuda keyed": Provider(step("cuda", True), frozenset({CUDA_EXT}), ref="triton keyed", fused="cuda"),
    }
    nbytes = _numel(shape) * 4
    report = _bandwidth({"copy": 2, "triton keyed": 3, "cuda keyed": 3, "*": 4}, nbytes)
    return Case("ops", "ops", dict(op="ddpm_step", shape=list(shape)), setup, providers, report, iters, 10)


def _q_sample_case(dev, shape, iters) -> Case:
    s = df.NoiseSchedule.linear()

    def setup():
        x, z = (torch.randn(shape, device=dev) for _ in range(2))
        t = torch.full((shape[0],), 500, device=dev)  # on the device: the Triton path gathers its coefficients there
        sa = s.sqrt_alphas_cumprod.to(dev).float()[t].view(-1, 1, 1, 1)
        sb = s.sqrt_one_minus_alphas_cumprod.to(dev).float()[t].view(-1, 1, 1, 1)
        return SimpleNamespace(
            device=dev,
            x=x,
            z=z,
            t=t,
            t_host=torch.full((shape[0],), 500),
            sa=sa,
            sb=sb,
            out=torch.empty_like(x),
            dst=torch.empty_like(x),
        )

    providers = {
        "copy": Provider(lambda v: lambda: v.dst.copy_(v.x)),
        "torch eager": Provider(lambda v: lambda: v.sa * v.x + v.sb * v.z),
        "triton": Provider(
            lambda v: lambda: df.ops.q_sample(v.x, v.t, v.z, s, backend="triton", out=v.out),
            triton=True,
            ref="torch eager",
            fused="triton",
        ),
        "triton keyed": Provider(
            lambda v: lambda: df.ops.q_sample(v.x, v.t, None, s, seed=SEED, backend="triton"),
            triton=True,
            fused="triton",
        ),
        # the CUDA kernels' glue reads t on the host: given a host t, as their callers do
        "cuda": Provider(
            lambda v: lambda: df.ops.q_sample(v.x, v.t_host, v.z, s, backend="cuda", out=v.out),
            frozenset({CUDA_EXT}),
            ref="torch eager",
            fused="cuda",
        ),
        "cuda keyed": Provider(
            lambda v: lambda: df.ops.q_sample(v.x, v.t_host, None, s, seed=SEED, backend="cuda"),
            frozenset({CUDA_EXT}),
            ref="triton keyed",
            fused="cuda",
        ),
    }
    nbytes = _numel(shape) * 4
    report = _bandwidth({"copy": 2, "*": 3}, nbytes)  # keyed: x0 read, x_t and eps written
    return Case("ops", "ops", dict(op="q_sample", shape=list(shape)), setup, providers, report, iters, 10)


def _group_norm_case(dev, shape, channels_last, iters) -> Case:
    def setup():
        x = torch.randn(shape, device=dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
        return SimpleNamespace(device=dev, x=x, w=w, b=b, dst=torch.empty_like(x))

    def fused(backend):
        return lambda v: lambda: df.ops.group_norm_silu(v.x, 32, v.w, v.b, backend=backend)

    providers = {
        "copy": Provider(lambda v: lambda: v.dst.copy_(v.x)),
        "torch eager": Provider(lambda v: lambda: F.silu(F.group_norm(v.x, 32, v.w, v.b))),
        "triton": Provider(fused("triton"), triton=True, ref="torch eager", fused="triton"),
        "cuda": Provider(fused("cuda"), frozenset({CUDA_EXT}), ref="torch eager", fused="cuda"),
    }
    fields = dict(op="group_norm_silu", shape=list(shape), channels_last=channels_last)
    return Case("ops", "ops", fields, setup, providers, _bandwidth({"*": 2}, _numel(shape) * 4), iters, 10)


def _attention_case(dev, B, heads, dtype, C, N, iters) -> Case:
    def setup():
        qkv = torch.randn(B, N, 3 * C, device=dev, dtype=dtype)  # the U-Net's layout: heads read in place
        q, k, v = (qkv[..., i * C : (i + 1) * C].view(B, N, heads, C // heads).transpose(1, 2) for i in range(3))
        return SimpleNamespace(device=dev, q=q, k=k, v=v)

    providers = {
        "sdpa": Provider(lambda v: lambda: F.scaled_dot_product_attention(v.q, v.k, v.v)),
        "triton": Provider(
            lambda v: lambda: df.ops.attention(v.q, v.k, v.v, backend="triton"), triton=True, ref="sdpa", fused="triton"
        ),
    }
    if dtype != torch.float32:  # the tensor-core kernel runs fp16/bf16 only
        providers["cuda"] = Provider(
            lambda v: lambda: df.ops.attention(v.q, v.k, v.v, backend="cuda"),
            frozenset({CUDA_EXT}),
            ref="sdpa",
            fused="cuda",
        )
    flops = 4 * B * N * N * C

    def report(name, ms, res):
        return dict(gflops=flops / ms / 1e6)

    fields = dict(op="attention", batch=B, heads=heads, head_dim=C // heads, dtype=str(dtype))
    return Case("ops", "ops", fields, setup, providers, report, iters, 10)


class _Models:
    """The U-Nets of the sampler rows, one per dtype, built on first use and shared by the cases: ddpm_fast's
    (the Triton kernels inside, as on any CUDA tensors) and, when diffusers is installed, diffusers' own with
    the same weights; plus one GraphedSampler per (dtype, batch) and one torch.compile per (dtype, batch, mode)."""

    def __init__(self, dev, smoke, unet_backend):
        self.dev, self.smoke, self.unet_backend = dev, smoke, unet_backend
        self.cfg = dict(DIFFUSERS_CIFAR10_CONFIG)
        if smoke:
            self.cfg.update(sample_size=8, block_out_channels=(32, 32, 32, 32), norm_num_groups=8)
        self.size = self.cfg["sample_size"]
        self.schedule = df.NoiseSchedule.linear()
        self._memo = {}

    def memo(self, key, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def get(self, dtype):
        return self.memo(("models", dtype), lambda: self._build(dtype))

    def _build(self, dtype):
        torch.manual_seed(0)
        try:
            import diffusers
        except ImportError:
            diffusers = None
        if diffusers is not None:  # built on the CPU (a meta model has no weights to copy), then moved
            ref = diffusers.UNet2DModel(**self.cfg).eval()
            ours = df.UNet.from_diffusers(ref)
            ref = ref.to(self.dev, dtype)
            sched = diffusers.DDPMScheduler()
        else:
            ref = sched = None
            ours = df.UNet(config_from_diffusers(self.cfg))
        ours = ours.to(self.dev, dtype).eval().set_backend(self.unet_backend)
        d = df.GaussianDiffusion(ours, self.schedule, backend="triton")
        return SimpleNamespace(ours=ours, ref=ref, sched=sched, diffusion=d)

    def graphed(self, dtype, B, capture=None):
        from ddpm_fast.graphs import GraphedSampler

        timesteps = list(range(999, 999 - 50 * GRAPH_STEPS, -50))
        d = self.get(dtype).diffusion
        build = lambda: GraphedSampler(  # noqa: E731
            d, B, (3, self.size, self.size), timesteps, device=self.dev, dtype=dtype, capture=capture
        )
        return self.memo(("graphed", dtype, B, capture), build)

    def compiled(self, dtype, B, mode):
        return self.memo(("compiled", dtype, B, mode), lambda: torch.compile(self.get(dtype).ref, mode=mode))


def _sampler_inputs(models, dtype, B):
    def setup():
        m = models.get(dtype)
        x = torch.randn(B, 3, models.size, models.size, device=models.dev, dtype=dtype)
        t = torch.full((B,), 500, device=models.dev)
        return SimpleNamespace(device=models.dev, x=x, t=t, **vars(m))

    return setup


def _images_per_s(B):
    def report(name, ms, res):
        return dict(images_per_s=B / ms * 1e3)

    return report


def _sampler_providers(models, dtype, B) -> dict[str, Provider]:
    s = models.schedule

    def ours_step(v):
        return lambda: df.ops.ddpm_step(v.x, v.ours(v.x, v.t), 500, s, seed=SEED, clip_sample=True, backend="triton")

    def unet_vs_diffusers(v, out):
        if v.ref is None:
            return {}
        err = (v.ours(v.x, v.t).float() - v.ref(v.x, v.t).sample.float()).abs().max().item()
        return dict(unet_max_err_vs_diffusers=err)

    def graphed(v):
        gs = models.graphed(dtype, B)
        gs.sample(seed=SEED)  # the capture (warm-up included) on a CUDA device
        return lambda: gs.sample(seed=SEED)

    def graph_vs_eager(v, out):  # the captured graph against the same step body run eagerly
        want = models.graphed(dtype, B, capture=False).sample(seed=SEED)
        return dict(max_err_vs_eager_body=(out.float() - want.float()).abs().max().item())

    return {
        "ddpm_fast": Provider(ours_step, triton=True, check=unet_vs_diffusers, fused=True),
        "ddpm_fast + CUDA graph": Provider(
            graphed, triton=True, steps=GRAPH_STEPS, check=graph_vs_eager, setup_op="graph_capture", fused=True
        ),
        "diffusers eager": Provider(
            lambda v: lambda: v.sched.step(v.ref(v.x, v.t).sample, 500, v.x).prev_sample, frozenset({DIFFUSERS})
        ),
    }


def _sampler_case(models, dtype, B, iters) -> Case:
    """One sampler step (U-Net forward + reverse step) per provider, in ms per step.

    The CUDA-graph row times a call that replays GRAPH_STEPS steps and divides by that: ddpm_fast's
    GraphedSampler (U-Net and fused step captured once, tables on the device).
    """
    fields = dict(op="sampler_step", batch=B, dtype=str(dtype))
    providers = _sampler_providers(models, dtype, B)
    section = f"sampler {str(dtype).removeprefix('torch.')}"
    return Case(section, "sampler", fields, _sampler_inputs(models, dtype, B), providers, _images_per_s(B), iters, 40)


def _compile_case(models, dtype, B, iters) -> Case:
    """diffusers' U-Net under torch.compile (and, at batch 1, mode="reduce-overhead": inductor's CUDA graphs)
    followed by its scheduler step, beside ddpm_fast's graphed step and diffusers eager in the same rounds."""
    needs = frozenset({DIFFUSERS, COMPILE})

    def compiled(mode):
        def make(v):
            fn = models.compiled(dtype, B, mode)
            with torch.inference_mode():
                for _ in range(3):  # reduce-overhead records its graph on the third call
                    fn(v.x, v.t)
            return lambda: v.sched.step(fn(v.x, v.t).sample, 500, v.x).prev_sample

        return make

    base = _sampler_providers(models, dtype, B)
    # the baselines of the same rounds; the graph was captured (and checked) by the sampler case before
    providers = {
        "ddpm_fast + CUDA graph": base["ddpm_fast + CUDA graph"]._replace(check=None, setup_op=None),
        "diffusers eager": base["diffusers eager"],
    }
    providers["diffusers torch.compile"] = Provider(compiled(None), needs, setup_op="torch.compile")
    if B == 1:
        providers["diffusers torch.compile reduce-overhead"] = Provider(
            compiled("reduce-overhead"), needs | {CUDA}, setup_op="torch.compile reduce-overhead"
        )
    fields = dict(op="sampler_step", batch=B, dtype=str(dtype))
    section = f"torch.compile {str(dtype).removeprefix('torch.')}"
    cost = 90 * (1 + (B == 1))
    setup = _sampler_inputs(models, dtype, B)
    return Case(section, "sampler", fields, setup, providers, _images_per_s(B), iters, cost, frozenset({COMPILE}))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------------------ timing
def _ms(fn, iters: int, device) -> float:
    """ms per call of fn() (already warm): CUDA events on a GPU, the wall clock elsewhere."""
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def _output(o):
    return o[0] if isinstance(o, tuple) else o


def time_case(case: Case, rounds: int, unavailable: dict[str, str], log) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): each provider warmed up (its setup and outputs checked), then timed in interleaved
    rounds; a provider that raises gets its error in its row and leaves the rounds."""
    rows, skipped, fns, errors, extra, served = [], [], {}, {}, {}, {}
    dev = case.inputs().device
    with case.grad_mode():
        outputs = {}
        for name, p in case.providers.items():
            missing = sorted(n for n in p.needs if n in unavailable)
            if missing:
                skipped.append(dict(case=case.label, provider=name, reason="; ".join(unavailable[n] for n in missing)))
                continue
            try:
                with df.ops.trace() as calls:  # the setup too: a CUDA-graph row's ops run at its capture
                    fn = case.fn(name)
                    out = _output(fn())
                synchronize(dev)
                if p.fused:  # a fused row the reference served fails (its error in its row), not the run
                    served[name] = calls.summary()
                    backend = p.fused if isinstance(p.fused, str) else None
                    calls.require_fused(f"{case.label} {name}", backend=backend)
                fns[name], extra[name] = fn, {}
                if p.setup_op is not None:
                    rows.append(dict(op=p.setup_op, **_fields_but_op(case), seconds=case.setup_s[name]))
                ref = outputs.get(p.ref) if p.ref else None
                if ref is not None and isinstance(out, torch.Tensor):
                    extra[name]["max_err"] = (out.float() - ref.float()).abs().max().item()
                if p.check is not None:
                    try:
                        extra[name].update(p.check(case.inputs(), out))
                    except Exception as e:  # the check's own failure, beside the row's figures
                        extra[name]["check_error"] = _error(e)
                        log(f"  {name}: check failed: {_error(e)}")
                if isinstance(out, torch.Tensor) and any(q.ref == name for q in case.providers.values()):
                    outputs[name] = out.detach().clone()  # before another provider overwrites a shared out=
            except Exception as e:
                errors[name] = _error(e)
                log(f"  {name}: {errors[name]}\n{traceback.format_exc(limit=-4)}")
        samples = {name: [] for name in fns}
        for _ in range(rounds):
            for name in list(fns):
                try:
                    samples[name].append(_ms(fns[name], case.iters, dev))
                except Exception as e:
                    errors[name] = _error(e)
                    del fns[name]
                    log(f"  {name}: {errors[name]}")
    res = {name: statistics.median(v) / case.providers[name].steps for name, v in samples.items() if name in fns}
    for name in case.providers:
        if name in res:
            row = dict(**case.fields, provider=name, ms=res[name], **case.report(name, res[name], res), **extra[name])
        elif name in errors:
            row = dict(**case.fields, provider=name, error=errors[name])
        else:
            continue
        if name in served:
            row["served"] = served[name]
        rows.append(row)
    return rows, skipped


def _fields_but_op(case: Case) -> dict:
    return {k: v for k, v in case.fields.items() if k != "op"}


def unavailable_needs(device, no_compile: bool) -> dict[str, str]:
    """Each need this run lacks and why."""
    out = {}
    if torch.device(device).type != "cuda":
        out[CUDA] = "not a CUDA device"
        out[COMPILE] = "torch.compile rows run on a CUDA device only"
    elif no_compile:
        out[COMPILE] = "--no-compile"
    cuda = df.backends()["cuda"]
    if cuda != "available":
        out[CUDA_EXT] = f"cuda backend: {cuda}"
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        out[DIFFUSERS] = f"diffusers: {e}"
    return out


def run(args, record: dict, save, log) -> None:
    device = "cpu" if args.smoke else "cuda"
    rounds = 1 if args.smoke else 3 if args.quick else 5
    unavailable = unavailable_needs(device, args.no_compile)
    record["unavailable"] = unavailable
    start = time.monotonic()
    try:
        plan = cases(args.quick, device, smoke=args.smoke)
    except Exception as e:
        record["errors"].append(dict(section="plan", error=_error(e), traceback=traceback.format_exc(limit=-6)))
        log(f"gpu_check: building the plan failed: {_error(e)}")
        return
    section = None
    for case in plan:
        if case.section != section:
            section = case.section
            record["sections"].append(dict(name=section, start_s=round(time.monotonic() - start, 1)))
            save()
            log(f"== {section} ({time.monotonic() - start:.0f} s)")
        left = None if args.budget is None else args.budget - (time.monotonic() - start)
        missing = sorted(n for n in case.needs if n in unavailable)
        if missing:
            why = "; ".join(unavailable[n] for n in missing)
            record["skipped"].append(dict(section=section, case=case.label, reason=why))
            log(f"  skipped {case.label}: {why}")
            continue
        if left is not None and left < case.cost_s:
            why = f"budget: {left:.0f} s left, the case may take {case.cost_s} s"
            record["skipped"].append(dict(section=section, case=case.label, reason=why))
            log(f"  skipped {case.label}: {why}")
            continue
        t0 = time.monotonic()
        try:
            rows, skipped = time_case(case, rounds, unavailable, log)
        except Exception as e:  # the case's inputs or models could not be built
            rows, skipped = [], []
            record["errors"].append(
                dict(section=section, case=case.label, error=_error(e), traceback=traceback.format_exc(limit=-6))
            )
            log(f"  {case.label}: {_error(e)}\n{traceback.format_exc(limit=-6)}")
        finally:
            case.release()
        record[case.kind] += rows
        record["skipped"] += [dict(section=section, **s) for s in skipped]
        record["sections"][-1]["seconds"] = round(time.monotonic() - start - record["sections"][-1]["start_s"], 1)
        for row in rows:
            log(f"  {row}")
        log(f"  ({case.label}: {time.monotonic() - t0:.1f} s)")
        save()


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_json = os.path.join(os.environ.get("OUT") or os.path.join("out", "gpu_check"), "gpu_check.json")
    p.add_argument("--json", default=default_json, help=f"where the record goes (default: {default_json})")
    p.add_argument("--quick", action="store_true", help="fewer shapes and rounds (about 3 minutes on a GPU)")
    p.add_argument("--budget", type=float, help="seconds: skip the cases that would start too late to finish")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--smoke", action="store_true", help="CPU tensors through TRITON_INTERPRET=1, toy sizes (CI)")
    p.add_argument("--list", action="store_true", help="print the rows and what each needs, run nothing")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    if args.budget is not None and args.budget <= 0:
        sys.exit(f"gpu_check: --budget: expected a positive number of seconds, got {args.budget:g}")
    if args.list:
        for launch in launch_plan(args.quick, "meta", smoke=args.smoke):
            needs = ", ".join(sorted(launch.needs)) or "-"
            print(f"{launch.name}  [needs: {needs}]{'  [triton]' if launch.triton else ''}")
        return
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("gpu_check --smoke: run with TRITON_INTERPRET=1 (CPU tensors through the Triton interpreter)")
        args.no_compile = True
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False); --smoke runs it on the CPU")
    record = {
        "device": torch.cuda.get_device_name() if not args.smoke else "CPU (smoke run through the Triton interpreter)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "cuda": torch.version.cuda,
        "backends": df.backends(),
        "env": {k: os.environ[k] for k in ("DDPM_FAST_TRITON_AUTOTUNE", "TRITON_INTERPRET") if k in os.environ},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "sections": [],
        "ops": [],
        "sampler": [],
        "skipped": [],
        "errors": [],
        "complete": False,
    }

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(args.json + ".tmp", args.json)

    def log(msg):
        print(msg, flush=True)

    log(f"gpu_check on {record['device']}: torch {record['torch']}, backends {record['backends']}")
    save()
    run(args, record, save, log)
    record["complete"] = True
    save()
    n_err = len(record["errors"]) + sum("error" in r for r in record["ops"] + record["sampler"])
    log(
        f"wrote {args.json}: {len(record['ops'])} op rows, {len(record['sampler'])} sampler rows, "
        f"{len(record['skipped'])} skipped, {n_err} errors"
    )


def _version(name):
    try:
        return __import__(name).__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
