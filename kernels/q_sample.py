"""Triton fused forward noising q(x_t | x_0) (Ho et al. 2020, eq. 4) and keyed noise written to memory:

    x_t = a_b * x_0 + s_b * eps      with a_b = sqrt(abar_{t_b}), s_b = sqrt(1 - abar_{t_b}) per sample

eps is given, or drawn in the kernel from the keyed Philox stream 1 (and written out, as training needs it).
"""

import triton
import triton.language as tl

from .grid import batch_slices
from .philox import KEY_ARGS, block_size, keyed_normal_of, split_seed


@triton.jit(do_not_specialize=KEY_ARGS)
def _q_sample_kernel(
    x0_ptr,  # (B, n)
    eps_ptr,  # (B, n) read, or written when GENERATE
    out_ptr,  # (B, n)
    coef_ptr,  # (B, 2) fp32: a, s
    t_ptr,  # (B,) int64
    n,
    C,
    HW,
    k0,
    k1,
    sample_offset,
    NHWC: tl.constexpr,
    GENERATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    ptr = b.to(tl.int64) * n + offs
    x0 = tl.load(x0_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    if GENERATE:
        eps = keyed_normal_of(offs, start, sample_offset + b, tl.load(t_ptr + b), 1, k0, k1, C, HW, NHWC, BLOCK)
        eps = eps.to(eps_ptr.dtype.element_ty)
        tl.store(eps_ptr + ptr, eps, mask=mask)
        eps = eps.to(tl.float32)  # x_t from eps as stored, so the two agree in low precision
    else:
        eps = tl.load(eps_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(coef_ptr + b * 2) * x0 + tl.load(coef_ptr + b * 2 + 1) * eps
    tl.store(out_ptr + ptr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=KEY_ARGS)
def _keyed_normal_kernel(
    out_ptr, t_ptr, n, C, HW, k0, k1, sample_offset, stream, NHWC: tl.constexpr, BLOCK: tl.constexpr
):
    b = tl.program_id(1)
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    z = keyed_normal_of(offs, start, sample_offset + b, tl.load(t_ptr + b), stream, k0, k1, C, HW, NHWC, BLOCK)
    tl.store(out_ptr + b.to(tl.int64) * n + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


def _geometry(x):
    B = x.shape[0]
    n = x.numel() // B
    C = x.shape[1] if x.dim() > 1 else 1
    return B, n, C, n // C


def q_sample(x0, eps, out, coeffs, t, generate, seed, sample_offset, nhwc):
    B, n, C, HW = _geometry(x0)
    k0, k1 = split_seed(seed)
    BLOCK = block_size(n)
    for b0, b1 in batch_slices(B):
        _q_sample_kernel[(triton.cdiv(n, BLOCK), b1 - b0)](
            x0[b0:b1],
            eps[b0:b1],
            out[b0:b1],
            coeffs[b0:b1],
            t[b0:b1],
            n,
            C,
            HW,
            k0,
            k1,
            sample_offset + b0,
            NHWC=nhwc,
            GENERATE=generate,
            BLOCK=BLOCK,
        )
    return out


def keyed_normal(out, t, seed, sample_offset, stream, nhwc):
    B, n, C, HW = _geometry(out)
    k0, k1 = split_seed(seed)
    BLOCK = block_size(n)
    for b0, b1 in batch_slices(B):
        _keyed_normal_kernel[(triton.cdiv(n, BLOCK), b1 - b0)](
            out[b0:b1], t[b0:b1], n, C, HW, k0, k1, sample_offset + b0, stream, NHWC=nhwc, BLOCK=BLOCK
        )
    return out
