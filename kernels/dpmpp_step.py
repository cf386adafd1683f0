"""Triton fused DPM-Solver++ multistep step (Lu et al. 2022, data prediction, orders 1 and 2), one pass over memory:

    D0     = (px * x + pm * m) * q                 (x_0 predicted from epsilon, x_0 or v)
    x_next = a_x * x + a_0 * D0 + a_d * (D0 - D1)  (D1: the previous step's D0; a_d = 0 at first order)

Per-sample coefficients come from a (B, 6) fp32 table computed on the host in float64
(ddpm_fast/reference/dpmpp_step.py); D0 is written beside x_next for the next step. No noise: the solver is an ODE's.
"""

import triton
import triton.language as tl

from .grid import batch_slices
from .philox import block_size


@triton.jit
def _dpmpp_step_kernel(
    x_ptr,  # (B, n) x_t, any float dtype
    m_ptr,  # (B, n) model output
    d1_ptr,  # (B, n) previous step's D0 (SECOND_ORDER)
    out_ptr,  # (B, n) x_next
    d0_ptr,  # (B, n) D0
    coef_ptr,  # (B, 6) fp32: px, pm, q, a_x, a_0, a_d
    n,
    SECOND_ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ptr = b.to(tl.int64) * n + offs
    cb = coef_ptr + b * 6
    x = tl.load(x_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    d0 = (tl.load(cb + 0) * x + tl.load(cb + 1) * m) * tl.load(cb + 2)
    o = tl.load(cb + 3) * x + tl.load(cb + 4) * d0
    if SECOND_ORDER:
        o += tl.load(cb + 5) * (d0 - tl.load(d1_ptr + ptr, mask=mask, other=0.0).to(tl.float32))
    tl.store(out_ptr + ptr, o.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(d0_ptr + ptr, d0.to(d0_ptr.dtype.element_ty), mask=mask)


def dpmpp_step(x, m, d1, out, d0, coeffs):
    """Launch on dense tensors sharing one layout (elementwise: the layout itself does not matter); coeffs: (B, 6)
    fp32 on x's device; d1 None for a first-order step."""
    B = x.shape[0]
    n = x.numel() // B
    BLOCK = block_size(n)
    for b0, b1 in batch_slices(B):
        _dpmpp_step_kernel[(triton.cdiv(n, BLOCK), b1 - b0)](
            x[b0:b1],
            m[b0:b1],
            d1[b0:b1] if d1 is not None else x[b0:b1],
            out[b0:b1],
            d0[b0:b1],
            coeffs[b0:b1],
            n,
            SECOND_ORDER=d1 is not None,
            BLOCK=BLOCK,
        )
    return out
