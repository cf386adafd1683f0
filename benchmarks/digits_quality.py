"""Sample a digits checkpoint with the reference and the fused backends (same seeds), and report quality and speed.

    python benchmarks/digits_quality.py --checkpoint runs/digits/checkpoint.pt [-n 500] [--grid docs/digits_samples.png]
    python benchmarks/digits_quality.py --checkpoint runs/digits/checkpoint.pt -n 128 --bf16 --seeds 0,1,2 [--steps 100]

Quality: a digits classifier's class histogram and mean confidence of the samples, and the Frechet distance
between samples and the real digits in the classifier's feature space (ddpm_fast/digits.py).

--bf16: instead of the usual rows, the fused cpu sampler (DDPM, every step) with the model in fp32 and cast to bf16
(the chain x_t kept in fp32), the same seeds for both; the verdict compares bf16's distances with fp32's
seed-to-seed spread (max - min over --seeds), the noise of the metric at this sample count.

--solvers: quality against steps. Per seed, DDPM with every step (T = 1000) and each fewer-step method of
GaussianDiffusion.sample (ddim, dpmpp_2m, dpmpp_3m, sde_dpmpp_2m, unipc) at each of --steps-list (default 10,20,50),
all on the fused cpu sampler with the same seeds. Per (method, steps): the mean Frechet distance and confidence over
the seeds, and the speed over DDPM-1000 (its time / the row's, paired by seed). The noise of the metric is
DDPM-1000's seed-to-seed spread (max - min over --seeds); a row is "within" it when its mean distance is at most
DDPM-1000's mean plus that spread (a lower distance than DDPM-1000's counts as within).

    python benchmarks/digits_quality.py --checkpoint runs/digits/checkpoint.pt -n 128 --solvers --seeds 0,1,2
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
    p.add_argument("--bf16", action="store_true", help="compare the model in bf16 with fp32 over --seeds")
    p.add_argument("--seeds", default=None, help="comma list of seeds for --bf16 (default: --seed)")
    p.add_argument("--steps", type=int, default=None, help="--bf16: respaced DDPM steps (default: every step)")
    p.add_argument("--solvers", action="store_true", help="every fewer-step method at --steps-list against DDPM-1000")
    p.add_argument("--steps-list", default="10,20,50", help="--solvers: comma list of step counts (default 10,20,50)")
    args = p.parse_args()
    try:
        seeds = [args.seed] if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        p.error(f"--seeds: expected a comma list of integers, got {args.seeds!r}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps: expected a positive number of steps, got {args.steps}")
    if args.n < 2:
        p.error(f"-n: expected at least 2 samples (the Frechet distance needs a covariance), got {args.n}")
    if args.bf16 and args.solvers:
        p.error("--bf16 and --solvers: give one of them")
    try:
        steps_list = [int(s) for s in args.steps_list.split(",") if s.strip()]
    except ValueError:
        steps_list = []
    if not steps_list or min(steps_list) < 1:
        p.error(f"--steps-list: expected a comma list of positive integers, got {args.steps_list!r}")
    model, schedule = model_from_checkpoint(args.checkpoint)
    clf = DigitsClassifier()
    if max(steps_list) > len(schedule) and args.solvers:
        p.error(f"--steps-list: {max(steps_list)} steps > the checkpoint's {len(schedule)} timesteps")
    if args.bf16:
        return precision(args, seeds, model, schedule, clf)
    if args.solvers:
        return solvers(args, seeds, steps_list, model, schedule, clf)
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


def precision(args, seeds, model, schedule, clf):
    """fp32 and bf16 rows per seed; the verdict: bf16's mean distance within fp32's seed-to-seed spread of fp32's mean."""
    import copy

    models = {"fp32": model.eval(), "bf16": copy.deepcopy(model).to(torch.bfloat16).eval()}
    rows, dist, first = [], {k: [] for k in models}, {}
    for seed in seeds:
        for name, m in models.items():
            m.set_backend(None)
            d = df.GaussianDiffusion(m, schedule, backend="cpu")
            t0 = time.perf_counter()
            with df.ops.trace() as calls, torch.inference_mode():
                x = d.sample(args.n, seed=seed, steps=args.steps, progress=False)
            seconds = time.perf_counter() - t0
            q = clf.quality(x)
            dist[name].append(q.frechet_distance)
            diff = None if name == "fp32" else (x - first[seed]).abs().max().item()
            first.setdefault(seed, x)
            served = calls.summary()
            rows.append(
                dict(
                    sampler=f"cpu {name} ddpm {args.steps or len(schedule)} steps",
                    seed=seed,
                    seconds=seconds,
                    frechet_distance=q.frechet_distance,
                    mean_confidence=q.mean_confidence,
                    class_histogram=q.class_histogram,
                    max_abs_diff_vs_fp32=diff,
                    served=served,
                )
            )
            extra = "" if diff is None else f", max abs diff vs fp32 {diff:.3f}"
            print(f"{name} seed {seed}: {seconds:6.1f} s  {q}{extra}", flush=True)
    mean = {k: sum(v) / len(v) for k, v in dist.items()}
    spread = max(dist["fp32"]) - min(dist["fp32"])
    within = abs(mean["bf16"] - mean["fp32"]) <= spread
    verdict = (
        f"Frechet distance over seeds {seeds}: fp32 {mean['fp32']:.3f} (spread {spread:.3f}), bf16 {mean['bf16']:.3f}: "
        f"bf16 {'within' if within else 'outside'} fp32's seed-to-seed spread"
    )
    finish(args, seeds, rows, verdict, frechet_mean=mean, fp32_spread=spread, bf16_within_fp32_spread=within)


def finish(args, seeds, rows, verdict, **fields):
    """Print the verdict and write the record (the machine, the rows, ``fields``, the command line) to --json."""
    print(verdict)
    if len(seeds) < 2:
        print("(one seed: no spread to compare against; give --seeds 0,1,2)")
    if args.json:
        record = {"machine": machine(), "n": args.n, "seeds": seeds, "rows": rows, **fields, "verdict": verdict}
        write_json(args.json, {**record, "command": "python " + " ".join(sys.argv)})


SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m", "unipc")


def solvers(args, seeds, steps_list, model, schedule, clf):
    """DDPM with every step (T) and every fewer-step method at each step count, per seed, on the fused cpu sampler; per (method,
    steps) the means over seeds, the speed over DDPM-T paired by seed, and whether the mean distance is within
    DDPM-T's seed-to-seed spread."""
    T = len(schedule)
    model.set_backend(None)
    d = df.GaussianDiffusion(model, schedule, backend="cpu")
    configs = [("ddpm", len(schedule))] + [(m, s) for s in steps_list for m in SOLVERS]
    rows, per = [], {c: [] for c in configs}
    for seed in seeds:
        for method, steps in configs:
            t0 = time.perf_counter()
            with df.ops.trace() as calls, torch.inference_mode():
                x = d.sample(args.n, seed=seed, steps=steps, method=method, progress=False)
            seconds = time.perf_counter() - t0
            q = clf.quality(x)
            calls.require_fused(f"digits {method} {steps} steps", backend="cpu")
            row = dict(
                method=method,
                steps=steps,
                seed=seed,
                seconds=seconds,
                frechet_distance=q.frechet_distance,
                mean_confidence=q.mean_confidence,
                class_histogram=q.class_histogram,
                served=calls.summary(),
            )
            rows.append(row)
            per[method, steps].append(row)
            print(f"seed {seed} {method:13} {steps:5} steps {seconds:7.2f} s  {q}", flush=True)
    base = per["ddpm", len(schedule)]
    base_fd = [r["frechet_distance"] for r in base]
    base_mean = sum(base_fd) / len(base_fd)
    spread = max(base_fd) - min(base_fd)
    summary = []
    print(
        f"\n{'method':13} {'steps':>5} {'Frechet (mean)':>15} {'confidence':>11} {'s':>8} {f'speed vs DDPM-{T}':>19}"
        f"  within DDPM-{T}'s spread ({spread:.3f})"
    )
    for (method, steps), rs in per.items():
        fd = sum(r["frechet_distance"] for r in rs) / len(rs)
        conf = sum(r["mean_confidence"] for r in rs) / len(rs)
        sec = sum(r["seconds"] for r in rs) / len(rs)
        speeds = sorted(b["seconds"] / r["seconds"] for b, r in zip(base, rs))
        speed = speeds[len(speeds) // 2]
        within = fd <= base_mean + spread
        summary.append(
            dict(method=method, steps=steps, frechet_mean=fd, confidence_mean=conf, seconds_mean=sec,
                 speed_vs_ddpm_T=speed, within_ddpm_T_spread=within)
        )  # fmt: skip
        print(f"{method:13} {steps:5} {fd:15.3f} {conf:11.3f} {sec:8.2f} {speed:18.1f}x  {'yes' if within else 'no'}")
    hits = [r for r in summary if r["steps"] == 20 and r["within_ddpm_T_spread"] and r["speed_vs_ddpm_T"] >= 25]
    verdict = (
        f"DDPM-{T}: Frechet distance {base_mean:.3f}, spread over seeds {seeds} {spread:.3f}; at 20 steps within "
        f"that spread and at least 25x faster: {', '.join(r['method'] for r in hits) or 'none'}"
    )
    finish(args, seeds, rows, verdict, summary=summary, ddpm_T_frechet_mean=base_mean, ddpm_T_spread=spread)


if __name__ == "__main__":
    main()
