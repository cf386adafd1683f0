"""The main job: DDPM sampling speed, ddpm_fast's fused backends against its PyTorch reference sampler and
against diffusers' DDPMPipeline (eager, with torch.compile on its U-Net, and with ddpm_fast.accelerate) and
against the CPU runtimes a user would otherwise deploy the U-Net with (OpenVINO with the f32 hint, and ONNX Runtime:
diffusers' pipeline loop with the U-Net forward served by the runtime; benchmarks/peers.py), with the same U-Net
weights, side by side in one run.

    python benchmarks/sample_speed.py                       # CPU default, about a minute
    python benchmarks/sample_speed.py --model cifar10 --batch 8 --steps 1000 --json out.json --plot out.png
    python benchmarks/sample_speed.py --method dpmpp_2m --steps 20   # or ddim, dpmpp_3m: few-step solvers

--method ddim / dpmpp_2m / dpmpp_3m: the paper's T=1000 schedule sampled in --steps solver steps (the timesteps 0, T/steps, ...
that GaussianDiffusion.sample(steps=...) takes); diffusers' rows are its pipeline with DDIMScheduler (leading spacing,
the same timesteps) or DPMSolverMultistepScheduler (solver_order 2 or 3, set to the same timesteps), and every row draws x_T from the same
generator, so every row's images are compared with diffusers' (the solvers add no noise after x_T). Under the table,
"float32 floor": diffusers' own loop from x_T moved by one ulp against its images, the chain's sensitivity to float32
rounding (large for DDIM with clip_sample, both sides' default, and the random-weight U-Net: a few 1e-3 at 20 steps);
a row's max err of that order is rounding, not a difference in the maths.

Every provider samples the same U-Net (random weights, fixed seed) with the same keyed noise, interleaved in
rounds after one cold round (whose time, "first s", includes torch.compile's compile and ddpm_fast's weight
packing); the table reports median images/s, the speedup over diffusers eager and over the reference, the max
error against the reference's images (diffusers' variants and the peers: against diffusers' images, same
generator), and peak memory. The peers convert the U-Net before the first round (the time is printed and counted in
their "first s"); --no-peers skips them, and a peer that cannot be built is a row saying why. Installs and builds what it needs first (pip install --no-build-isolation -e .).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_installed() -> None:
    """Install the requirements and build the extension when they are missing (a fresh machine), or when the
    ddpm_fast that imports is another checkout's."""
    try:
        import torch  # noqa: F401
        import tqdm  # noqa: F401

        import ddpm_fast  # noqa: F401

        package = os.path.realpath(os.path.dirname(ddpm_fast.__file__))
        here = package == os.path.realpath(os.path.join(ROOT, "ddpm_fast"))
        if here and ddpm_fast.backends()["cpu"].startswith("available"):
            return  # this checkout's ddpm_fast, built (not another checkout's install)
    except ImportError:
        pass
    print("# installing requirements and building ddpm_fast (one time)...", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-r", os.path.join(ROOT, "requirements.txt")])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", ROOT])
    os.execv(sys.executable, [sys.executable, *sys.argv])  # restart so the fresh build is imported


SAMPLER_OPS = ["ddpm_step", "conv2d", "group_norm_silu", "attention"]  # what every fused sampling row must run

# diffusers UNet2DModel configurations; ddpm_fast loads the same weights (UNet.from_diffusers)
MODELS = {
    # a small DDPM U-Net so the CPU default finishes in about a minute
    "small": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    # the paper's 35.7M-parameter CIFAR-10 model (google/ddpm-cifar10-32's configuration)
    "cifar10": dict(),
}


def _to(module, device, dtype):
    """module.to(device[, dtype]): diffusers warns on every dtype cast, even to the dtype it already has."""
    import torch

    module = module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="T: number of diffusion steps (linear schedule)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default="auto", help="comma list of fused backends to time (auto: all available)")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="steady rounds (after one cold round); each provider samples once a round",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="skip the diffusers rows")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the diffusers torch.compile row")
    p.add_argument(
        "--no-peers", dest="peers", action="store_false", help="skip the OpenVINO and ONNX Runtime rows (CPU, fp32)"
    )
    p.add_argument(
        "--method",
        choices=["ddpm", "ddim", "dpmpp_2m", "dpmpp_3m"],
        default="ddpm",
        help="ddpm: T=--steps DDPM steps (the default run); ddim / dpmpp_2m / dpmpp_3m: --steps solver steps of T=1000",
    )
    p.add_argument("--json", help="write a JSON record here")
    p.add_argument("--plot", help="write a PNG bar chart here")
    args = p.parse_args()
    ensure_installed()

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import PeakMemory, check_fused, machine, write_json

    import ddpm_fast as df

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from ddpm_fast.models.loading import DIFFUSERS_CIFAR10_CONFIG

    torch.manual_seed(0)
    solver = args.method != "ddpm"
    T = 1000 if solver else args.steps
    beta_end = 0.02 * 1000 / T  # the paper's schedule stretched to T steps
    schedule = df.NoiseSchedule.linear(T, 1e-4, beta_end)
    solver_ts = [i * (T // args.steps) for i in range(args.steps)][::-1]  # GaussianDiffusion.sample(steps=...)
    try:
        import diffusers
    except ImportError:
        diffusers = None
    if diffusers is not None:
        unet2d = _to(
            diffusers.UNet2DModel(**{**DIFFUSERS_CIFAR10_CONFIG, **MODELS[args.model]}), args.device, dtype
        ).eval()
        model = df.UNet.from_diffusers(unet2d).to(args.device, dtype).eval()
    else:
        from ddpm_fast.models.loading import config_from_diffusers

        model = df.UNet(config_from_diffusers({**DIFFUSERS_CIFAR10_CONFIG, **MODELS[args.model]})).eval()
        model = model.to(args.device, dtype)
    report = df.backends()
    if args.backends == "auto":
        fused = [b for b in ("cpu", "triton", "cuda") if report[b].startswith("available")]
        fused = [b for b in fused if (b == "cpu") == (args.device == "cpu")]
    else:
        fused = [b for b in args.backends.split(",") if b]
    providers = ["reference", *fused]
    pipes = {}
    if diffusers is not None and args.diffusers:
        names = ["diffusers", "diffusers+accelerate"] + (["diffusers+compile"] if args.compile else [])
        for name in names:
            sched = make_scheduler(diffusers, args.method, T, beta_end, solver_ts)
            unet = _to(diffusers.UNet2DModel(**unet2d.config), args.device, dtype).eval()
            unet.load_state_dict(unet2d.state_dict())
            pipes[name] = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
            pipes[name].set_progress_bar_config(disable=True)
        accelerated = str(df.accelerate(pipes["diffusers+accelerate"]))  # strict: an AccelerateError if it cannot
        if args.method in ("dpmpp_2m", "dpmpp_3m"):
            pin_timesteps(pipes["diffusers+accelerate"].scheduler, solver_ts)
        if args.compile:  # compiled lazily: the first round's time includes the compile (time to first image)
            pipes["diffusers+compile"].unet = torch.compile(pipes["diffusers+compile"].unet)
    missing, peer_info = {}, {}
    if args.peers and solver:
        print("# peers skipped: --method runs diffusers' pipeline with a solver; the peers' rows time DDPM")
    elif args.peers:
        if diffusers is None or not args.diffusers:
            print("# peers skipped: they run diffusers' pipeline loop (diffusers missing or --no-diffusers)")
        else:
            missing, peer_info = add_peers(pipes, unet2d, args, dtype, beta_end)
    providers += list(pipes)

    def run(provider: str) -> torch.Tensor:
        if provider in pipes:  # diffusers' own loop (its generator noise), output in [-1, 1] as ddpm_fast's
            g = torch.Generator(args.device).manual_seed(1234)
            with torch.inference_mode():
                out = pipes[provider](
                    batch_size=args.batch, generator=g, num_inference_steps=args.steps, output_type="np"
                ).images
            return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1
        backend = "torch" if provider == "reference" else provider
        model.set_backend(None if provider != "reference" else "torch")
        d = df.GaussianDiffusion(model, schedule, backend=backend)
        if solver:  # x_T from the generator diffusers' pipeline draws it from; no noise after it
            g = torch.Generator(args.device).manual_seed(1234)
            x = d.sample(
                args.batch, generator=g, device=args.device, progress=False, steps=args.steps, method=args.method
            )
            return x.clamp(-1, 1)  # as diffusers' pipeline returns its images
        return d.sample(args.batch, seed=1234, device=args.device, progress=False)

    info = machine()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {info['device']} | torch {info['torch']}, {torch.get_num_threads()} threads | backends: {report}")
    print(
        f"# model {args.model} ({n_params / 1e6:.1f}M params), batch {args.batch}, T={T}, "
        + (f"{args.method} in {args.steps} steps, " if solver else f"{T} DDPM steps, ")
        + args.dtype
    )
    times = {p: [] for p in providers}
    peak = {p: 0.0 for p in providers}
    images, served = {}, {}
    convert_s = {name: info["convert_s"] + info["compile_s"] for name, info in peer_info.items()}
    ours = [*fused, *(p for p in pipes if p == "diffusers+accelerate")]  # rows that must run on fused kernels
    for r in range(args.repeats + 1):  # round 0 is cold: its times are the time to the first images
        for prov in providers:
            # the cold round is traced: what served each provider; a fused row the reference served ends the run
            traced = df.ops.trace() if r == 0 else contextlib.nullcontext()
            with PeakMemory(args.device) as mem, traced as calls:
                t0 = time.perf_counter()
                images[prov] = run(prov)
                times[prov].append(time.perf_counter() - t0)
            if r == 0:
                sampler_ops = [STEP_OP[args.method], *SAMPLER_OPS[1:]]
                served[prov] = check_fused(prov, calls, ops=sampler_ops) if prov in ours else calls.summary()
            if r and mem.peak_mb is not None:  # steady state: warm-up caches and compile workspaces left out
                peak[prov] = max(peak[prov], mem.peak_mb)
        label = "cold round" if r == 0 else f"round {r}/{args.repeats}"
        print(f"# {label}: " + ", ".join(f"{p} {times[p][-1]:.1f}s" for p in providers), flush=True)

    median = statistics.median

    steady = {p: median(times[p][1:]) for p in providers}
    ref_time, dif_time = steady["reference"], steady.get("diffusers")
    rows = []
    # ddpm_fast's samplers are compared with the reference's images (same keyed noise); diffusers' variants with
    # diffusers' own images (same generator). diffusers' pipeline clamps its output to [-1, 1].
    oracle = {p: "reference" for p in providers} | {p: "diffusers" for p in pipes} | {"diffusers": None}
    if solver and "diffusers" in pipes:  # the same x_T and no later noise: every row against diffusers' images
        oracle = {p: "diffusers" for p in providers} | {"diffusers": None}
    header = (
        f"{'backend':22} {'images/s':>9} {'s/batch':>8} {'first s':>8} {'vs diffusers':>12} {'vs ref':>7} "
        f"{'max err':>9} {'against':>10} {'peak MB':>8}"
    )
    print("\n" + header)
    for prov in providers:
        med, against = steady[prov], oracle[prov]
        err = None if against is None else (images[prov].float() - images[against].float()).abs().max().item()
        row = dict(
            backend=prov,
            images_per_s=args.batch / med,
            median_s=med,
            first_s=times[prov][0] + convert_s.get(prov, 0.0),
            speedup_vs_diffusers=None if dif_time is None else dif_time / med,
            speedup_vs_reference=ref_time / med,
            max_err=err,
            error_against=against,
            peak_mb=peak[prov],
            times_s=times[prov],
            served=served[prov],
            peer=peer_info.get(prov),
        )
        rows.append(row)
        err_txt = "" if err is None else f"{err:.1e}"
        vs_dif = "" if dif_time is None else f"{dif_time / med:.2f}x"
        print(
            f"{prov:22} {row['images_per_s']:9.3f} {med:8.2f} {row['first_s']:8.1f} {vs_dif:>12} "
            f"{ref_time / med:6.2f}x {err_txt:>9} {against or '':>10} {peak[prov]:8.0f}"
        )
    for prov, why in missing.items():
        print(f"{prov:22} unavailable: {why}")
        rows.append(dict(backend=prov, why=why))
    floor = None
    if solver and "diffusers" in pipes:
        floor = float32_floor(pipes["diffusers"], images["diffusers"], args.batch, args.steps, args.device)
        print(
            f"# float32 floor: diffusers' loop from x_T moved by one ulp vs its images: max err {floor:.1e} (the "
            "chain's own sensitivity to float32 rounding; rows' errors of that order are rounding, not different maths)"
        )
    print(
        f"# s/batch and images/s: medians of {args.repeats} steady rounds; first s: the cold round (compile, weight "
        "packing, allocator warm-up; the peers: plus their conversion and compilation); peak MB: "
        + (
            "max_memory_allocated"
            if args.device.startswith("cuda")
            else "resident memory above its level before the call, sampled every 2 ms"
        )
    )
    record = {"machine": info, "args": vars(args), "rows": rows, "command": "python " + " ".join(sys.argv)}
    if floor is not None:
        record["float32_floor_max_err"] = floor
    if "diffusers+accelerate" in pipes:
        record["accelerate"] = accelerated
    if args.json:
        write_json(args.json, record)
    if args.plot:
        plot(record, args.plot)


STEP_OP = {
    "ddpm": "ddpm_step",
    "ddim": "ddpm_step",
    "dpmpp_2m": "dpmpp_step",
    "dpmpp_3m": "dpmpp_step",
}  # the fused op each method runs (DDIM: the reverse-step kernel with its table)


def make_scheduler(diffusers, method: str, T: int, beta_end: float, timesteps: list[int]):
    """diffusers' scheduler for ``method`` on the linear schedule, at the timesteps ddpm_fast's sampler takes."""
    common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=beta_end)
    if method == "ddpm":
        return diffusers.DDPMScheduler(**common)
    if method == "ddim":  # leading spacing, no offset: T/steps * i, the last step to abar = 1 (set_alpha_to_one)
        return diffusers.DDIMScheduler(**common, timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True)
    order = 3 if method == "dpmpp_3m" else 2
    return pin_timesteps(diffusers.DPMSolverMultistepScheduler(**common, solver_order=order), timesteps)


def float32_floor(pipe, images, batch: int, steps: int, device: str) -> float:
    """Max |image - images| for diffusers' pipeline loop run again from the same x_T moved up by one ulp (its own
    scheduler and U-Net, the pipeline's steps): how far float32 rounding alone moves this chain's images."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    unet, scheduler = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    g = torch.Generator(device).manual_seed(1234)  # as run() seeds the pipeline's generator
    shape = (batch, unet.config.in_channels, size, size)
    x = randn_tensor(shape, generator=g, device=torch.device(device), dtype=unet.dtype)
    x = torch.nextafter(x, torch.full_like(x, float("inf")))
    scheduler.set_timesteps(steps)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=g).prev_sample
    moved = (x / 2 + 0.5).clamp(0, 1).float().cpu() * 2 - 1  # as run() takes the pipeline's images
    return (moved - images.float()).abs().max().item()


def pin_timesteps(scheduler, timesteps: list[int]):
    """No spacing of DPMSolverMultistepScheduler's gives 0, T/steps, ...: its set_timesteps is given them as custom
    timesteps (the pipeline calls set_timesteps(num_inference_steps); diffusers' own code computes the sigmas)."""
    set_timesteps = type(scheduler).set_timesteps

    def pinned(num_inference_steps=None, device=None, **kwargs):
        return set_timesteps(scheduler, device=device, timesteps=list(timesteps))

    scheduler.set_timesteps = pinned
    return scheduler


def add_peers(pipes: dict, unet2d, args, dtype, beta_end: float) -> tuple[dict, dict]:
    """Add a diffusers pipeline per peer runtime to ``pipes`` (same scheduler, same generator noise as the diffusers
    rows) whose U-Net forward the runtime serves; return the peers that could not be built ({name: why}) and the
    built ones' facts ({name: info}: threads, precision, conversion time)."""
    import diffusers
    import torch
    from peers import build_peers, openvino_default_precision

    names = ["openvino f32", "onnxruntime"]
    default = openvino_default_precision()
    if default not in (None, "f32"):  # the device's default is a lower precision (bf16 on AMX CPUs): a row of its own
        names.insert(1, "openvino default")
    if args.device != "cpu" or dtype != torch.float32:
        why = f"CPU fp32 runtimes; this run is --device {args.device} --dtype {args.dtype}"
        return {n: why for n in names}, {}
    size = unet2d.config.sample_size
    x = torch.randn(args.batch, unet2d.config.in_channels, size, size)
    t = torch.full((args.batch,), args.steps - 1)
    t0 = time.perf_counter()
    built = build_peers(unet2d, x, t, names=names)
    print(f"# peers built in {time.perf_counter() - t0:.1f}s (conversion of the U-Net, compilation):", flush=True)
    missing, info = {}, {}
    for name, peer in built.items():
        if not peer.ok:
            print(f"#   {name}: {peer.label()}")
            missing[name] = peer.why
            continue
        info[name] = peer.info
        print(
            f"#   {name} ({peer.label()}): converted in {peer.info['convert_s']:.1f}s, compiled/loaded in "
            f"{peer.info['compile_s']:.1f}s",
            flush=True,
        )
        sched = diffusers.DDPMScheduler(num_train_timesteps=args.steps, beta_start=1e-4, beta_end=beta_end)
        pipes[name] = peer_pipeline(peer, unet2d, sched)
    return missing, info


def peer_pipeline(peer, unet2d, scheduler):
    """diffusers' DDPMPipeline around a U-Net whose forward ``peer`` serves (a copy of ``unet2d`` gives the pipeline
    its config, dtype and device; its own weights are not used)."""
    import diffusers
    from diffusers.models.unets.unet_2d import UNet2DOutput

    unet = diffusers.UNet2DModel(**unet2d.config).eval()

    def forward(sample, timestep, *rest, return_dict=True, **kwargs):
        out = peer(sample, timestep)
        return UNet2DOutput(sample=out) if return_dict else (out,)

    unet.forward = forward
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plot(record: dict, path: str) -> None:
    """Bar chart of images/s per backend, labelled with the speedup over diffusers eager."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, a = [r for r in record["rows"] if "images_per_s" in r], record["args"]
    fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(rows)))
    names = [r["backend"] for r in rows][::-1]
    vals = [r["images_per_s"] for r in rows][::-1]
    ours = ("cpu", "triton", "cuda", "diffusers+accelerate")
    colors = ["tab:blue" if n in ours else "tab:gray" for n in names]
    ax.barh(names, vals, color=colors)
    for i, r in enumerate(rows[::-1]):
        if r["speedup_vs_diffusers"] is not None:
            ax.text(vals[i], i, f" {r['speedup_vs_diffusers']:.2f}x", va="center")
    ax.set_xlabel("images/s (higher is better); label: speedup over diffusers eager")
    ax.set_title(
        f"DDPM sampling, {a['model']} U-Net, batch {a['batch']}, T={a['steps']}, {a['dtype']}\n"
        f"{record['machine']['device']}, {record['machine']['cpu_threads']} threads",
        fontsize=9,
    )
    ax.set_xlim(0, max(vals) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
