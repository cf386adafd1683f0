"""A convolution under autograd, forward + backward: ops.conv2d on the cpu kernels (Winograd forward, data gradient
dx = conv3x3(dy, w_rot) on the same Winograd kernel, weight and bias gradients by ATen's convolution_backward) vs
F.conv2d + ATen's autograd (what diffusers' training runs), NCHW and channels_last. Also the backward's parts alone:
the data gradient by Winograd vs by ATen, and the Winograd weight transforms (built in each forward and backward
under autograd): w's, w_rot's by the kernel's rotated mode (what the training path runs), and w_rot's from a
rotated copy of w.

    python benchmarks/bench_conv_backward.py [--batch 8] [--cin 128] [--cout 128] [--size 32] [--threads 1]
        [--rounds 7] [--json PATH]

Every forward + backward row first changes the weight in place (w.mul_(1.0)), as an optimizer step does between
training steps. Times: interleaved rounds in this process (common.interleaved_medians); ratios paired by round.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, machine, paired_ratio, steady_malloc, write_json  # noqa: E402

import ddpm_fast as df  # noqa: E402
from ddpm_fast.ops import _cpu  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cin", type=int, default=128)
    p.add_argument("--cout", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    for name in ("batch", "cin", "cout", "size", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if not df.backends()["cpu"].startswith("available"):
        raise SystemExit(f"bench_conv_backward: needs the cpu backend: {df.backends()['cpu']}")
    steady_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, C, K, S = args.batch, args.cin, args.cout, args.size
    torch.manual_seed(0)
    x = torch.randn(B, C, S, S)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(K, C, 3, 3) / (3 * C**0.5)).requires_grad_(True)
    b = torch.zeros(K, requires_grad=True)
    dy = torch.randn(B, K, S, S)
    dy_cl = dy.contiguous(memory_format=torch.channels_last)

    def step(fn, inp, g):
        def run():
            with torch.no_grad():  # as an optimizer step does: the weight's in-place version moves
                w.mul_(1.0)
            xi = inp.detach().requires_grad_(True)
            w.grad = b.grad = None
            fn(xi).backward(g)

        return run

    fused = step(lambda xi: df.ops.conv2d(xi, w, b, padding=1), x_cl, dy_cl)
    with df.ops.trace() as calls:
        fused()
    served = calls.summary()
    if "conv2d_backward cpu/winograd+aten" not in served:
        raise SystemExit(f"bench_conv_backward: the fused row did not run the Winograd backward: {served}")
    wd = w.detach()
    geometry = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    tile = _cpu.winograd_tile(B, S, S)
    packed = _cpu.winograd_weight(wd, tile, rotated=True)
    providers = {
        "fused fwd+bwd (channels_last)": fused,
        "F.conv2d fwd+bwd NCHW": step(lambda xi: F.conv2d(xi, w, b, padding=1), x, dy),
        "F.conv2d fwd+bwd channels_last": step(lambda xi: F.conv2d(xi, w, b, padding=1), x_cl, dy_cl),
        "dx: Winograd (weight transformed)": lambda: _cpu._winograd_conv(dy_cl, None, None, None, packed, None),
        "dx: ATen convolution_backward": lambda: torch.ops.aten.convolution_backward(
            dy_cl, x_cl, wd, None, *geometry, [True, False, False]
        ),
        "dw, db: ATen convolution_backward": lambda: torch.ops.aten.convolution_backward(
            dy_cl, x_cl, wd, [K], *geometry, [False, True, True]
        ),
        "w_rot's transform: copy + kernel": lambda: _cpu.winograd_weight(_cpu._rotated(wd).contiguous(), tile),
        "w_rot's transform: kernel, rotated": lambda: _cpu.winograd_weight(wd, tile, rotated=True),
        "w's transform: kernel": lambda: _cpu.winograd_weight(wd, tile),
    }
    info = machine()
    print(
        f"# {info['device']}, {torch.get_num_threads()} thread(s), {df.backends()['cpu']}; conv 3x3 {C}->{K} at "
        f"{S}x{S}, batch {B}, fp32; fused served: {served}"
    )
    res = interleaved_medians(providers, args.rounds, min_time=0.3)
    base = "F.conv2d fwd+bwd NCHW"
    rows = []
    print(f"{'provider':36} {'ms':>8} {'q1-q3 ms':>16} {'F.conv2d NCHW / row':>20} {'F.conv2d cl / row':>18}")
    for name, r in res.items():
        pair = name.startswith(("fused", "F.conv2d"))
        vs = paired_ratio(res, base, name) if pair else None
        vs_cl = paired_ratio(res, "F.conv2d fwd+bwd channels_last", name) if pair else None
        print(
            f"{name:36} {r['median_s'] * 1e3:8.2f} {r['q1_s'] * 1e3:7.2f}-{r['q3_s'] * 1e3:<8.2f} "
            f"{'' if vs is None else f'{vs:19.2f}x'} {'' if vs_cl is None else f'{vs_cl:17.2f}x'}"
        )
        rows.append(dict(provider=name, ms=r["median_s"] * 1e3, vs_f_conv2d_nchw=vs, vs_f_conv2d_cl=vs_cl, **r))
    dx = paired_ratio(res, "dx: ATen convolution_backward", "dx: Winograd (weight transformed)")
    print(f"# data gradient: ATen / Winograd = {dx:.2f}x (paired by round)")
    if args.json:
        write_json(
            args.json,
            {"machine": info, "command": "python " + " ".join(sys.argv), "threads": torch.get_num_threads(),
             "shape": dict(batch=B, cin=C, cout=K, size=S), "served": served, "rows": rows},
        )  # fmt: skip


if __name__ == "__main__":
    main()
