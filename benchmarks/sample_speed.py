"""The main job: DDPM sampling speed, ddpm_fast's fused backends against its PyTorch reference sampler.

    python benchmarks/sample_speed.py                       # CPU default, about a minute
    python benchmarks/sample_speed.py --model cifar10 --batch 8 --steps 1000 --json out.json

Every provider samples the same U-Net (random weights, fixed seed) with the same keyed noise, interleaved in
rounds; the table reports the median images/s, the speedup over the reference and the max error against the
reference's images. Installs and builds what it needs first (pip install --no-build-isolation -e .).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_installed() -> None:
    """Install the requirements and build the extension when they are missing (a fresh machine)."""
    try:
        import torch  # noqa: F401
        import tqdm  # noqa: F401

        import ddpm_fast  # noqa: F401

        if ddpm_fast.backends()["cpu"].startswith("available"):
            return
    except ImportError:
        pass
    print("# installing requirements and building ddpm_fast (one time)...", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-r", os.path.join(ROOT, "requirements.txt")])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", ROOT])
    os.execv(sys.executable, [sys.executable, *sys.argv])  # restart so the fresh build is imported


MODELS = {
    # a small DDPM U-Net so the CPU default finishes in about a minute
    "small": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), num_groups=8, sample_size=32),
    # the paper's 35.7M-parameter CIFAR-10 model
    "cifar10": dict(),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=100, help="T: number of diffusion steps (linear schedule)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default="auto", help="comma list of fused backends to time (auto: all available)")
    p.add_argument("--repeats", type=int, default=5, help="rounds; each provider samples once a round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write a JSON record here")
    args = p.parse_args()
    ensure_installed()

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine, write_json

    import ddpm_fast as df

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = df.UNet.ddpm_cifar10(**MODELS[args.model]).to(args.device, dtype).eval()
    schedule = df.NoiseSchedule.linear(args.steps, 1e-4, 0.02 * 1000 / args.steps)
    report = df.backends()
    if args.backends == "auto":
        fused = [b for b in ("cpu", "triton", "cuda") if report[b].startswith("available")]
        fused = [b for b in fused if (b == "cpu") == (args.device == "cpu")]
    else:
        fused = [b for b in args.backends.split(",") if b]
    providers = ["reference", *fused]

    def run(provider: str) -> torch.Tensor:
        backend = "torch" if provider == "reference" else provider
        model.set_backend(None if provider != "reference" else "torch")
        d = df.GaussianDiffusion(model, schedule, backend=backend)
        return d.sample(args.batch, seed=1234, device=args.device, progress=False)

    info = machine()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {info['device']} | torch {info['torch']}, {torch.get_num_threads()} threads | backends: {report}")
    print(
        f"# model {args.model} ({n_params / 1e6:.1f}M params), batch {args.batch}, T={args.steps} steps, {args.dtype}"
    )
    times = {p: [] for p in providers}
    images = {}
    for r in range(args.repeats):
        for prov in providers:
            t0 = time.perf_counter()
            images[prov] = run(prov)
            times[prov].append(time.perf_counter() - t0)
        print(
            f"# round {r + 1}/{args.repeats}: " + ", ".join(f"{p} {times[p][-1]:.1f}s" for p in providers), flush=True
        )

    ref_time = sorted(times["reference"])[len(times["reference"]) // 2]
    ref_img = images["reference"].float()
    rows = []
    print(f"\n{'backend':12} {'images/s':>9} {'s/batch':>8} {'speedup':>8} {'max err vs ref':>15}")
    for prov in providers:
        med = sorted(times[prov])[len(times[prov]) // 2]
        err = (images[prov].float() - ref_img).abs().max().item()
        row = dict(
            backend=prov,
            images_per_s=args.batch / med,
            median_s=med,
            speedup_vs_reference=ref_time / med,
            max_err_vs_reference=err,
            times_s=times[prov],
        )
        rows.append(row)
        print(f"{prov:12} {row['images_per_s']:9.3f} {med:8.2f} {row['speedup_vs_reference']:7.2f}x {err:15.2e}")
    if args.json:
        write_json(
            args.json, {"machine": info, "args": vars(args), "rows": rows, "command": "python " + " ".join(sys.argv)}
        )


if __name__ == "__main__":
    main()
