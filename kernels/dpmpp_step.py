"""Triton fused multistep solver step (DPM-Solver++ 1M/2M/3M and its SDE variant, Lu et al. 2022; UniPC's
corrector and predictor, Zhao et al. 2023), data prediction, one pass over memory:

    D0     = (px * x + pm * m) * q                                  (x_0 predicted from epsilon, x_0 or v)
    y      = x, or with a corrector (UniPC's UniC, last sample L):
             c_l L + c_1 D1 + c_d (D0 - D1) + c_e (D1 - D2) + c_f (D1 - D3)
    x_next = a_x y + a_0 D0 + a_d (D0 - D1) + a_e ((D0 - D1) - rho (D1 - D2)) + a_z z
                                                        (z given or keyed Philox noise, stream 0 at t)

D1, D2, D3: the data predictions of the previous steps, newest first; the differences (and 3M's second difference)
are formed here, as diffusers forms them (see csrc/cpu/dpmpp_step.cpp). Per-sample coefficients come from a (B, 14)
fp32 table [px, pm, q, a_x, a_0, a_d, a_e, rho, a_z, c_l, c_1, c_d, c_e, c_f] computed on the host in float64
(ddpm_fast/reference/dpmpp_step.py, unipc_step.py); D0 is written beside x_next for the next step, and y where
corrected.
"""

import triton
import triton.language as tl

from .grid import batch_slices
from .philox import KEY_ARGS, block_size, keyed_normal_of, split_seed

ROW = 14
NOISE_NONE, NOISE_GIVEN, NOISE_KEYED = 0, 1, 2


@triton.jit(do_not_specialize=KEY_ARGS)
def _dpmpp_step_kernel(
    x_ptr,  # (B, n) x_t, any float dtype
    m_ptr,  # (B, n) model output
    d1_ptr,  # (B, n) D1, the previous step's D0 (HIST >= 1)
    d2_ptr,  # (B, n) D2 (HIST >= 2)
    d3_ptr,  # (B, n) D3 (HIST >= 3)
    l_ptr,  # (B, n) the corrector's last sample (CORR)
    z_ptr,  # (B, n) given noise (NOISE_GIVEN)
    out_ptr,  # (B, n) x_next
    d0_ptr,  # (B, n) D0
    y_ptr,  # (B, n) the corrected sample (CORR)
    coef_ptr,  # (B, 14) fp32 rows, see above
    t_ptr,  # (B,) int64 timesteps keying the noise (NOISE_KEYED)
    n,
    C,
    HW,
    k0,
    k1,
    sample_offset,
    HIST: tl.constexpr,
    CORR: tl.constexpr,
    NOISE: tl.constexpr,
    NHWC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    ptr = b.to(tl.int64) * n + offs
    cb = coef_ptr + b * 14
    x = tl.load(x_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    d0 = (tl.load(cb + 0) * x + tl.load(cb + 1) * m) * tl.load(cb + 2)
    y = x
    if HIST >= 1:
        d1 = tl.load(d1_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
        e01 = d0 - d1
    if HIST >= 2:
        d2 = tl.load(d2_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
        e12 = d1 - d2
    if HIST >= 3:
        e13 = d1 - tl.load(d3_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    if CORR:
        lv = tl.load(l_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(cb + 9) * lv + (tl.load(cb + 10) * d1 + tl.load(cb + 11) * e01)
        if HIST >= 2:
            y += tl.load(cb + 12) * e12
        if HIST >= 3:
            y += tl.load(cb + 13) * e13
    o = tl.load(cb + 3) * y + tl.load(cb + 4) * d0
    if HIST >= 1:
        o += tl.load(cb + 5) * e01
    if HIST >= 2:
        o += tl.load(cb + 6) * (e01 - tl.load(cb + 7) * e12)
    if NOISE == 1:
        o += tl.load(cb + 8) * tl.load(z_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    if NOISE == 2:
        z = keyed_normal_of(offs, start, sample_offset + b, tl.load(t_ptr + b), 0, k0, k1, C, HW, NHWC, BLOCK)
        o += tl.load(cb + 8) * z
    tl.store(out_ptr + ptr, o.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(d0_ptr + ptr, d0.to(d0_ptr.dtype.element_ty), mask=mask)
    if CORR:
        tl.store(y_ptr + ptr, y.to(y_ptr.dtype.element_ty), mask=mask)


def dpmpp_step(x, m, history, out, d0, coeffs, *, last=None, y=None, noise=None, t=None, seed=0, sample_offset=0,
               nhwc=False, noise_mode=NOISE_NONE):  # fmt: skip
    """Launch on dense tensors sharing one layout; coeffs: (B, 14) fp32 on x's device; ``history``: the D_j the rows
    read (0-3, newest first); ``last`` and ``y`` together (the corrector) or neither; t: (B,) int64 on x's device
    for NOISE_KEYED. The caller picks ``noise_mode`` and the history's length, so the launch reads nothing back from
    the device."""
    if (noise_mode == NOISE_GIVEN) != (noise is not None):
        raise ValueError(f"noise_mode: {noise_mode} does not match noise={'a tensor' if noise is not None else None}")
    if (last is None) != (y is None) or (last is not None and not history):
        raise ValueError("last, y: the corrector takes both, and a history")
    B = x.shape[0]
    n = x.numel() // B
    C = x.shape[1] if x.dim() > 1 else 1
    HW = n // C
    k0, k1 = split_seed(seed)
    BLOCK = block_size(n)
    hist = list(history) + [None] * (3 - len(history))
    for b0, b1 in batch_slices(B):
        xs = x[b0:b1]

        def part(a, xs=xs, b0=b0, b1=b1):
            return a[b0:b1] if a is not None else xs

        _dpmpp_step_kernel[(triton.cdiv(n, BLOCK), b1 - b0)](
            xs,
            m[b0:b1],
            part(hist[0]),
            part(hist[1]),
            part(hist[2]),
            part(last),
            part(noise),
            out[b0:b1],
            d0[b0:b1],
            part(y) if y is not None else out[b0:b1],
            coeffs[b0:b1],
            t[b0:b1] if t is not None else coeffs[b0:b1],
            n,
            C,
            HW,
            k0,
            k1,
            sample_offset + b0,
            HIST=len(history),
            CORR=last is not None,
            NOISE=noise_mode,
            NHWC=nhwc,
            BLOCK=BLOCK,
        )
    return out
