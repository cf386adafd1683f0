"""Fused GroupNorm+SiLU vs F.group_norm + F.silu (eager PyTorch), NCHW and channels_last, with GB/s next to the
copy bandwidth of the same tensor measured in the same rounds.

    python benchmarks/bench_group_norm.py [--quick] [--steady-malloc] [--json benchmarks/results/group_norm_cpu.json]

Targets (CPU U-Net issue): >= 1.5x in NCHW and >= 2x in channels_last, fp32, at the U-Net's shapes.
The 'denormals' rows time the fused kernel with weights of 300 (SiLU's reciprocals of its denominators denormal in
fp32: a microcode assist each on x86 unless clamped and flushed) against weights of 1, side by side in the same
rounds; 'ratio' is the median over rounds of the two times (1.0: the denormals cost nothing).

Eager torch allocates its intermediates and its result afresh on every call; above glibc's mmap threshold
those come from mmap and page-fault on first touch, which makes its time bimodal here (about 1 ms or 5-6 ms at
8x128x32x32, depending on the threshold's history). --steady-malloc reruns the script with glibc's mmap and trim
thresholds raised (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so freed blocks are reused and torch is
always in its fast mode: the fair comparison. The fused kernel writes into a preallocated out= either way.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fused_row, interleaved_medians, machine, paired_ratio, steady_malloc, write_json  # noqa: E402

import ddpm_fast as df  # noqa: E402

SHAPES = [((8, 128, 32, 32), 32), ((8, 256, 16, 16), 32), ((64, 128, 32, 32), 32), ((6, 96, 15, 15), 32)]


def bench(shape, groups, channels_last, dtype, with_add, repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w, b = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    add = torch.randn(shape[:2], generator=g).to(dtype) if with_add else None
    out = torch.empty_like(x)
    copy_dst = torch.empty_like(x)

    def torch_eager():
        h = x if add is None else x + add[:, :, None, None]
        return F.silu(F.group_norm(h, groups, w, b, 1e-6))

    providers = {
        "copy": lambda: copy_dst.copy_(x),
        "torch": torch_eager,
        "fused": lambda: df.ops.group_norm_silu(x, groups, w, b, 1e-6, add=add, backend="cpu", out=out),
    }
    label = f"group_norm_silu {'x'.join(map(str, shape))} {'channels_last' if channels_last else 'NCHW'} {dtype} fused"
    what = fused_row(label, providers["fused"], backend="cpu", ops=["group_norm_silu"])
    res = interleaved_medians(providers, repeats)
    res["fused"]["served"] = what
    nbytes = 2 * x.numel() * x.element_size()
    for r in res.values():
        r["gbs"] = nbytes / r["median_s"] / 1e9
    err = (
        (df.ops.group_norm_silu(x, groups, w, b, 1e-6, add=add, backend="cpu").float() - torch_eager().float())
        .abs()
        .max()
    )
    return res, err.item()


def bench_denormals(shape, groups, channels_last, repeats):
    """The fused kernel with weights of 300 against weights of 1 (bias 0), fp32, timed side by side; returns the row
    (ratio: median over rounds of the two times, 300 / 1)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    ones, large, b, out = torch.ones(C), torch.full((C,), 300.0), torch.zeros(C), torch.empty_like(x)
    providers = {
        "weights 1": lambda: df.ops.group_norm_silu(x, groups, ones, b, backend="cpu", out=out),
        "weights 300": lambda: df.ops.group_norm_silu(x, groups, large, b, backend="cpu", out=out),
    }
    layout = "channels_last" if channels_last else "NCHW"
    served = {
        name: fused_row(f"group_norm_silu {name}, {layout}", fn, backend="cpu", ops=["group_norm_silu"])
        for name, fn in providers.items()
    }
    res = interleaved_medians(providers, repeats)
    for name, what in served.items():
        res[name]["served"] = what
    row = dict(case="denormals", shape=shape, groups=groups, layout=layout, dtype=str(torch.float32))
    return dict(row, ratio=paired_ratio(res, "weights 300", "weights 1"), providers=res)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--steady-malloc", action="store_true", help="glibc reuses freed blocks (torch's fast mode)")
    args = p.parse_args()
    steady = steady_malloc() if args.steady_malloc else "MALLOC_MMAP_THRESHOLD_" in os.environ
    repeats = 3 if args.quick else 7
    info = machine()
    print(f"# {info['device']}, {info['cpu_threads']} threads, {df.backends()['cpu']}")
    print(f"# malloc: {'steady (freed blocks reused: torch in its fast mode)' if steady else 'glibc defaults'}")
    print("# GB/s = (read + write of x) / time; '% copy' against torch's copy_ of the same tensor in the same rounds\n")
    hdr = f"{'shape':>16} {'layout':>13} {'dtype':>8} {'add':>4} {'torch ms':>9} {'fused ms':>9} {'fused GB/s':>10} {'% copy':>7} {'speedup':>8} {'max err':>8}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    cases = [(s, g, cl, torch.float32, False) for s, g in SHAPES for cl in (False, True)]
    cases += [((8, 128, 32, 32), 32, cl, torch.float32, True) for cl in (False, True)]
    cases += [((8, 128, 32, 32), 32, cl, torch.bfloat16, False) for cl in (False, True)]
    for shape, groups, cl, dtype, with_add in cases:
        res, err = bench(shape, groups, cl, dtype, with_add, repeats)
        t, f, c = res["torch"], res["fused"], res["copy"]
        speed = t["median_s"] / f["median_s"]
        layout = "channels_last" if cl else "NCHW"
        print(
            f"{'x'.join(map(str, shape)):>16} {layout:>13} {str(dtype)[6:]:>8} {'yes' if with_add else 'no':>4} "
            f"{t['median_s'] * 1e3:9.3f} {f['median_s'] * 1e3:9.3f} {f['gbs']:10.1f} {100 * f['gbs'] / c['gbs']:6.0f}% "
            f"{speed:7.2f}x {err:8.1e}"
        )
        rows.append(
            dict(
                shape=shape,
                groups=groups,
                layout=layout,
                dtype=str(dtype),
                add=with_add,
                speedup=speed,
                pct_copy=100 * f["gbs"] / c["gbs"],
                max_err=err,
                providers=res,
            )
        )
    print("\ndenormals: fused, weights 300 vs weights 1")
    denormals = []
    for cl in (False, True):
        row = bench_denormals((8, 128, 32, 32), 32, cl, repeats)
        one, large = (row["providers"][k]["median_s"] * 1e3 for k in ("weights 1", "weights 300"))
        shape = "x".join(map(str, row["shape"]))
        print(
            f"{shape:>16} {row['layout']:>13}: weights 1 {one:.3f} ms, weights 300 {large:.3f} ms, {row['ratio']:.2f}x"
        )
        denormals.append(row)
    if args.json:
        command = "python benchmarks/bench_group_norm.py" + (" --steady-malloc" if steady else "")
        record = {"machine": info, "malloc_steady": steady, "rows": rows, "denormals": denormals}
        write_json(args.json, {**record, "command": command})


if __name__ == "__main__":
    main()
