"""One core's ceiling for the CPU attention kernel: the FMA peak, register tiles of the kernel's shapes, MKL's and
oneDNN's sgemm ('% sgemm' against the faster) and the fused attention itself, all on one thread, the fastest of
15 rounds (this machine's neighbours slow some rounds by up to 2x; the fastest round is the closest to what the
core can do).

    python benchmarks/bench_tiles.py [--json benchmarks/results/tiles_cpu.json]

The tile rows come from benchmarks/tile_shapes.cpp (compiled here with g++ -O3 -mavx2 -mfma, and -mavx512f on a
CPU with AVX-512, which adds the 512-bit FMA peak: the ceiling of the avx512 build, against which '% FMA peak' is
then computed; the tile and panel rows stay AVX2's): 6x16 is the AVX2 build's attention tile; K = 64 is a score
tile at four heads of 64, K = 256 a value tile over 256 keys. The panel rows are one 16-query panel's score tiles at four heads (42 tiles of 6 keys, K from L2), products only and
with the kernel's epilogue (reference check, exponentials, column sums); GFLOP/s counts the products in both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    best_sgemm,
    fused_row,
    interleaved_medians,
    machine,
    sgemm_providers,
    steady_malloc,
    write_json,
)

import ddpm_fast as df  # noqa: E402
from ddpm_fast import _ext  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def avx512() -> bool:
    return "avx512" in _ext.runnable_builds()


def tile_rates() -> dict:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise SystemExit(f"bench_tiles: no C++ compiler ({cxx}); set CXX")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "tile_shapes")
        isa = ["-mavx2", "-mfma"] + (["-mavx512f"] if avx512() else [])
        subprocess.run([cxx, "-O3", *isa, os.path.join(HERE, "tile_shapes.cpp"), "-o", exe], check=True)
        return json.loads(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    args = p.parse_args()
    steady_malloc()  # oneDNN's sgemm allocates its result
    torch.set_num_threads(1)
    info = machine()
    rates = tile_rates()
    # the ceiling of the build ddpm_fast loads: 512-bit FMAs on an AVX-512 CPU (the avx512 build), else 256-bit
    peak = rates["fma_peak512"] if avx512() else rates["fma_peak"]
    rows = [("AVX-512 FMA peak (registers only)", rates["fma_peak512"])] if avx512() else []
    rows += [
        (name, rates[key])
        for name, key in (
            ("FMA peak (registers only)", "fma_peak"),
            ("tile 6x16, K = 64", "6x16_k64"),
            ("tile 4x24, K = 64", "4x24_k64"),
            ("tile 4x16, K = 64", "4x16_k64"),
            ("tile 6x16, K = 256", "6x16_k256"),
            ("tile 4x24, K = 256", "4x24_k256"),
            ("tile 4x16, K = 256", "4x16_k256"),
            ("panel score tiles, products only", "panel_products"),
            ("panel score tiles + exponentials", "panel_exp"),
        )
    ]
    providers = sgemm_providers()  # MKL's and oneDNN's
    provenance = {}
    sgemm_names = list(providers)
    flops = {name: 2 * 1024**3 for name in providers}
    B, C, N = 8, 256, 256
    qkv = torch.randn(B, N, 3 * C)
    for heads in (1, 4):
        d = C // heads
        q, k, v = (qkv[..., i * C : (i + 1) * C].view(B, N, heads, d).transpose(1, 2) for i in range(3))
        out = torch.empty(B, N, heads, d).transpose(1, 2)
        name = f"fused attention, {heads} head(s) of {d}"
        providers[name] = lambda q=q, k=k, v=v, out=out: df.ops.attention(q, k, v, backend="cpu", out=out)
        flops[name] = 4 * B * N * N * C
    with torch.inference_mode():
        for name in providers:
            if name.startswith("fused"):
                provenance[name] = fused_row(name, providers[name], backend="cpu", ops=["attention"])
        res = interleaved_medians(providers, repeats=15, min_time=0.02)
    rows += [(name, flops[name] / r["min_s"] / 1e9) for name, r in res.items()]
    ceiling = best_sgemm(res, sgemm_names, "min_s")  # the fastest round, as every row here
    sgemm = dict(rows)[ceiling]
    print(f"# {info['device']}, one thread, fastest of 15 rounds; '% sgemm' against {ceiling}")
    print(f"{'':34} {'GFLOP/s':>8} {'% FMA peak':>11} {'% sgemm':>8}")
    for name, gf in rows:
        print(f"{name:34} {gf:8.1f} {100 * gf / peak:10.0f}% {100 * gf / sgemm:7.0f}%")
    if args.json:
        write_json(
            args.json,
            {
                "machine": info,
                "sgemm_ceiling": ceiling,
                "malloc_steady": True,
                "rows": [
                    {
                        "name": n,
                        "gflops": g,
                        "pct_fma_peak": 100 * g / peak,
                        "pct_sgemm": 100 * g / sgemm,
                        "served": provenance.get(n),
                    }
                    for n, g in rows
                ],
                "command": "python benchmarks/bench_tiles.py",
            },
        )


if __name__ == "__main__":
    main()
