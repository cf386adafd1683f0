"""The ``ddpm-fast`` command line: train on the bundled digits, sample a checkpoint to a PNG grid, benchmark."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time


def _train(args) -> None:
    from .digits import train_digits

    path = train_digits(
        args.out, steps=args.steps, batch_size=args.batch, lr=args.lr, max_minutes=args.minutes, seed=args.seed
    )
    print(f"checkpoint: {path}\nloss curve: {os.path.join(args.out, 'loss.png')}")


def _sample(args) -> None:
    import torch

    from .diffusion import GaussianDiffusion
    from .digits import DigitsClassifier, model_from_checkpoint, save_grid

    model, schedule = model_from_checkpoint(args.checkpoint)
    d = GaussianDiffusion(model, schedule, backend=args.backend)
    model.set_backend("torch" if args.backend == "torch" else None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        images = d.sample(args.n, seed=args.seed, steps=args.steps, method=args.method, eta=args.eta)
    print(f"{args.n} samples in {time.perf_counter() - t0:.1f} s ({args.backend or 'auto'} backend)")
    if args.grid:
        save_grid(images, args.grid)
        print(f"grid: {args.grid}")
    if args.quality:
        print(DigitsClassifier().quality(images))


def _bench(args, rest) -> None:
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "sample_speed.py")
    if not os.path.exists(script):
        sys.exit(f"bench: {script} not found (the benchmarks ship with the source tree)")
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ddpm-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-digits", help="train a DDPM on scikit-learn's digits (resumes from OUT/checkpoint.pt)")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("sample", help="sample a checkpoint to a PNG grid")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--grid", default=None, help="PNG path")
    s.add_argument("--backend", default=None, choices=[None, "torch", "cpu", "triton", "cuda"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None, help="respaced steps (default: all)")
    s.add_argument("--method", default="ddpm", choices=["ddpm", "ddim"])
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--quality", action="store_true", help="print the digits quality figures")
    sub.add_parser("bench", help="run benchmarks/sample_speed.py (arguments pass through)", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        {"train-digits": _train, "sample": _sample}[args.command](args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"ddpm-fast: {e}")


if __name__ == "__main__":
    main()
