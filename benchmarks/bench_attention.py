"""Fused CPU attention vs F.scaled_dot_product_attention, and the U-Net's whole attention block (GroupNorm,
projections, attention, output projection, residual) vs diffusers' block with the same weights, at the DDPM
U-Net's 16x16 attention (batch 8, 256 channels; 1 head of 256 and 4 heads of 64).

    python benchmarks/bench_attention.py [--rounds 7] [--json benchmarks/results/attention_cpu.json]

GFLOP/s counts 4 * B * H * N^2 * D for attention; 'sgemm' is torch.mm of 1024^3 in the same rounds (the
machine's matrix-multiply ceiling), into a preallocated out= like the fused kernel (a sampler's usage: a fresh
2-4 MB result page-faults here; SDPA has no out= and allocates); 'sgemm attention tiles' is the same MKL on exactly the products a blocked
(flash-style) attention makes, 128 queries x 256 keys x D, batched over all tiles: the ceiling of that algorithm
on this machine. Targets (CPU U-Net issue): >= 90% of sgemm GFLOP/s; >= 1.2x diffusers' block.
'% sgemm' compares medians of the rounds; 'paired %' the median over rounds of the ratio within each round (the
providers of a round run back to back, so a neighbour's load that slows the whole round cancels); 'fastest %'
the fastest round of each (this shared machine's neighbours slow some rounds by up to 2x, not every provider
alike).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, machine, paired_ratio, write_json  # noqa: E402

import ddpm_fast as df  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    info = machine()
    B, C, S = 8, 256, 16
    a, b, c = torch.randn(1024, 1024), torch.randn(1024, 1024), torch.empty(1024, 1024)
    print(f"# {info['device']}, {info['cpu_threads']} threads, {df.backends()['cpu']}; B={B}, C={C}, {S}x{S} tokens")
    rows = []
    for heads in (1, 4):
        rows += bench_heads(heads, B, C, S, a, b, c, args.rounds)
    if args.json:
        write_json(args.json, {"machine": info, "rows": rows, "command": "python benchmarks/bench_attention.py"})


def bench_heads(heads, B, C, S, a, b, c, rounds):
    from diffusers.models.attention_processor import Attention

    N = S * S
    rows = []
    d = C // heads
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * C)  # what the U-Net's fused projection produces
    q, k, v = (qkv[..., i * C : (i + 1) * C].view(B, N, heads, d).transpose(1, 2) for i in range(3))
    # the blocks: diffusers' Attention as UNet2DModel builds it, and ddpm_fast's with the same weights
    theirs = Attention(
        C,
        heads=heads,
        dim_head=d,
        norm_num_groups=32,
        eps=1e-6,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).eval()
    ours = df.models.unet.AttnBlock(C, df.UNetConfig(attention_head_dim=d, eps=1e-6)).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(B, C, S, S)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty(B, N, heads, d).transpose(1, 2)  # the layout the kernel writes: merging heads is a view
    # the blocked algorithm's own ceiling: MKL on exactly its tiles (128 queries x 256 keys x d), all of them
    tiles = B * heads * (N // 128)
    tq, tk = torch.randn(tiles, 128, d), torch.randn(tiles, d, N)
    tp, tv = torch.randn(tiles, 128, N), torch.randn(tiles, N, d)
    ts, to = torch.empty(tiles, 128, N), torch.empty(tiles, 128, d)
    with torch.inference_mode():
        err_op = (df.ops.attention(q, k, v, backend="cpu") - F.scaled_dot_product_attention(q, k, v)).abs().max()
        err_block = (ours(x_cl) - theirs(x)).abs().max()
        res = interleaved_medians(
            {
                "sgemm 1024^3": lambda: torch.mm(a, b, out=c),
                "sgemm attention tiles": lambda: (torch.bmm(tq, tk, out=ts), torch.bmm(tp, tv, out=to)),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                "fused": lambda: df.ops.attention(q, k, v, backend="cpu", out=out),
                "diffusers block": lambda: theirs(x),
                "ddpm_fast block": lambda: ours(x_cl),
            },
            rounds,
            min_time=0.2,
        )
    flops = {
        "sgemm 1024^3": 2 * 1024**3,
        "sgemm attention tiles": 4 * B * heads * N * N * d,
        "sdpa": 4 * B * heads * N * N * d,
        "fused": 4 * B * heads * N * N * d,
    }
    sgemm = flops["sgemm 1024^3"] / res["sgemm 1024^3"]["median_s"] / 1e9
    sgemm_fastest = flops["sgemm 1024^3"] / res["sgemm 1024^3"]["min_s"] / 1e9
    print(f"\n## {heads} head(s) of {d}: op max err vs SDPA {err_op:.1e}, block max err vs diffusers {err_block:.1e}")
    print(f"{'provider':21} {'ms':>8} {'GFLOP/s':>8} {'% sgemm':>8} {'paired %':>8} {'fastest %':>9} {'speedup':>8}")
    for name, r in res.items():
        gf = flops[name] / r["median_s"] / 1e9 if name in flops else None
        paired = (
            100 * flops[name] / flops["sgemm 1024^3"] / paired_ratio(res, name, "sgemm 1024^3")
            if name in flops
            else None
        )
        fastest = 100 * flops[name] / r["min_s"] / 1e9 / sgemm_fastest if name in flops else None
        vs = {"fused": "sdpa", "ddpm_fast block": "diffusers block"}.get(name)
        speed = res[vs]["median_s"] / r["median_s"] if vs else None
        print(
            f"{name:21} {r['median_s'] * 1e3:8.3f} {'' if gf is None else f'{gf:8.1f}':>8} "
            f"{'' if gf is None else f'{100 * gf / sgemm:7.0f}%':>8} {'' if paired is None else f'{paired:7.0f}%':>8} "
            f"{'' if fastest is None else f'{fastest:8.0f}%':>9} {'' if speed is None else f'{speed:7.2f}x':>8}"
        )
        rows.append(
            dict(
                heads=heads,
                provider=name,
                gflops=gf,
                pct_sgemm=None if gf is None else 100 * gf / sgemm,
                pct_sgemm_paired=paired,
                pct_sgemm_fastest_rounds=fastest,
                speedup=speed,
                **r,
            )
        )
    return rows


if __name__ == "__main__":
    main()
