"""One DDPM training step (Algorithm 1: t ~ Uniform, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, L_simple =
mse(eps_theta(x_t, t), eps), backward, Adam step) on the CPU: ddpm_fast vs diffusers' UNet2DModel with the same
weights, eager and under torch.compile.

    python benchmarks/bench_train.py [--model cifar10|small] [--batch 8] [--rounds 7] [--no-compile] [--json PATH]

Rows, each timed in interleaved rounds in this process (medians, quartiles; speed over diffusers eager paired by
round; and the ratio of each row's fastest round, which bursts of another process's load on a shared machine,
shorter than a round, leave alone):
  ddpm_fast cpu            ddpm_fast.UNet.from_diffusers(the same weights), GaussianDiffusion(model, schedule).loss
  ddpm_fast reference      the same on the plain-PyTorch reference (model.set_backend("torch"), backend="torch")
  diffusers eager          UNet2DModel and the same loss written plainly in PyTorch
  diffusers torch.compile  the same UNet2DModel under torch.compile (steady state; its first step, compilation
                           included, is reported beside it)
Every row: model.train(), Adam (lr 2e-4), zero_grad(set_to_none=True), fp32, 32x32, the same random x0 each step,
fresh t and eps each step. The optimizer step is eager in every row.

Kernels: a training step runs under autograd, where every op has cpu kernels forward and backward: q_sample,
GroupNorm+SiLU, attention (forward with its log-sum-exp, flash-style backward), the convolutions (Winograd or oneDNN
forward; the 3x3 layers' data gradient on the Winograd kernel, their weight and bias gradients in ATen's
convolution_backward, the 1x1 shortcuts' gradients as GEMMs) and the linear layers (oneDNN forward and data
gradient, the weight gradient in the BLAS). Parts of the backward run in ATen and the BLAS, so the record holds
``served`` (ops.trace() of one step: every op, backend and kernel) and the ops each side served. The run ends in one
line if one of those ops did not run on the cpu kernels in that row.

Gradient agreement: from identical weights and the same x0, t and eps, one loss.backward() of the ddpm_fast row and
of the reference row; per parameter max|g - g_ref| / max|g_ref|, the largest over the parameters is reported.
Parameters whose reference gradient is at rounding level (attention's key bias: zero in exact arithmetic) are left
out of that figure and recorded apart with their absolute differences. The diffusers eager row's loss on the same
x_t is recorded beside the two losses.

Peak memory: each row runs in a child process of its own (this script with --memory-child): build the model and
optimizer, one training step (Adam's state, torch.compile's compilation), then the kernel's resident-set high-water
mark (VmHWM) is reset (/proc/self/clear_refs) and --memory-steps more steps run. Reported: the process's peak
resident set over those steps (weights, gradients, Adam's state, activations, allocator caches, the interpreter and
its libraries), and that peak above the resident set right after the imports (the same imports in every child).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_fused, interleaved_medians, machine, paired_ratio, write_json  # noqa: E402
from sample_speed import MODELS  # noqa: E402

import ddpm_fast as df  # noqa: E402
from ddpm_fast import ops  # noqa: E402
from ddpm_fast.models.loading import DIFFUSERS_CIFAR10_CONFIG  # noqa: E402

OURS = "ddpm_fast cpu"
REF = "ddpm_fast reference"
EAGER = "diffusers eager"
COMPILED = "diffusers torch.compile"
PROVIDERS = [OURS, REF, EAGER, COMPILED]
# the ops of a training step, each on ddpm_fast's cpu kernels under autograd: the ddpm_fast row must show them so
FUSED_IN_TRAINING = [
    "q_sample",
    "group_norm_silu",
    "group_norm_silu_backward",
    "attention",
    "attention_backward",
    "conv2d",
    "conv2d_backward",
    "linear",
    "linear_backward",
]
LR = 2e-4
SIZE = 32


def config(model: str) -> dict:
    """diffusers UNet2DModel configuration of --model (sample_speed.py's models)."""
    return {**DIFFUSERS_CIFAR10_CONFIG, **MODELS[model]}


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


class Step:
    """One training step of one provider: zero_grad, loss, backward, Adam."""

    def __init__(self, model, loss):
        self.model = model.train()
        self.loss = loss  # loss(x0) -> scalar
        self.opt = torch.optim.Adam(model.parameters(), lr=LR)
        self.last = None

    def __call__(self, x0):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x0)
        loss.backward()
        self.opt.step()
        self.last = loss.detach()
        return self.last


def diffusers_loss(unet, schedule: df.NoiseSchedule):
    """L_simple written plainly in PyTorch around a UNet2DModel (what a diffusers training script does)."""
    a_table = schedule.sqrt_alphas_cumprod.float()
    b_table = schedule.sqrt_one_minus_alphas_cumprod.float()

    def loss(x0, t=None, eps=None):
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, len(schedule), (B,))
        if eps is None:
            eps = torch.randn_like(x0)
        a, b = a_table[t].view(B, 1, 1, 1), b_table[t].view(B, 1, 1, 1)
        x_t = a * x0 + b * eps
        return F.mse_loss(unet(x_t, t).sample, eps)

    return loss


def build(name: str, cfg: dict, schedule: df.NoiseSchedule, ref=None) -> Step:
    """The training step of provider ``name``, its model holding the weights of ``ref`` (a UNet2DModel; seed 0's
    random initialisation when None)."""
    from diffusers import UNet2DModel

    if ref is None:
        torch.manual_seed(0)
        ref = UNet2DModel(**cfg)
    if name in (OURS, REF):
        backend = "torch" if name == REF else None
        model = df.UNet.from_diffusers(ref)
        if backend is not None:
            model.set_backend(backend)
        diffusion = df.GaussianDiffusion(model, schedule, backend=backend)
        return Step(model, diffusion.loss)
    unet = UNet2DModel(**cfg)
    unet.load_state_dict(ref.state_dict())
    if name == COMPILED:
        unet = torch.compile(unet)
    return Step(unet, diffusers_loss(unet, schedule))


def grad_diff(model, model_ref, negligible: float = 1e-6) -> dict:
    """How far ``model``'s parameter gradients are from ``model_ref``'s (same parameter names).

    Per parameter: max|g - g_ref| / max|g_ref|; the largest over the parameters is ``max_rel``. A parameter whose
    reference gradient is below ``negligible`` times the model's largest gradient element is left out of it and
    listed with its absolute figures instead: attention's key bias has a gradient of exactly zero in exact
    arithmetic (softmax does not change when every key score of a query moves by the same q.b), so both sides hold
    rounding noise there and their ratio means nothing.
    """
    ref_params = dict(model_ref.named_parameters())
    pairs = [(name, p.grad, ref_params[name].grad) for name, p in model.named_parameters()]
    missing = [name for name, g, g_ref in pairs if (g is None) != (g_ref is None)]
    if missing:
        raise SystemExit(f"bench_train: a gradient is missing on one side only: {', '.join(missing)}")
    pairs = [(name, g, g_ref) for name, g, g_ref in pairs if g is not None]
    largest = max(g_ref.abs().max().item() for _, _, g_ref in pairs)
    worst, where, small = 0.0, "", {}
    for name, g, g_ref in pairs:
        scale, diff = g_ref.abs().max().item(), (g - g_ref).abs().max().item()
        if scale <= negligible * largest:
            small[name] = {"max_abs_grad_ref": scale, "max_abs_diff": diff}
        elif diff / scale > worst:
            worst, where = diff / scale, name
    return {
        "max_rel": worst,
        "worst_parameter": where,
        "max_abs_diff_over_largest_grad": max((g - g_ref).abs().max().item() for _, g, g_ref in pairs) / largest,
        "largest_grad": largest,
        "negligible_left_out": small,
        "definition": (
            "per parameter max|g - g_ref| / max|g_ref|, the largest over the parameters whose max|g_ref| exceeds "
            f"{negligible:g} x the largest gradient element (one backward each, same weights, x0, t, eps)"
        ),
    }


def agreement(steps: dict, schedule: df.NoiseSchedule, x0: torch.Tensor) -> dict:
    """One forward + backward of the ddpm_fast row and the reference row from their (identical) starting weights,
    with the same x0, t and eps; the diffusers eager row's loss on the same x_t. Gradients are cleared after."""
    B = x0.shape[0]
    t = torch.randint(0, len(schedule), (B,), generator=torch.Generator().manual_seed(1))
    seed = 1234
    losses = {}
    for name in (OURS, REF):
        steps[name].opt.zero_grad(set_to_none=True)
        diffusion = df.GaussianDiffusion(steps[name].model, schedule, backend="torch" if name == REF else None)
        loss = diffusion.loss(x0, t, seed=seed)
        loss.backward()
        losses[name] = loss.item()
    diff = grad_diff(steps[OURS].model, steps[REF].model)
    for name in (OURS, REF):
        steps[name].opt.zero_grad(set_to_none=True)
    _, eps = ops.q_sample(x0, t, None, schedule, seed=seed, backend="torch")  # the eps both rows drew
    unet = steps[EAGER].model
    with torch.no_grad():
        losses[EAGER] = diffusers_loss(unet, schedule)(x0, t, eps).item()
    return {"grad_vs_reference": diff, "loss": losses}


def provenance(step: Step, x0) -> dict:
    """What served one training step: ops.trace() summary, and the ops each side served."""
    with ops.trace() as calls:
        step(x0)
    fused = sorted({c.op for c in calls if c.fused})
    reference = sorted({c.op for c in calls if not c.fused})
    return {
        "served": calls.summary(),
        "fused_ops": fused,
        "reference_ops": reference,
        "all_fused": bool(calls) and not reference,
        "trace": calls,
    }


# ------------------------------------------------------------------------------------------- memory (child process)
def _status(key: str) -> int:
    """/proc/self/status's ``key`` (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def memory_child(args) -> None:
    """Runs in a fresh process: one provider's steady training peak, printed as one JSON line."""
    import diffusers  # noqa: F401  (every child imports the same libraries before the base is read)

    base = _status("VmRSS")
    schedule = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
    step = build(args.memory_child, config(args.model), schedule)
    torch.manual_seed(1)
    x0 = torch.rand(args.batch, 3, SIZE, SIZE) * 2 - 1
    t0 = time.perf_counter()
    step(x0)  # Adam's state; compilation
    first = time.perf_counter() - t0
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    start = _status("VmRSS")
    for _ in range(args.memory_steps):
        step(x0)
    peak = _status("VmHWM")
    print(
        json.dumps(
            {
                "peak_rss_mb": peak / 2**20,
                "base_rss_mb": base / 2**20,
                "peak_above_imports_mb": (peak - base) / 2**20,
                "rss_before_steps_mb": start / 2**20,
                "step_peak_above_before_mb": (peak - start) / 2**20,
                "steps": args.memory_steps,
                "first_step_s": first,
            }
        )
    )


def measure_memory(name: str, args) -> dict:
    """Peak memory of ``name``'s training steps, from a child process of its own."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        name,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--memory-steps",
        str(args.memory_steps),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory child exited {p.returncode}: {tail}"}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="cifar10")
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--rounds", type=_positive, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes minutes on 2 cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--memory-steps", type=_positive, default=3, help="steady steps each memory child runs")
    p.add_argument("--json")
    p.add_argument("--memory-child", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)
    if not os.path.exists("/proc/self/clear_refs") and not args.no_memory:
        p.error("peak memory needs Linux's /proc/self/clear_refs; run with --no-memory")
    if not df.backends()["cpu"].startswith("available"):
        raise SystemExit(f"bench_train: the {OURS} row needs the cpu backend: {df.backends()['cpu']}")
    from diffusers import UNet2DModel

    info = machine()
    cfg = config(args.model)
    schedule = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
    torch.manual_seed(0)
    ref = UNet2DModel(**cfg)
    names = [OURS, REF, EAGER] + ([] if args.no_compile else [COMPILED])
    steps = {name: build(name, cfg, schedule, ref) for name in names}
    n_params = sum(p.numel() for p in ref.parameters())
    del ref
    torch.manual_seed(1)
    x0 = torch.rand(args.batch, 3, SIZE, SIZE) * 2 - 1
    print(
        f"# {info['device']}, {info['cpu_threads']} threads, {df.backends()['cpu']}; {args.model} U-Net "
        f"({n_params / 1e6:.1f}M parameters), batch {args.batch}, fp32, {SIZE}x{SIZE}; Adam lr {LR}",
        flush=True,
    )

    agree = agreement(steps, schedule, x0)
    g = agree["grad_vs_reference"]
    print(
        f"# gradients, {OURS} vs reference (same weights, x0, t, eps): max rel diff per parameter {g['max_rel']:.1e} "
        f"({g['worst_parameter']}); max abs diff / largest gradient {g['max_abs_diff_over_largest_grad']:.1e}; "
        f"{len(g['negligible_left_out'])} parameters with gradients below 1e-6 of the largest left out of the "
        f"relative figure ({', '.join(sorted(g['negligible_left_out']))})",
        flush=True,
    )
    print("# loss on the same x_t: " + ", ".join(f"{k} {v:.6f}" for k, v in agree["loss"].items()), flush=True)

    first = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step(x0)  # Adam's state; for torch.compile, the compilation
        first[name] = time.perf_counter() - t0
        if name == COMPILED:
            print(f"# {COMPILED}: first step (compilation) {first[name]:.1f}s", flush=True)
    prov = {name: provenance(steps[name], x0) for name in (OURS, REF)}
    trace = prov[OURS].pop("trace")
    prov[REF].pop("trace")
    # the row's label says cpu: the ops that have cpu kernels under autograd must have run on them
    check_fused(OURS, ops.Trace(c for c in trace if c.op in FUSED_IN_TRAINING), "cpu", FUSED_IN_TRAINING)
    if prov[REF]["fused_ops"]:
        raise SystemExit(f"bench_train: the {REF} row ran fused kernels: {prov[REF]['served']}")

    res = interleaved_medians({name: (lambda s=s: s(x0)) for name, s in steps.items()}, args.rounds, min_time=0.5)
    memory = {} if args.no_memory else {name: measure_memory(name, args) for name in names}

    print(
        f"\n{'provider':24} {'ms/step':>9} {'q1-q3 ms':>16} {'fastest ms':>11} {'vs diffusers eager':>19} "
        f"{'(fastest)':>10} {'first step s':>13} {'peak RSS MB':>12} {'above imports MB':>17}"
    )
    rows = []
    for name, r in res.items():
        speed = paired_ratio(res, EAGER, name)  # t(eager) / t(name), paired by round
        fastest = res[EAGER]["min_s"] / r["min_s"]  # where another process's load comes in bursts shorter than a round
        m = memory.get(name, {})
        peak = f"{m['peak_rss_mb']:.0f}" if "peak_rss_mb" in m else ("error" if m else "")
        above = f"{m['peak_above_imports_mb']:.0f}" if "peak_rss_mb" in m else ""
        print(
            f"{name:24} {r['median_s'] * 1e3:9.1f} {r['q1_s'] * 1e3:7.1f}-{r['q3_s'] * 1e3:<8.1f} {r['min_s'] * 1e3:11.1f} "
            f"{speed:18.2f}x {fastest:9.2f}x {first[name]:13.2f} {peak:>12} {above:>17}"
        )
        rows.append(
            dict(
                provider=name,
                ms_per_step=r["median_s"] * 1e3,
                speedup_vs_diffusers_eager=speed,
                speedup_vs_diffusers_eager_fastest=fastest,
                first_step_s=first[name],
                memory=m or None,
                **prov.get(name, {}),
                **r,
            )
        )
    for name, m in memory.items():
        if "error" in m:
            print(f"# {name} peak memory: {m['error']}")
    print(f"# {OURS} served: {prov[OURS]['served']}")
    print(
        f"#   on ddpm_fast's cpu kernels: {', '.join(prov[OURS]['fused_ops'])}; on the reference: "
        f"{', '.join(prov[OURS]['reference_ops'])}"
    )
    print(f"# {REF} served: {prov[REF]['served']}")
    print(
        "# vs diffusers eager: t(eager) / t(row), median over rounds of the pair; (fastest): the same of each row's "
        "fastest round, the figure to read where bursts of other load hit single rounds (the quartiles show it); "
        "first step: Adam's state, and "
        "compilation for torch.compile; peak RSS: a child process per row, peak over "
        f"{args.memory_steps} steady steps (VmHWM), and that above the child's resident set after its imports"
    )
    record = {
        "machine": info,
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "parameters": n_params,
        "batch": args.batch,
        "dtype": "float32",
        "image_size": SIZE,
        "optimizer": f"Adam lr {LR}, zero_grad(set_to_none=True)",
        "gradient_agreement": agree,
        "memory_method": (
            "child process per row: model + optimizer + one step, VmHWM reset via /proc/self/clear_refs, then "
            "memory_steps steps; peak_rss_mb = VmHWM (whole process), peak_above_imports_mb = VmHWM - VmRSS after "
            "importing torch, diffusers and ddpm_fast"
        ),
        "rows": rows,
    }
    if args.json:
        write_json(args.json, record)


if __name__ == "__main__":
    main()
