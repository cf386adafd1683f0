"""Triton fused DDPM reverse step (Ho et al. 2020, Algorithm 2; eq. 7 and 15), one pass over memory:

    x_0     = (px * x_t + pm * m) * q,  clamped to [-r, r] when clipping
    x_{t-1} = c0 * x_0 + c1 * x_t + cm * m + sigma * z   (= kx * x_t + km * m + sigma * z without clipping)

Per-sample coefficients come from a (B, 9) fp32 table computed on the host in float64 (the same numbers the
CPU kernels use); z is given or drawn in the kernel from the keyed Philox stream 0.
"""

import torch
import triton
import triton.language as tl

from .grid import batch_slices
from .philox import KEY_ARGS, block_size, keyed_normal_of, split_seed

NOISE_NONE, NOISE_GIVEN, NOISE_KEYED = 0, 1, 2


def coefficient_table(step_coeffs: torch.Tensor) -> torch.Tensor:
    """(B, 7) [px, pm, q, c0, c1, cm, sigma] -> the kernel's (B, 9) fp32 [px, pm, q, c0, c1, cm, kx, km, sigma],
    with the no-clip path's kx = c0 q px + c1 and km = c0 q pm + cm folded in float64."""
    c = step_coeffs.to(torch.float64)
    px, pm, q, c0, c1, cm, sigma = c.unbind(1)
    return torch.stack([px, pm, q, c0, c1, cm, c0 * q * px + c1, c0 * q * pm + cm, sigma], dim=1).to(torch.float32)


@triton.jit(do_not_specialize=KEY_ARGS)
def _ddpm_step_kernel(
    x_ptr,  # (B, n) x_t, any float dtype
    m_ptr,  # (B, n) model output
    z_ptr,  # (B, n) given noise (NOISE_GIVEN)
    out_ptr,  # (B, n) x_{t-1}
    x0_ptr,  # (B, n) predicted x_0 (WRITE_X0)
    coef_ptr,  # (B, 9) fp32: px, pm, q, c0, c1, cm, kx, km, sigma
    t_ptr,  # (B,) int64 timesteps (keyed noise)
    n,
    C,
    HW,
    k0,
    k1,
    sample_offset,
    clip_range,
    NHWC: tl.constexpr,
    NOISE: tl.constexpr,
    CLIP: tl.constexpr,
    WRITE_X0: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    ptr = b.to(tl.int64) * n + offs
    cb = coef_ptr + b * 9
    x = tl.load(x_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    x0 = (tl.load(cb + 0) * x + tl.load(cb + 1) * m) * tl.load(cb + 2)
    if CLIP:
        x0 = tl.minimum(
            tl.maximum(x0, -clip_range, propagate_nan=tl.PropagateNan.ALL),
            clip_range,
            propagate_nan=tl.PropagateNan.ALL,
        )
        o = tl.load(cb + 3) * x0 + tl.load(cb + 4) * x + tl.load(cb + 5) * m
    else:
        o = tl.load(cb + 6) * x + tl.load(cb + 7) * m
    if NOISE == 1:
        o += tl.load(cb + 8) * tl.load(z_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    if NOISE == 2:
        z = keyed_normal_of(offs, start, sample_offset + b, tl.load(t_ptr + b), 0, k0, k1, C, HW, NHWC, BLOCK)
        o += tl.load(cb + 8) * z
    tl.store(out_ptr + ptr, o.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + ptr, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def ddpm_step(x, m, noise, out, x0_out, coeffs, t, seed, sample_offset, clip, clip_range, nhwc, *, noise_mode):
    """Launch on dense tensors sharing one layout; coeffs: (B, 9) fp32 on x's device; t: (B,) int64 on x's device.

    ``noise_mode``: NOISE_GIVEN (``noise``), NOISE_KEYED (rows with sigma = 0 add 0 * z) or NOISE_NONE; the caller
    decides, so the launch reads nothing back from the device (eager GPU sampling, CUDA graphs).
    """
    B = x.shape[0]
    n = x.numel() // B
    C = x.shape[1] if x.dim() > 1 else 1
    HW = n // C
    if (noise_mode == NOISE_GIVEN) != (noise is not None):
        raise ValueError(f"noise_mode: {noise_mode} does not match noise={'a tensor' if noise is not None else None}")
    k0, k1 = split_seed(seed)
    BLOCK = block_size(n)
    for b0, b1 in batch_slices(B):
        xs, ms, os_ = x[b0:b1], m[b0:b1], out[b0:b1]
        _ddpm_step_kernel[(triton.cdiv(n, BLOCK), b1 - b0)](
            xs,
            ms,
            noise[b0:b1] if noise is not None else xs,
            os_,
            x0_out[b0:b1] if x0_out is not None else os_,
            coeffs[b0:b1],
            t[b0:b1],
            n,
            C,
            HW,
            k0,
            k1,
            sample_offset + b0,
            float(clip_range),
            NHWC=nhwc,
            NOISE=noise_mode,
            CLIP=clip,
            WRITE_X0=x0_out is not None,
            BLOCK=BLOCK,
        )
    return out
