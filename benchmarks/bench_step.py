"""Fused ddpm_step and q_sample vs the PyTorch reference (and diffusers' DDPMScheduler.step), with GB/s next to
the machine's copy bandwidth measured in the same run.

    python benchmarks/bench_step.py [--quick] [--json benchmarks/results/step_cpu.json]

Targets (issue: foundation): fused ddpm_step >= 4x the reference at 64x3x32x32 fp32, and >= 80% of copy
bandwidth at 64 MB per tensor and more, with out=.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fused_row, interleaved_medians, machine, served, write_json  # noqa: E402

import ddpm_fast as df  # noqa: E402


def bench_case(shape, dtype, keyed: bool, repeats: int, with_diffusers: bool):
    s = df.NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    out = torch.empty_like(x)
    t = 500
    noise = None if keyed else z
    kw = dict(seed=1, clip_sample=True)
    copy_dst = torch.empty_like(x)
    providers = {
        "copy": lambda: copy_dst.copy_(x),  # the physical limit, timed in the same rounds
        "reference": lambda: df.ops.ddpm_step(x, m, t, s, noise, backend="torch", out=out, **kw),
        "fused": lambda: df.ops.ddpm_step(x, m, t, s, noise, backend="cpu", out=out, **kw),
    }
    if with_diffusers and not keyed and dtype == torch.float32:
        from diffusers import DDPMScheduler
        from diffusers.schedulers import scheduling_ddpm

        sched = DDPMScheduler()
        scheduling_ddpm.randn_tensor = lambda *a, **k: z  # same given noise, no RNG cost in the comparison
        providers["diffusers"] = lambda: sched.step(m, t, x).prev_sample
    label = f"ddpm_step {'x'.join(map(str, shape))} {dtype} {'keyed' if keyed else 'given'} noise, fused"
    provenance = {
        "fused": fused_row(label, providers["fused"], backend="cpu", ops=["ddpm_step"]),
        "reference": served(providers["reference"]),
    }
    res = interleaved_medians(providers, repeats)
    for name, what in provenance.items():
        res[name]["served"] = what
    tensors = 3 if keyed else 4  # x, m, (z), out
    nbytes = tensors * x.numel() * x.element_size()
    for name, r in res.items():
        r["gbs"] = (2 * x.numel() * x.element_size() if name == "copy" else nbytes) / r["median_s"] / 1e9
    err = (
        (
            df.ops.ddpm_step(x, m, t, s, noise, backend="cpu", **kw).float()
            - df.ops.ddpm_step(x, m, t, s, noise, backend="torch", **kw).float()
        )
        .abs()
        .max()
        .item()
    )
    return res, err


def bench_q_sample(shape, repeats):
    s = df.NoiseSchedule.linear()
    x0, eps = torch.randn(shape), torch.randn(shape)
    t = torch.randint(0, 1000, (shape[0],))
    out, copy_dst = torch.empty_like(x0), torch.empty_like(x0)
    providers = {
        "copy": lambda: copy_dst.copy_(x0),
        "reference": lambda: df.ops.q_sample(x0, t, eps, s, backend="torch", out=out),
        "fused": lambda: df.ops.q_sample(x0, t, eps, s, backend="cpu", out=out),
    }
    label = f"q_sample {'x'.join(map(str, shape))} fused"
    provenance = {
        "fused": fused_row(label, providers["fused"], backend="cpu", ops=["q_sample"]),
        "reference": served(providers["reference"]),
    }
    res = interleaved_medians(providers, repeats)
    for name, what in provenance.items():
        res[name]["served"] = what
    for name, r in res.items():
        r["gbs"] = (2 if name == "copy" else 3) * x0.numel() * 4 / r["median_s"] / 1e9
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, no 256 MB case")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if not df.backends()["cpu"].startswith("available"):
        sys.exit(f"cpu backend unavailable: {df.backends()['cpu']}")
    repeats = 3 if args.quick else 7
    info = machine()
    print(f"# {info['device']}, {info['cpu_threads']} threads, {df.backends()['cpu']}")
    print("# GB/s counts the bytes each op must move (ddpm_step: x, model_output, z if given, out; q_sample: x0, eps,")
    print(
        "# out; copy: read + write); '% copy' is against torch's copy_ of the same tensor, timed in the same rounds.\n"
    )
    cases = [
        ((64, 3, 32, 32), torch.float32, False),
        ((64, 3, 32, 32), torch.float32, True),
        ((64, 3, 32, 32), torch.bfloat16, False),
        ((64, 4, 256, 256), torch.float32, False),
        ((64, 4, 256, 256), torch.float32, True),
    ]
    if not args.quick:
        cases.append(((256, 4, 256, 256), torch.float32, False))
    header = f"{'op':10} {'shape':>18} {'dtype':>8} {'noise':>6} {'MB/tensor':>9} {'provider':>10} {'ms':>9} {'GB/s':>7} {'% copy':>7} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for shape, dtype, keyed in cases:
        res, err = bench_case(shape, dtype, keyed, repeats, with_diffusers=True)
        copy_gbs = res["copy"]["gbs"]
        mb = torch.Size(shape).numel() * (4 if dtype == torch.float32 else 2) / 2**20
        for name, r in res.items():
            speed = res["reference"]["median_s"] / r["median_s"]
            print(
                f"{'ddpm_step':10} {'x'.join(map(str, shape)):>18} {str(dtype)[6:]:>8} {'keyed' if keyed else 'given':>6} "
                f"{mb:9.1f} {name:>10} {r['median_s'] * 1e3:9.3f} {r['gbs']:7.1f} {100 * r['gbs'] / copy_gbs:6.0f}% {speed:7.2f}x"
            )
            rows.append(
                dict(
                    op="ddpm_step",
                    shape=shape,
                    dtype=str(dtype),
                    noise="keyed" if keyed else "given",
                    provider=name,
                    speedup_vs_reference=speed,
                    pct_copy=100 * r["gbs"] / copy_gbs,
                    max_err_vs_reference=err,
                    **r,
                )
            )
    for shape in [(64, 3, 32, 32), (64, 4, 256, 256)]:
        res = bench_q_sample(shape, repeats)
        copy_gbs = res["copy"]["gbs"]
        for name, r in res.items():
            speed = res["reference"]["median_s"] / r["median_s"]
            print(
                f"{'q_sample':10} {'x'.join(map(str, shape)):>18} {'float32':>8} {'given':>6} "
                f"{torch.Size(shape).numel() * 4 / 2**20:9.1f} {name:>10} {r['median_s'] * 1e3:9.3f} {r['gbs']:7.1f} "
                f"{100 * r['gbs'] / copy_gbs:6.0f}% {speed:7.2f}x"
            )
            rows.append(
                dict(
                    op="q_sample",
                    shape=shape,
                    dtype="torch.float32",
                    noise="given",
                    provider=name,
                    speedup_vs_reference=speed,
                    pct_copy=100 * r["gbs"] / copy_gbs,
                    **r,
                )
            )
    if args.json:
        write_json(
            args.json,
            {
                "machine": info,
                "rows": rows,
                "command": "python benchmarks/bench_step.py" + (" --quick" if args.quick else ""),
            },
        )


if __name__ == "__main__":
    main()
