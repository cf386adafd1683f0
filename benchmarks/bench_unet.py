"""The DDPM CIFAR-10 U-Net forward on the CPU: ddpm_fast vs diffusers' UNet2DModel with the same weights, eager
and under torch.compile (steady state, and the time to the first output including compilation), and vs the CPU
runtimes a user would otherwise deploy it with: OpenVINO (f32 hint, and the device's default precision) and ONNX
Runtime (benchmarks/peers.py), each converted from the same UNet2DModel and run with torch's thread count.

    python benchmarks/bench_unet.py [--batch 8] [--rounds 7] [--no-compile] [--no-peers] [--json PATH]
    python benchmarks/bench_unet.py --batches 1,2,8,32 [--no-compile] [--threads N] [--busy N] [--json PATH]

Every row's max error is against diffusers' fp32 forward. A peer that cannot be built (not installed, conversion
failed) is a row saying why. With --batches, each batch size is timed in its own interleaved rounds and the table
gives ms per image and ddpm_fast's speed over each other provider (t(provider) / t(ddpm_fast), paired by round).
--threads 1 compares the kernels alone, without the scheduling of threads; --busy N times every provider while N
other processes spin (a shared machine: run it with OMP_WAIT_POLICY=PASSIVE too, ddpm_fast/_threads.py says why);
the record's machine.omp_wait_policy says which OpenMP wait policy ran.

Targets: fp32 at least 1.5x OpenVINO f32 at every batch (max error <= 1e-4 against diffusers fp32); the bf16 model
at least 1.25x OpenVINO's default precision at batch 1 and 8, with no larger error than OpenVINO's; with one other
process busy (--busy 1), fp32 at least 1.2x OpenVINO f32 at batch 8. The README's results say which hold where.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import torch

import ddpm_fast as df
from ddpm_fast.models.loading import DIFFUSERS_CIFAR10_CONFIG

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fused_row, interleaved_medians, machine, paired_ratio, served, write_json  # noqa: E402
from peers import PEER_NAMES, build_peers  # noqa: E402

CIFAR10 = DIFFUSERS_CIFAR10_CONFIG
UNET_OPS = ["conv2d", "linear", "group_norm_silu", "attention"]
OURS = "ddpm_fast cpu"
OURS16 = "ddpm_fast cpu bf16"  # the same model cast to bf16 (fp32 accumulation, statistics and softmax)


def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"--batches: expected a comma list of positive batch sizes, got {text!r}")
    return batches


@contextlib.contextmanager
def busy_processes(n: int):
    """n processes spinning on the CPU for the duration (other work on a shared machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def providers_at(batch: int, ref, ours, pack_s: float, ours_ref, compiled, peers: bool, cache: dict, ours16=None):
    """The timed callables at one batch size, with each one's error against diffusers' fp32 forward, the time to its
    first output (compilation or conversion included, where there is one), what served it, and the peers that
    could not be built ({name: why})."""
    torch.manual_seed(batch)
    x = torch.randn(batch, 3, 32, 32)
    t = torch.full((batch,), 500)
    providers, first, provenance, err, missing, notes = {}, {}, {}, {}, {}, {}
    with torch.inference_mode():
        expected = ref(x, t).sample
        providers["diffusers eager"] = lambda: ref(x, t).sample

        t0 = time.perf_counter()
        out = ours(x, t)
        first[OURS] = pack_s + time.perf_counter() - t0  # weight packing, then the first forward
        providers[OURS] = lambda: ours(x, t)
        provenance[OURS] = fused_row(OURS, providers[OURS], "cpu", UNET_OPS)
        err[OURS] = (out - expected).abs().max().item()

        if ours16 is not None:
            xb = x.bfloat16()
            t0 = time.perf_counter()
            out = ours16(xb, t)
            first[OURS16] = time.perf_counter() - t0  # packing happens at the first forward
            providers[OURS16] = lambda: ours16(xb, t)
            provenance[OURS16] = fused_row(OURS16, providers[OURS16], "cpu", UNET_OPS)
            err[OURS16] = (out.float() - expected).abs().max().item()

        if ours_ref is not None:
            providers["ddpm_fast reference"] = lambda: ours_ref(x, t)
            provenance["ddpm_fast reference"] = served(providers["ddpm_fast reference"])
            err["ddpm_fast reference"] = (ours_ref(x, t) - expected).abs().max().item()

        if compiled is not None:
            t0 = time.perf_counter()
            out = compiled(x, t).sample
            first["diffusers torch.compile"] = time.perf_counter() - t0
            providers["diffusers torch.compile"] = lambda: compiled(x, t).sample
            err["diffusers torch.compile"] = (out - expected).abs().max().item()

    if peers:
        for name, peer in build_peers(ref, x, t, cache=cache).items():
            if not peer.ok:
                missing[name] = peer.why
                print(f"# {name}: {peer.label()}", flush=True)
                continue
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = peer(x, t)
                first[name] = peer.info["convert_s"] + peer.info["compile_s"] + time.perf_counter() - t0
            providers[name] = lambda peer=peer: peer(x, t)
            err[name] = (out - expected).abs().max().item()
            notes[name] = peer.info
            print(
                f"# {name} ({peer.label()}): converted in {peer.info['convert_s']:.1f}s, compiled/loaded in "
                f"{peer.info['compile_s']:.1f}s",
                flush=True,
            )
    return providers, first, provenance, err, missing, notes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=_batches, help="comma list of batch sizes: ms per image for each (a sweep)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes minutes on 2 cores)")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip the OpenVINO and ONNX Runtime rows")
    p.add_argument(
        "--threads",
        type=int,
        help="threads for every provider (default: torch's); 1 compares kernels without "
        "the scheduling of threads on a shared machine",
    )
    p.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="N other processes spin on the CPU while the providers are timed (a machine shared with other work)",
    )
    p.add_argument("--json")
    args = p.parse_args()
    if args.busy < 0:
        p.error(f"--busy: expected a number of processes >= 0, got {args.busy}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads: expected a positive number, got {args.threads}")
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DModel

    info = machine()
    torch.manual_seed(0)
    ref = UNet2DModel(**CIFAR10).eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        ours = df.UNet.from_diffusers(ref).eval()
        pack_s = time.perf_counter() - t0
    ours16 = None
    if df.backends()["cpu"].startswith("available"):
        ours16 = df.UNet.from_diffusers(ref).eval().to(torch.bfloat16)
    compiled = None
    if not args.no_compile:
        twin = UNet2DModel(**CIFAR10).eval()
        twin.load_state_dict(ref.state_dict())
        compiled = torch.compile(twin)
    cache = {}  # the peers' conversions, shared by every batch size
    threads = torch.get_num_threads()
    print(
        f"# {info['device']}, {info['cpu_threads']} threads (OpenMP waits: {info['omp_wait_policy']}), "
        f"{df.backends()['cpu']}; fp32, and bf16 ({OURS16}); {args.busy} busy processes beside"
    )
    if args.peers:
        print(f"# peers: {', '.join(PEER_NAMES)}, each with torch's {threads} threads")
    record = {"machine": info, "command": "python " + " ".join(sys.argv), "peer_threads": threads, "busy": args.busy}

    with busy_processes(args.busy):
        if args.batches:
            record["sweep"] = sweep(args, ref, ours, pack_s, compiled, cache, ours16)
        else:
            record.update(single(args, ref, ours, pack_s, compiled, cache, ours16))
    if args.json:
        write_json(args.json, record)


def single(args, ref, ours, pack_s, compiled, cache, ours16=None) -> dict:
    """The default run: every provider at one batch size."""
    ours_ref = df.UNet.from_diffusers(ref).eval().set_backend("torch")
    providers, first, provenance, err, missing, notes = providers_at(
        args.batch, ref, ours, pack_s, ours_ref, compiled, args.peers, cache, ours16
    )
    print(f"# batch {args.batch}; ddpm_fast cpu vs diffusers eager, same weights: max abs err {err[OURS]:.2e}")
    with torch.inference_mode():
        res = interleaved_medians(providers, args.rounds, min_time=0.5)
    base = res["diffusers eager"]["median_s"]
    print(
        f"\n{'provider':26} {'ms (median)':>12} {'q1-q3 ms':>16} {'vs diffusers eager':>19} {'first output s':>15} "
        f"{'max err':>9}"
    )
    rows = []
    for name, r in res.items():
        speed = base / r["median_s"]
        f = first.get(name)
        e = err.get(name)
        print(
            f"{name:26} {r['median_s'] * 1e3:12.1f} {r['q1_s'] * 1e3:7.1f}-{r['q3_s'] * 1e3:<8.1f} {speed:18.2f}x "
            f"{'' if f is None else f'{f:14.1f}':>15} {'' if e is None else f'{e:.1e}':>9}"
        )
        rows.append(
            dict(
                provider=name,
                speedup_vs_diffusers_eager=speed,
                first_output_s=f,
                max_err_vs_diffusers=e,
                served=provenance.get(name),
                peer=notes.get(name),
                **r,
            )
        )
    for name, why in missing.items():
        print(f"{name:26} unavailable: {why}")
        rows.append(dict(provider=name, why=why))
    print(
        "# max err: against diffusers eager fp32; first output s: compile (torch.compile), conversion + compile "
        "(peers; one conversion serves both OpenVINO rows, counted in the first) or weight packing (ddpm_fast), "
        "then one forward"
    )
    return {"batch": args.batch, "max_err_vs_diffusers": err[OURS], "rows": rows}


def sweep(args, ref, ours, pack_s, compiled, cache, ours16=None) -> list[dict]:
    """ms per image at each batch size, and ddpm_fast's speed over every other provider, paired by round."""
    out = []
    for batch in args.batches:
        providers, first, provenance, err, missing, notes = providers_at(
            batch, ref, ours, pack_s, None, compiled, args.peers, cache, ours16
        )
        with torch.inference_mode():
            res = interleaved_medians(providers, args.rounds, min_time=0.5)
        rows = []
        for name, r in res.items():
            ratio = None if name == OURS else paired_ratio(res, name, OURS)
            ratio16 = None if name == OURS16 or OURS16 not in res else paired_ratio(res, name, OURS16)
            rows.append(
                dict(
                    provider=name,
                    ms_per_image=r["median_s"] * 1e3 / batch,
                    ddpm_fast_speedup=ratio,
                    ddpm_fast_bf16_speedup=ratio16,
                    first_output_s=first.get(name),
                    max_err_vs_diffusers=err.get(name),
                    served=provenance.get(name),
                    peer=notes.get(name),
                    **r,
                )
            )
        rows += [dict(provider=name, why=why) for name, why in missing.items()]
        out.append({"batch": batch, "rows": rows})
        print(f"# batch {batch} done", flush=True)

    names = []
    for b in out:
        names += [r["provider"] for r in b["rows"] if r["provider"] not in names]
    print(
        f"\nms per image (median of {args.rounds} rounds); in brackets: ddpm_fast's speed over it, t(it) / t(ddpm_fast)"
    )
    print(f"{'provider':26}" + "".join(f"{'batch ' + str(b['batch']):>22}" for b in out))
    for name in names:
        cells = []
        for b in out:
            r = next((r for r in b["rows"] if r["provider"] == name), None)
            if r is None:
                cells.append("")
            elif "why" in r:
                cells.append("unavailable")
            elif r["ddpm_fast_speedup"] is None:
                cells.append(f"{r['ms_per_image']:.2f}")
            else:
                cells.append(f"{r['ms_per_image']:.2f} ({r['ddpm_fast_speedup']:.2f}x)")
        print(f"{name:26}" + "".join(f"{c:>22}" for c in cells))
    if any(r["provider"] == OURS16 for b in out for r in b["rows"]):
        print(f"\n{OURS16}'s speed over each provider, t(it) / t({OURS16}), paired by round; max err vs diffusers fp32")
        print(f"{'provider':26}" + "".join(f"{'batch ' + str(b['batch']):>22}" for b in out))
        for name in names:
            cells = []
            for b in out:
                r = next((r for r in b["rows"] if r["provider"] == name), None)
                if r is None or "why" in r:
                    cells.append("")
                    continue
                e = r["max_err_vs_diffusers"]
                ratio = "" if r["ddpm_fast_bf16_speedup"] is None else f"{r['ddpm_fast_bf16_speedup']:.2f}x "
                cells.append(ratio + ("" if e is None else f"err {e:.1e}"))
            print(f"{name:26}" + "".join(f"{c:>22}" for c in cells))
    whys = {r["provider"]: r["why"] for b in out for r in b["rows"] if "why" in r}
    for name, why in whys.items():
        print(f"# {name} unavailable: {why}")
    return out


if __name__ == "__main__":
    main()
