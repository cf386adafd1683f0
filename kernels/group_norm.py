"""Triton GroupNorm (Wu & He 2018) + optional SiLU, with the per-(batch, channel) add folded in:

    h = x + add[b, c];  y = (h - mean_bg) / sqrt(var_bg + eps) * w_c + b_c;  out = y * sigmoid(y)

Pass 1, one program per (sample, group): fp32 statistics by Welford/Chan merges of block-wise (mean, M2), over
the group's channels (NCHW: a contiguous run; NHWC: a (pixels x channels) tile with channel stride 1). The add
only shifts a channel's mean, so it is merged into the statistics and never touches the data. Pass 2 is
elementwise: out = act(x * scale[b, c] + shift[b, c]). Both passes are autotuned per shape on a GPU (pixel tile
and warps; block and warps); under the interpreter they take the heuristic launch settings.
"""

import os

import torch
import triton
import triton.language as tl

from .grid import batch_slices


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _heuristic_only() -> bool:
    """The heuristic launch settings alone, no autotuning: under the interpreter (timing it says nothing about a
    GPU, and the tests stay fast), or with DDPM_FAST_TRITON_AUTOTUNE=0 (a run on a time budget: benchmarks/
    gpu_check.sh's --quick)."""
    return _interpreted() or os.environ.get("DDPM_FAST_TRITON_AUTOTUNE", "1").strip() == "0"


# The autotuned spaces. Both passes are memory-bound: 8..32 elements a thread in flight cover them, so the statistics
# pass tries tiles (pixels x the group's channels) of 2,048..8,192 elements at 4 and 8 warps around the heuristic
# 4,096 at 4, and the elementwise pass blocks of 1,024..4,096. Each configuration costs a compile per shape on the
# GPU (and in tests/triton_aot.py) and a timed launch when a shape is first seen.
STATS_TILES = ((2048, 4), (4096, 4), (4096, 8), (8192, 8))  # (elements, warps)
AFFINE_BLOCKS = ((1024, 4), (2048, 4), (4096, 8))


def _prune_stats(configs, named_args, **kwargs):
    """The heuristic tile (4,096 elements, 4 warps, no more pixels than the group has) first, then the other
    STATS_TILES that fit the group's pixels; the heuristic alone when ``_heuristic_only()``."""
    block_c, limit = kwargs["BLOCK_C"], triton.next_power_of_2(named_args["HW"])
    default = triton.Config({"BLOCK_P": max(1, min(limit, 4096 // block_c))}, num_warps=4)
    if _heuristic_only():
        return [default]
    others = [
        c
        for c in configs
        if (c.kwargs["BLOCK_P"] * block_c, c.num_warps) in STATS_TILES
        and c.kwargs["BLOCK_P"] <= limit
        and (c.kwargs["BLOCK_P"], c.num_warps) != (default.kwargs["BLOCK_P"], 4)
    ]
    return [default] + others


def _prune_affine(configs, named_args, **kwargs):
    """The blocks that do not overhang a sample (the smallest always); 1,024 at 4 warps alone when
    ``_heuristic_only()``."""
    n = named_args["n"]
    if _heuristic_only():
        return [triton.Config({"BLOCK": min(1024, triton.next_power_of_2(n))}, num_warps=4)]
    return [c for c in configs if c.kwargs["BLOCK"] <= max(1024, triton.next_power_of_2(n))]


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    d = mean_b - mean_a
    frac = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    return n, mean_a + d * frac, m2_a + m2_b + d * d * n_a * frac


@triton.autotune(
    configs=[triton.Config({"BLOCK_P": 2**i}, num_warps=w) for i in range(14) for w in (4, 8)],
    key=["C", "HW", "G", "NHWC", "BLOCK_C"],
    prune_configs_by={"early_config_prune": _prune_stats},
)
@triton.jit
def _group_stats_kernel(
    x_ptr,  # (B, C, HW) NCHW or (B, HW, C) NHWC memory
    add_ptr,  # (B, C) fp32 or unused
    mean_ptr,  # (B, G) fp32 out
    rstd_ptr,  # (B, G) fp32 out
    C,
    HW,
    G,
    eps,
    NHWC: tl.constexpr,
    HAS_ADD: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pixels per block
    BLOCK_C: tl.constexpr,  # channels of a group (power of two >= C // G)
):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    Cg = C // G
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < Cg
    c = g * Cg + cs
    shift = tl.load(add_ptr + b * C + c, mask=cmask & HAS_ADD, other=0.0)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    base = x_ptr + b.to(tl.int64) * C * HW
    for p0 in range(0, HW, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        pmask = ps < HW
        if NHWC:
            offs = ps[:, None] * C + c[None, :]
        else:
            offs = c[None, :] * HW + ps[:, None]
        mask = pmask[:, None] & cmask[None, :]
        h = tl.where(mask, tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) + shift[None, :], 0.0)
        cnt = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        bmean = tl.sum(tl.sum(h, axis=1), axis=0) / cnt
        d = tl.where(mask, h - bmean, 0.0)
        bm2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        n, mean, m2 = _merge(n, mean, m2, cnt, bmean, bm2)
    var = tl.maximum(m2 / n, 0.0)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(var + eps))


@triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in AFFINE_BLOCKS],
    key=["n", "C", "NHWC"],
    prune_configs_by={"early_config_prune": _prune_affine},
    restore_value=["x_ptr"],  # out may be x (in place): each timed config must start from the same x
)
@triton.jit
def _affine_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,  # (B, C) fp32
    shift_ptr,  # (B, C) fp32
    n,  # elements per sample
    C,
    HW,
    NHWC: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = offs % C if NHWC else offs // HW
    ptr = b.to(tl.int64) * n + offs
    x = tl.load(x_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(scale_ptr + b * C + c, mask=mask, other=0.0) + tl.load(shift_ptr + b * C + c, mask=mask, other=0.0)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(out_ptr + ptr, y.to(out_ptr.dtype.element_ty), mask=mask)


def group_norm_silu(x, out, groups, weight, bias, add, eps, silu, nhwc):
    """Launch on a dense x (NCHW-contiguous or channels_last) writing ``out`` of the same layout."""
    B, C = x.shape[0], x.shape[1]
    HW = x.numel() // (B * C)
    f32 = dict(device=x.device, dtype=torch.float32)
    mean = torch.empty(B, groups, **f32)
    rstd = torch.empty(B, groups, **f32)
    add32 = add.to(**f32).contiguous() if add is not None else mean
    BLOCK_C = triton.next_power_of_2(C // groups)
    _group_stats_kernel[(B * groups,)](
        x,
        add32,
        mean,
        rstd,
        C,
        HW,
        groups,
        float(eps),
        NHWC=nhwc,
        HAS_ADD=add is not None,
        BLOCK_C=BLOCK_C,
    )
    # per-(b, c) scale and shift from the group statistics (tiny: B x C)
    w = weight.to(**f32) if weight is not None else torch.ones(C, **f32)
    bb = bias.to(**f32) if bias is not None else torch.zeros(C, **f32)
    mean_c = mean.repeat_interleave(C // groups, dim=1)
    scale = rstd.repeat_interleave(C // groups, dim=1) * w
    shift = -mean_c * scale + bb
    if add is not None:
        shift = shift + add32 * scale
    n = x.numel() // B
    scale, shift = scale.contiguous(), shift.contiguous()
    for b0, b1 in batch_slices(B):
        _affine_kernel[lambda meta, nb=b1 - b0: (triton.cdiv(n, meta["BLOCK"]), nb)](
            x[b0:b1], out[b0:b1], scale[b0:b1], shift[b0:b1], n, C, HW, NHWC=nhwc, SILU=silu
        )
    return out
