"""The ``ddpm-fast`` command line: train on the bundled digits, sample a checkpoint to a folder, benchmark."""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def _train(args) -> None:
    from .digits import train_digits

    path = train_digits(
        args.out, steps=args.steps, batch_size=args.batch, lr=args.lr, max_minutes=args.minutes, seed=args.seed
    )
    print(f"checkpoint: {path}\nloss curve: {os.path.join(args.out, 'loss.png')}")


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
    sub.add_parser(
        "sample", help="sample a checkpoint into a folder: npz + grid, sharded under torchrun", add_help=False
    )
    sub.add_parser("bench", help="run benchmarks/sample_speed.py (arguments pass through)", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        return _bench(args, rest)
    if args.command == "sample":
        from .sample import main as sample_main

        return sample_main(rest, prog="ddpm-fast sample")
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        _train(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"ddpm-fast: {e}")


if __name__ == "__main__":
    main()
