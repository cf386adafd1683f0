"""The DDPM CIFAR-10 U-Net forward on the CPU: ddpm_fast vs diffusers' UNet2DModel with the same weights, eager
and under torch.compile (steady state, and the time to the first output including compilation).

    python benchmarks/bench_unet.py [--batch 8] [--rounds 7] [--no-compile] [--json PATH]

Targets (CPU U-Net issue): ddpm_fast >= 1.3x diffusers eager at batch 8 fp32, and faster than torch.compile of the
diffusers model in steady state, with no compile warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fused_row, interleaved_medians, machine, served, write_json  # noqa: E402

import ddpm_fast as df  # noqa: E402
from ddpm_fast.models.loading import DIFFUSERS_CIFAR10_CONFIG  # noqa: E402

CIFAR10 = DIFFUSERS_CIFAR10_CONFIG
UNET_OPS = ["conv2d", "linear", "group_norm_silu", "attention"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes minutes on 2 cores)")
    p.add_argument("--json")
    args = p.parse_args()
    from diffusers import UNet2DModel

    info = machine()
    torch.manual_seed(0)
    ref = UNet2DModel(**CIFAR10).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    t = torch.full((args.batch,), 500)
    providers, first, provenance = {}, {}, {}

    with torch.inference_mode():
        expected = ref(x, t).sample
        providers["diffusers eager"] = lambda: ref(x, t).sample

        t0 = time.perf_counter()
        ours = df.UNet.from_diffusers(ref).eval()
        out = ours(x, t)
        first["ddpm_fast cpu"] = time.perf_counter() - t0
        err = (out - expected).abs().max().item()
        providers["ddpm_fast cpu"] = lambda: ours(x, t)
        provenance["ddpm_fast cpu"] = fused_row("ddpm_fast cpu", providers["ddpm_fast cpu"], "cpu", UNET_OPS)

        ours_ref = df.UNet.from_diffusers(ref).eval().set_backend("torch")
        providers["ddpm_fast reference"] = lambda: ours_ref(x, t)
        provenance["ddpm_fast reference"] = served(providers["ddpm_fast reference"])

    if not args.no_compile:
        twin = UNet2DModel(**CIFAR10).eval()
        twin.load_state_dict(ref.state_dict())
        compiled = torch.compile(twin)
        with torch.inference_mode():
            t0 = time.perf_counter()
            compiled(x, t)
            first["diffusers torch.compile"] = time.perf_counter() - t0
            providers["diffusers torch.compile"] = lambda: compiled(x, t).sample

    print(f"# {info['device']}, {info['cpu_threads']} threads, {df.backends()['cpu']}; batch {args.batch}, fp32")
    print(f"# ddpm_fast cpu vs diffusers eager, same weights: max abs err {err:.2e}")
    with torch.inference_mode():
        res = interleaved_medians(providers, args.rounds, min_time=0.5)
    base = res["diffusers eager"]["median_s"]
    print(f"\n{'provider':26} {'ms (median)':>12} {'q1-q3 ms':>16} {'vs diffusers eager':>19} {'first output s':>15}")
    rows = []
    for name, r in res.items():
        speed = base / r["median_s"]
        f = first.get(name)
        print(
            f"{name:26} {r['median_s'] * 1e3:12.1f} {r['q1_s'] * 1e3:7.1f}-{r['q3_s'] * 1e3:<8.1f} {speed:18.2f}x "
            f"{'' if f is None else f'{f:14.1f}'}"
        )
        rows.append(
            dict(provider=name, speedup_vs_diffusers_eager=speed, first_output_s=f, served=provenance.get(name), **r)
        )
    if args.json:
        write_json(
            args.json,
            {
                "machine": info,
                "batch": args.batch,
                "max_err_vs_diffusers": err,
                "rows": rows,
                "command": "python " + " ".join(sys.argv),
            },
        )


if __name__ == "__main__":
    main()
