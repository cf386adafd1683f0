"""GPU check: every fused op against torch eager, and the DDPM CIFAR-10 U-Net sampler step against diffusers
(eager, torch.compile, and CUDA graphs on both sides), on one CUDA device; writes one JSON record with the
device name.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu_<device>.json [--quick]

Run by benchmarks/gpu_check.sh after the install and the GPU tests. Memory-bound ops report GB/s next to the
device's copy bandwidth measured in the same rounds; attention reports GFLOP/s. Uses CUDA events, medians of
interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddpm_fast as df  # noqa: E402
from ddpm_fast.models.loading import DIFFUSERS_CIFAR10_CONFIG, config_from_diffusers  # noqa: E402

# --smoke: the whole script on CPU tensors through the Triton interpreter at toy sizes (no timings worth
# reading): what CI runs so that the GPU run does not die of a Python error.
DEV = "cuda"
SMOKE = False


def cuda_ms(fn, iters: int) -> float:
    fn()
    if DEV != "cuda":
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


def medians(providers: dict, rounds: int, iters: int) -> dict[str, float]:
    iters = 1 if SMOKE else iters
    samples = {k: [] for k in providers}
    for _ in range(rounds):
        for k, fn in providers.items():
            samples[k].append(cuda_ms(fn, iters))
    return {k: statistics.median(v) for k, v in samples.items()}


def bandwidth_row(op, shape, provider, ms, moved_bytes, copy_gbs, **extra) -> dict:
    """A memory-bound op's row: GB/s from the bytes it moves, and that as a share of the copy's GB/s."""
    gbs = moved_bytes / ms / 1e6
    return dict(op=op, shape=shape, **extra, provider=provider, ms=ms, gbs=gbs, pct_copy=100 * gbs / copy_gbs)


def op_rows(rounds: int) -> list[dict]:
    rows = []
    cuda = df.backends()["cuda"] == "available"  # the CUDA kernels' rows, next to Triton's
    s = df.NoiseSchedule.linear()
    dev = DEV
    for shape in [(2, 3, 4, 4)] if SMOKE else [(256, 3, 32, 32), (64, 4, 256, 256)]:
        x, m, z = (torch.randn(shape, device=dev) for _ in range(3))
        out, dst = torch.empty_like(x), torch.empty_like(x)
        t = torch.full((shape[0],), 500, device=dev)
        abar = s.alphas_cumprod.to(dev).float()

        def torch_step():
            a = abar[t].view(-1, 1, 1, 1)
            ap = abar[t - 1].view(-1, 1, 1, 1)
            x0 = ((x - (1 - a).sqrt() * m) / a.sqrt()).clamp(-1, 1)
            beta = 1 - a / ap
            mean = ap.sqrt() * beta / (1 - a) * x0 + (a / ap).sqrt() * (1 - ap) / (1 - a) * x
            return mean + ((1 - ap) / (1 - a) * beta).sqrt() * z

        res = medians(
            {
                "copy": lambda: dst.copy_(x),
                "torch eager": torch_step,
                "triton": lambda: df.ops.ddpm_step(x, m, 500, s, z, clip_sample=True, backend="triton", out=out),
                "triton keyed": lambda: df.ops.ddpm_step(
                    x, m, 500, s, seed=1, clip_sample=True, backend="triton", out=out
                ),
                **(
                    {
                        "cuda": lambda: df.ops.ddpm_step(x, m, 500, s, z, clip_sample=True, backend="cuda", out=out),
                        "cuda keyed": lambda: df.ops.ddpm_step(
                            x, m, 500, s, seed=1, clip_sample=True, backend="cuda", out=out
                        ),
                    }
                    if cuda
                    else {}
                ),
            },
            rounds,
            20,
        )
        nbytes = x.numel() * 4
        copy_gbs = 2 * nbytes / res["copy"] / 1e6
        for k, ms in res.items():
            moved = {"copy": 2, "triton keyed": 3, "cuda keyed": 3}.get(k, 4) * nbytes
            rows.append(bandwidth_row("ddpm_step", shape, k, ms, moved, copy_gbs))
        sa = s.sqrt_alphas_cumprod.to(dev).float()[t].view(-1, 1, 1, 1)
        sb = s.sqrt_one_minus_alphas_cumprod.to(dev).float()[t].view(-1, 1, 1, 1)
        res = medians(
            {
                "copy": lambda: dst.copy_(x),
                "torch eager": lambda: sa * x + sb * z,
                "triton": lambda: df.ops.q_sample(x, t, z, s, backend="triton", out=out),
                "triton keyed": lambda: df.ops.q_sample(x, t, None, s, seed=1, backend="triton"),
                **({"cuda": lambda: df.ops.q_sample(x, t, z, s, backend="cuda", out=out)} if cuda else {}),
            },
            rounds,
            20,
        )
        for k, ms in res.items():
            moved = {"copy": 2}.get(k, 3) * nbytes  # keyed: x0 read, x_t and eps written
            rows.append(bandwidth_row("q_sample", shape, k, ms, moved, copy_gbs))
    gn_shapes = [((8, 128, 32, 32), False), ((8, 128, 32, 32), True), ((64, 256, 32, 32), True)]
    for shape, cl in [((2, 64, 4, 4), False), ((2, 64, 4, 4), True)] if SMOKE else gn_shapes:
        x = torch.randn(shape, device=dev)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
        dst = torch.empty_like(x)
        res = medians(
            {
                "copy": lambda: dst.copy_(x),
                "torch eager": lambda: F.silu(F.group_norm(x, 32, w, b)),
                "triton": lambda: df.ops.group_norm_silu(x, 32, w, b, backend="triton"),
                **({"cuda": lambda: df.ops.group_norm_silu(x, 32, w, b, backend="cuda")} if cuda else {}),
            },
            rounds,
            20,
        )
        copy_gbs = 2 * x.numel() * 4 / res["copy"] / 1e6
        for k, ms in res.items():
            rows.append(bandwidth_row("group_norm_silu", shape, k, ms, 2 * x.numel() * 4, copy_gbs, channels_last=cl))
    attn = [(8, 1, torch.float32), (256, 1, torch.bfloat16), (256, 4, torch.bfloat16)]
    for B, heads, dtype in [(2, 1, torch.float32), (2, 4, torch.float32)] if SMOKE else attn:
        C, N = (64, 16) if SMOKE else (256, 256)
        qkv = torch.randn(B, N, 3 * C, device=dev, dtype=dtype)
        q, k, v = (qkv[..., i * C : (i + 1) * C].view(B, N, heads, C // heads).transpose(1, 2) for i in range(3))
        res = medians(
            {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                "triton": lambda: df.ops.attention(q, k, v, backend="triton"),
                **(
                    {"cuda": lambda: df.ops.attention(q, k, v, backend="cuda")}
                    if cuda and dtype != torch.float32
                    else {}
                ),
            },
            rounds,
            10,
        )
        flops = 4 * B * N * N * C
        for k2, ms in res.items():
            rows.append(
                dict(
                    op="attention", batch=B, heads=heads, dtype=str(dtype), provider=k2, ms=ms, gflops=flops / ms / 1e6
                )
            )
    return rows


def synchronize() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def sampler_rows(rounds: int, batches, dtypes, with_compile: bool) -> list[dict]:
    """One sampler step (U-Net forward + reverse step) per provider, in ms per step.

    The CUDA-graph rows time a call that replays K steps and divide by K: ddpm_fast's GraphedSampler (U-Net and
    fused step captured once, tables on the device) and, at batch 1, diffusers' U-Net under
    torch.compile(mode="reduce-overhead") (inductor's CUDA graphs) followed by its scheduler step.
    """
    from ddpm_fast.graphs import GraphedSampler

    K = 10
    rows = []
    try:
        import diffusers
    except ImportError:
        diffusers = None
    unet_cfg = dict(DIFFUSERS_CIFAR10_CONFIG)
    if SMOKE:
        unet_cfg.update(sample_size=8, block_out_channels=(32, 32, 32, 32), norm_num_groups=8)
    size = unet_cfg["sample_size"]
    for dtype in dtypes:
        torch.manual_seed(0)
        ours = df.UNet(config_from_diffusers(unet_cfg)).to(DEV, dtype).eval()
        s = df.NoiseSchedule.linear()
        if diffusers is not None:
            ref = diffusers.UNet2DModel(**unet_cfg).to(DEV, dtype).eval()
            ours = df.UNet.from_diffusers(ref).to(DEV, dtype).eval()
            sched = diffusers.DDPMScheduler()
            compiled = torch.compile(ref) if with_compile else None
            graphed = torch.compile(ref, mode="reduce-overhead") if with_compile else None
        d = df.GaussianDiffusion(ours, s, backend="triton")
        for B in batches:
            x = torch.randn(B, 3, size, size, device=DEV, dtype=dtype)
            t = torch.full((B,), 500, device=DEV)
            t0 = time.perf_counter()
            gs = GraphedSampler(d, B, (3, size, size), list(range(999, 999 - 50 * K, -50)), device=DEV, dtype=dtype)
            with torch.inference_mode():
                gs.sample(seed=1)
            synchronize()
            rows.append(dict(op="graph_capture", batch=B, dtype=str(dtype), seconds=time.perf_counter() - t0))
            prov = {
                "ddpm_fast": (
                    lambda: df.ops.ddpm_step(x, ours(x, t), 500, s, seed=1, clip_sample=True, backend="triton"),
                    1,
                ),
                "ddpm_fast + CUDA graph": (lambda: gs.sample(seed=1), K),
            }
            if diffusers is not None:
                prov["diffusers eager"] = (lambda: sched.step(ref(x, t).sample, 500, x).prev_sample, 1)
                for name, fn in (("torch.compile", compiled), ("torch.compile reduce-overhead", graphed)):
                    if fn is None or (name.endswith("overhead") and B != 1):
                        continue
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        for _ in range(3):  # reduce-overhead records its graph on the third call
                            fn(x, t)
                    synchronize()
                    rows.append(dict(op=name, batch=B, dtype=str(dtype), seconds=time.perf_counter() - t0))
                    prov[f"diffusers {name}"] = (lambda fn=fn: sched.step(fn(x, t).sample, 500, x).prev_sample, 1)
            with torch.inference_mode():
                res = medians({k: fn for k, (fn, _) in prov.items()}, rounds, 5)
            for k, ms in res.items():
                ms /= prov[k][1]
                rows.append(
                    dict(op="sampler_step", batch=B, dtype=str(dtype), provider=k, ms=ms, images_per_s=B / ms * 1e3)
                )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU tensors through TRITON_INTERPRET=1, toy sizes (CI)")
    args = p.parse_args()
    global DEV, SMOKE
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("gpu_check --smoke: run with TRITON_INTERPRET=1")
        DEV, SMOKE, args.no_compile = "cpu", True, True
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    rounds = 1 if args.smoke else 3 if args.quick else 5
    batches = [1, 2] if args.smoke else [1, 256]
    dtypes = [torch.float32] if args.smoke else [torch.float32, torch.bfloat16]
    record = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke run through the Triton interpreter)",
        "torch": torch.__version__,
        "backends": df.backends(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "ops": [],
        "sampler": [],
        "complete": False,
    }

    def save():  # after every section: a run cut short by its time limit still leaves what it measured
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(args.json + ".tmp", args.json)

    record["ops"] = op_rows(rounds)
    save()
    for row in record["ops"]:
        print(row, flush=True)
    for dtype in dtypes:
        rows = sampler_rows(rounds, batches, [dtype], not args.no_compile)
        record["sampler"] += rows
        save()
        for row in rows:
            print(row, flush=True)
    record["complete"] = True
    save()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
