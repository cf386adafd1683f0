"""Fused CPU attention vs F.scaled_dot_product_attention, and the U-Net's whole attention block (GroupNorm,
projections, attention, output projection, residual) vs diffusers' block with the same weights, at the DDPM
U-Net's 16x16 attention (batch 8, 256 channels; 1 head of 256 and 4 heads of 64).

    python benchmarks/bench_attention.py [--rounds 7] [--json benchmarks/results/attention_cpu.json]

GFLOP/s counts 4 * B * H * N^2 * D for attention. The sgemm rows are the fp32 1024^3 product of each library
torch links, in the same rounds: MKL's (torch.mm into a preallocated out=, like the fused kernel) and oneDNN's
(its linear); '% sgemm' is against the faster of the two, the machine's matrix-multiply ceiling as far as torch
reaches it (MKL takes its AVX2 path on AMD CPUs, oneDNN JIT-compiles for AVX-512 there: the two differ by about
2x on an AVX-512 AMD EPYC). The script runs with glibc's mmap threshold raised (common.steady_malloc), so that
the providers that allocate their result on every call (oneDNN's linear, SDPA, diffusers' block) reuse freed
memory instead of page-faulting a fresh block each time. 'MKL attention tiles' is MKL on exactly the products a
blocked (flash-style) attention makes, 128 queries x 256 keys x D, batched over all tiles.
Targets (CPU U-Net issue): >= 90% of sgemm GFLOP/s; >= 1.2x diffusers' block.
The 'backward' rows time attention's gradient (training) at BACKWARD_SHAPES: the fused backward, the reference's
autograd and SDPA's, alone and with their forwards; '--backward-only --threads 1' runs just those.
The 'denormals' rows time the fused kernel on logits scaled by 30 (most softmax weights, and their products with
V, denormal in fp32: a microcode assist each on x86 unless flushed) against the plain logits, side by side in the
same rounds; 'ratio' is the median over rounds of peaked / plain (1.0: the denormals cost nothing).
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
from common import (  # noqa: E402
    best_sgemm,
    fused_row,
    interleaved_medians,
    machine,
    paired_ratio,
    sgemm_providers,
    steady_malloc,
    write_json,
)

import ddpm_fast as df  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--backward-only", action="store_true", help="only the backward rows")
    args = p.parse_args()
    steady_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    B, C, S = 8, 256, 16
    if args.backward_only:
        backward = [row for shape in BACKWARD_SHAPES for row in bench_backward(*shape, args.rounds)]
        if args.json:
            write_json(args.json, {"machine": info, "backward": backward, "command": " ".join(["python"] + sys.argv)})
        return
    sgemm = sgemm_providers()
    print(f"# {info['device']}, {info['cpu_threads']} threads, {df.backends()['cpu']}; B={B}, C={C}, {S}x{S} tokens")
    print("# malloc: steady (freed blocks reused); '% sgemm' against the faster sgemm row")
    rows = []
    for heads in (1, 4):
        rows += bench_heads(heads, B, C, S, sgemm, args.rounds)
    print("\n## denormals: logits x30 vs plain logits, fused kernel")
    denormals = [bench_denormals(B, heads, S * S, C // heads, args.rounds) for heads in (1, 4)]
    backward = [row for shape in BACKWARD_SHAPES for row in bench_backward(*shape, args.rounds)]
    if args.json:
        record = {"machine": info, "rows": rows, "denormals": denormals, "backward": backward, "malloc_steady": True}
        write_json(args.json, {**record, "command": "python benchmarks/bench_attention.py"})


def bench_denormals(B, heads, N, d, rounds, min_time=0.2):
    """The fused kernel on logits x30 against plain logits, (B, heads, N, d) self-attention, timed side by side;
    returns the row (ratio: median over rounds of peaked / plain time)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, N, d, generator=g) for _ in range(3))
    peaked = 30 * q
    out = torch.empty_like(q)
    providers = {
        "plain": lambda: df.ops.attention(q, k, v, backend="cpu", out=out),
        "logits x30": lambda: df.ops.attention(peaked, k, v, backend="cpu", out=out),
    }
    with torch.inference_mode():
        served = {
            name: fused_row(f"fused attention, {name}, {heads} head(s)", fn, "cpu", ["attention"])
            for name, fn in providers.items()
        }
        res = interleaved_medians(providers, rounds, min_time=min_time)
    for name, what in served.items():
        res[name]["served"] = what
    ratio = paired_ratio(res, "logits x30", "plain")
    plain_ms, peaked_ms = res["plain"]["median_s"] * 1e3, res["logits x30"]["median_s"] * 1e3
    print(f"{heads} head(s) of {d}: plain {plain_ms:.3f} ms, logits x30 {peaked_ms:.3f} ms, ratio {ratio:.2f}x")
    return dict(case="denormals", shape=[B, heads, N, d], provider="fused", ratio=ratio, providers=res)


# (B, heads, N, d): the U-Net's 16x16 attention (one head of 256, batch 8), and a 32x32 one of 128 channels (batch 2),
# where the reference's N x N intermediates are 16x as large a head
BACKWARD_SHAPES = [(8, 1, 256, 256), (2, 1, 1024, 128)]


def bench_backward(B, heads, N, d, rounds, min_time=0.2):
    """Training: the gradient of attention for q, k, v the strided head views of one (B, N, 3C) projection (as the
    U-Net makes them; leaves, so that only attention's own backward is timed), against dO. Rows: the fused cpu backward
    (ops.attention under autograd: csrc/cpu/attention_backward.cpp from the forward's log-sum-exp), the reference's
    autograd (P kept, 4 products) and SDPA's; each alone (the forward's graph kept, retain_graph) and with its
    forward. Ratios are medians over rounds of the paired times (reference / fused: > 1, fused is faster)."""
    from ddpm_fast import reference as ref

    C = heads * d
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3 * C, generator=g)
    leaves = [qkv[..., i * C : (i + 1) * C].view(B, N, heads, d).transpose(1, 2).requires_grad_(True) for i in range(3)]
    do = torch.randn(B, heads, N, d, generator=g)

    fns = {
        "fused": lambda q, k, v: df.ops.attention(q, k, v, backend=None),
        "reference": ref.attention,
        "sdpa": F.scaled_dot_product_attention,
    }
    graphs = {name: fn(*leaves) for name, fn in fns.items()}
    providers = {}
    for name, fn in fns.items():
        providers[f"{name} backward"] = lambda o=graphs[name]: torch.autograd.grad(o, leaves, do, retain_graph=True)
        providers[f"{name} forward+backward"] = lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, do)
    grads = {name: torch.cat(torch.autograd.grad(o, leaves, do, retain_graph=True), -1) for name, o in graphs.items()}
    exact64 = [t.detach().double().requires_grad_(True) for t in leaves]
    exact = torch.cat(torch.autograd.grad(ref.attention(*exact64), exact64, do.double()), -1)
    served = fused_row("fused attention backward", providers["fused forward+backward"], "cpu", ["attention"])
    res = interleaved_medians(providers, rounds, min_time=min_time)
    print(f"\n## backward: B={B}, {heads} head(s) of {d}, N={N}, {torch.get_num_threads()} thread(s); {served}")
    print(f"{'provider':27} {'ms':>8} {'ref / this':>10} {'max err dq,dk,dv':>15}")
    rows = []
    for name, r in res.items():
        kind = name.split(" ", 1)[1]
        speed = paired_ratio(res, f"reference {kind}", name)
        err = (grads[name.split(" ")[0]].double() - exact).abs().max().item()
        print(f"{name:27} {r['median_s'] * 1e3:8.3f} {speed:9.2f}x {err:15.2e}")
        rows.append(dict(provider=name, shape=[B, heads, N, d], ratio_reference_over_this=speed, max_err=err, **r))
    return rows


def bench_heads(heads, B, C, S, sgemm, rounds):
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
    providers = {
        **sgemm,
        "MKL attention tiles": lambda: (torch.bmm(tq, tk, out=ts), torch.bmm(tp, tv, out=to)),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "fused": lambda: df.ops.attention(q, k, v, backend="cpu", out=out),
        "diffusers block": lambda: theirs(x),
        "ddpm_fast block": lambda: ours(x_cl),
    }
    with torch.inference_mode():
        err_op = (df.ops.attention(q, k, v, backend="cpu") - F.scaled_dot_product_attention(q, k, v)).abs().max()
        err_block = (ours(x_cl) - theirs(x)).abs().max()
        provenance = {
            "fused": fused_row(f"fused attention, {heads} head(s)", providers["fused"], "cpu", ["attention"]),
            "ddpm_fast block": fused_row(
                f"ddpm_fast attention block, {heads} head(s)",
                providers["ddpm_fast block"],
                "cpu",
                ["group_norm_silu", "linear", "attention"],
            ),
        }
        res = interleaved_medians(providers, rounds, min_time=0.2)
    flops = {name: 2 * 1024**3 for name in sgemm}
    flops.update({name: 4 * B * heads * N * N * d for name in ("MKL attention tiles", "sdpa", "fused")})
    ceiling = best_sgemm(res, sgemm)
    sgemm_gf = flops[ceiling] / res[ceiling]["median_s"] / 1e9
    sgemm_fastest = flops[ceiling] / res[ceiling]["min_s"] / 1e9
    print(f"\n## {heads} head(s) of {d}: op max err vs SDPA {err_op:.1e}, block max err vs diffusers {err_block:.1e}")
    print(f"## '% sgemm': against {ceiling}")
    print(f"{'provider':21} {'ms':>8} {'GFLOP/s':>8} {'% sgemm':>8} {'paired %':>8} {'fastest %':>9} {'speedup':>8}")
    for name, r in res.items():
        gf = flops[name] / r["median_s"] / 1e9 if name in flops else None
        paired = 100 * flops[name] / flops[ceiling] / paired_ratio(res, name, ceiling) if name in flops else None
        fastest = 100 * flops[name] / r["min_s"] / 1e9 / sgemm_fastest if name in flops else None
        vs = {"fused": "sdpa", "ddpm_fast block": "diffusers block"}.get(name)
        speed = res[vs]["median_s"] / r["median_s"] if vs else None
        print(
            f"{name:21} {r['median_s'] * 1e3:8.3f} {'' if gf is None else f'{gf:8.1f}':>8} "
            f"{'' if gf is None else f'{100 * gf / sgemm_gf:7.0f}%':>8} {'' if paired is None else f'{paired:7.0f}%':>8} "
            f"{'' if fastest is None else f'{fastest:8.0f}%':>9} {'' if speed is None else f'{speed:7.2f}x':>8}"
        )
        rows.append(
            dict(
                heads=heads,
                provider=name,
                gflops=gf,
                pct_sgemm=None if gf is None else 100 * gf / sgemm_gf,
                sgemm_ceiling=ceiling,
                pct_sgemm_paired=paired,
                pct_sgemm_fastest_rounds=fastest,
                speedup=speed,
                served=provenance.get(name),
                **r,
            )
        )
    return rows


if __name__ == "__main__":
    main()
