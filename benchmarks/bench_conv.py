"""The U-Net's 3x3 convolutions: Winograd F(2x2, 3x3) (ops.conv3x3, cpu) vs oneDNN with a reordered weight
(the fused U-Net's previous path) vs F.conv2d eager in NCHW and channels_last (what diffusers runs), at the
DDPM CIFAR-10 U-Net's shapes for batch 8. GFLOP/s count the direct convolution's 2*N*H*W*C*K*9 for every
provider (Winograd does 2.25x fewer multiply-adds: its "effective" rate can pass the machine's GEMM peak).

    python benchmarks/bench_conv.py [--batch 8] [--repeats 7] [--json benchmarks/results/conv_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fused_row, interleaved_medians, machine, write_json  # noqa: E402

import ddpm_fast as df  # noqa: E402

# (C_in, C_out, H): every 3x3 stride-1 convolution shape of the CIFAR-10 U-Net (ch 128, mult 1, 2, 2, 2)
SHAPES = [
    (128, 128, 32),
    (256, 128, 32),
    (384, 128, 32),
    (128, 256, 16),
    (256, 256, 16),
    (384, 256, 16),
    (512, 256, 16),
    (256, 256, 8),
    (512, 256, 8),
    (256, 256, 4),
    (512, 256, 4),
]


def bench(N, C, K, H, repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, H, generator=g)
    xcl = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, C, 3, 3, generator=g) / (3 * C**0.5)
    b = torch.randn(K, generator=g)
    packed = df.ops.winograd_weight(w)
    onednn = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))

    def dnnl():
        return torch.ops.mkldnn._convolution_pointwise(xcl, onednn, b, [1, 1], [1, 1], [1, 1], 1, "none", [], "")

    providers = {
        "F.conv2d NCHW": lambda: F.conv2d(x, w, b, padding=1),
        "F.conv2d channels_last": lambda: F.conv2d(xcl, w, b, padding=1),
        "oneDNN prepacked": dnnl,
        "winograd": lambda: df.ops.conv3x3(xcl, w, b, packed=packed, backend="cpu"),
    }
    with torch.inference_mode():
        what = fused_row(f"winograd {C}->{K} @ {H}x{H}", providers["winograd"], backend="cpu", ops=["conv3x3"])
        res = interleaved_medians(providers, repeats)
        res["winograd"]["served"] = what
        err = (providers["winograd"]() - F.conv2d(x, w, b, padding=1)).abs().max().item()
    flops = 2 * N * H * H * C * K * 9
    for r in res.values():
        r["gflops"] = flops / r["median_s"] / 1e9
    return res, err


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    info = machine()
    print(f"# {info['device']}, {info['cpu_threads']} threads, batch {args.batch}, medians of {args.repeats} rounds")
    print(
        f"{'C->K @ HxW':18} {'NCHW ms':>8} {'CL ms':>8} {'oneDNN ms':>9} {'wino ms':>8} {'wino GF/s':>9} "
        f"{'vs oneDNN':>9} {'vs NCHW':>8} {'max err':>8}"
    )
    rows = []
    tot = {k: 0.0 for k in ("F.conv2d NCHW", "F.conv2d channels_last", "oneDNN prepacked", "winograd")}
    for C, K, H in SHAPES:
        res, err = bench(args.batch, C, K, H, args.repeats)
        ms = {k: v["median_s"] * 1e3 for k, v in res.items()}
        for k in tot:
            tot[k] += ms[k]
        print(
            f"{f'{C}->{K} @ {H}x{H}':18} {ms['F.conv2d NCHW']:8.2f} {ms['F.conv2d channels_last']:8.2f} "
            f"{ms['oneDNN prepacked']:9.2f} {ms['winograd']:8.2f} {res['winograd']['gflops']:9.0f} "
            f"{ms['oneDNN prepacked'] / ms['winograd']:8.2f}x {ms['F.conv2d NCHW'] / ms['winograd']:7.2f}x "
            f"{err:8.1e}"
        )
        rows.append(dict(C=C, K=K, H=H, batch=args.batch, results=res, max_err=err))
    print(
        f"{'sum of shapes':18} {tot['F.conv2d NCHW']:8.2f} {tot['F.conv2d channels_last']:8.2f} "
        f"{tot['oneDNN prepacked']:9.2f} {tot['winograd']:8.2f} {'':9} "
        f"{tot['oneDNN prepacked'] / tot['winograd']:8.2f}x {tot['F.conv2d NCHW'] / tot['winograd']:7.2f}x"
    )
    if args.json:
        write_json(
            args.json, {"machine": info, "args": vars(args), "rows": rows, "command": "python " + " ".join(sys.argv)}
        )


if __name__ == "__main__":
    main()
