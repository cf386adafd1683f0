"""Sample a digits checkpoint with the reference and the fused backends (same seeds), and report quality and speed.

    python benchmarks/digits_quality.py --checkpoint runs/digits/checkpoint.pt [-n 500] [--grid docs/digits_samples.png]

Quality: a digits classifier's class histogram and mean confidence of the samples, and the Frechet distance
between samples and the real digits in the classifier's feature space (ddpm_fast/digits.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402

import ddpm_fast as df  # noqa: E402
from ddpm_fast.digits import DigitsClassifier, model_from_checkpoint, save_grid  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("-n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, schedule = model_from_checkpoint(args.checkpoint)
    clf = DigitsClassifier()
    rows, images = [], {}
    configs = [
        ("reference", "torch", None, "ddpm"),
        ("cpu", "cpu", None, "ddpm"),
        ("cpu", "cpu", 100, "ddpm"),
        ("cpu", "cpu", 50, "ddpm"),
        ("cpu", "cpu", 100, "ddim"),
        ("cpu", "cpu", 50, "ddim"),
    ]
    for name, backend, steps, method in configs:
        model.set_backend("torch" if backend == "torch" else None)
        d = df.GaussianDiffusion(model, schedule, backend=backend)
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = d.sample(args.n, seed=args.seed, steps=steps, method=method, progress=False)
        seconds = time.perf_counter() - t0
        q = clf.quality(x)
        label = f"{name} {method} {steps or len(schedule)} steps"
        images[label] = x
        rows.append(
            dict(
                sampler=label,
                seconds=seconds,
                frechet_distance=q.frechet_distance,
                mean_confidence=q.mean_confidence,
                class_histogram=q.class_histogram,
            )
        )
        print(f"{label:28} {seconds:7.1f} s  {q}", flush=True)
    ref = images["reference ddpm 1000 steps"]
    err = (images["cpu ddpm 1000 steps"] - ref).abs().max().item()
    bound = 1e-3 * max(1.0, ref.abs().max().item())
    print(f"fused vs reference, same seeds: max abs diff {err:.2e} (chain tolerance {bound:.1e})")
    if args.grid:
        save_grid(images["cpu ddpm 1000 steps"][:64], args.grid)
        print(f"grid: {args.grid}")
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine(),
                "n": args.n,
                "rows": rows,
                "max_abs_diff_fused_vs_reference": err,
                "command": "python " + " ".join(sys.argv),
            },
        )


if __name__ == "__main__":
    main()
