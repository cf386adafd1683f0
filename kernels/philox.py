"""Keyed Gaussian noise inside Triton kernels: the construction of csrc/common/philox.h and
ddpm_fast/reference/noise.py, element by element.

Element i (logical NCHW index within its sample) of global sample g at step t on ``stream`` takes
z[i % 4] of Philox4x32-10(counter=(i // 4, g, t, stream), key=(k0, k1)) after Box-Muller on the pairs
(w0, w1) and (w2, w3) with u = ((w >> 8) + 0.5) * 2**-24.
"""

import triton
import triton.language as tl


@triton.jit
def keyed_normal_at(i, g, t, stream, k0, k1):
    """float32 normals for logical indices ``i`` (a block of int64) of sample g at step t."""
    c0 = (i // 4).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.random.philox_impl(
        c0, zero + g.to(tl.uint32), zero + t.to(tl.uint32), zero + stream, k0.to(tl.uint32), k1.to(tl.uint32), 10
    )
    lane = i % 4
    first_pair = lane < 2
    wa = tl.where(first_pair, w0, w2)
    wb = tl.where(first_pair, w1, w3)
    u0 = ((wa >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    u1 = ((wb >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    r = tl.sqrt(-2.0 * tl.log(u0))
    theta = 6.2831854820251465 * u1  # 2 pi rounded to fp32, as the C++ kernels use it
    return tl.where(lane % 2 == 0, r * tl.cos(theta), r * tl.sin(theta))


@triton.jit
def logical_index(offs, C, HW, NHWC: tl.constexpr):
    """The NCHW index of memory offset ``offs`` within a sample stored NCHW or NHWC."""
    if NHWC:
        return (offs % C) * HW + offs // C
    return offs


def split_seed(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def block_size(n: int) -> int:
    """Elements a program: a power of two, 1024 at most (memory-bound kernels; Triton tutorial 01's rule)."""
    return min(1024, triton.next_power_of_2(max(n, 16)))
