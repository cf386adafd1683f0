"""Keyed Gaussian noise inside Triton kernels: the construction of csrc/common/philox.h and
ddpm_fast/reference/noise.py, element by element.

Element i (logical NCHW index within its sample) of global sample g at step t on ``stream`` takes
z[i % 4] of Philox4x32-10(counter=(i // 4, g, t, stream), key=(k0, k1)) after Box-Muller on the pairs
(w0, w1) and (w2, w3) with u = ((w >> 8) + 0.5) * 2**-24.

Kernels that take a key declare ``do_not_specialize=KEY_ARGS``: Triton's JIT otherwise turns an integer argument
equal to 1 into a compile-time constant (a Python int, which has no ``.to``), so seeds whose low or high word is 1
would not compile, and every other seed would pick one of several variants by its divisibility by 16.
"""

import triton
import triton.language as tl

KEY_ARGS = ("k0", "k1", "sample_offset")


@triton.jit
def _uniform(w):
    return ((w >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _philox(c0, g, t, stream, k0, k1):
    zero = c0 * 0
    return tl.random.philox_impl(
        c0, zero + g.to(tl.uint32), zero + t.to(tl.uint32), zero + stream, k0.to(tl.uint32), k1.to(tl.uint32), 10
    )


@triton.jit
def keyed_normal_at(i, g, t, stream, k0, k1):
    """float32 normals for logical indices ``i`` (a block of int64) of sample g at step t: one Philox call per
    element (for layouts where the four elements of a counter are not adjacent in memory, i.e. NHWC)."""
    w0, w1, w2, w3 = _philox((i // 4).to(tl.uint32), g, t, stream, k0, k1)
    lane = i % 4
    first_pair = lane < 2
    r = tl.sqrt(-2.0 * tl.log(_uniform(tl.where(first_pair, w0, w2))))
    theta = 6.2831854820251465 * _uniform(tl.where(first_pair, w1, w3))  # 2 pi rounded to fp32, as in C++
    return tl.where(lane % 2 == 0, r * tl.cos(theta), r * tl.sin(theta))


@triton.jit
def keyed_normal_block(start, g, t, stream, k0, k1, BLOCK: tl.constexpr):
    """float32 normals for the logical indices start .. start + BLOCK - 1 (start a multiple of 4) of sample g at
    step t, in order: one Philox call per four elements, as csrc/cuda/elementwise.cuh does for NCHW."""
    c0 = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    w0, w1, w2, w3 = _philox(c0, g, t, stream, k0, k1)
    r01 = tl.sqrt(-2.0 * tl.log(_uniform(w0)))
    r23 = tl.sqrt(-2.0 * tl.log(_uniform(w2)))
    theta01 = 6.2831854820251465 * _uniform(w1)
    theta23 = 6.2831854820251465 * _uniform(w3)
    # element 4c + 2j + l is z[2j + l] of counter c: join(join(z0, z2), join(z1, z3))[c, j, l]
    even = tl.join(r01 * tl.cos(theta01), r23 * tl.cos(theta23))
    odd = tl.join(r01 * tl.sin(theta01), r23 * tl.sin(theta23))
    return tl.reshape(tl.join(even, odd), [BLOCK])


@triton.jit
def keyed_normal_of(offs, start, g, t, stream, k0, k1, C, HW, NHWC: tl.constexpr, BLOCK: tl.constexpr):
    """The normals of memory offsets ``offs`` = start + arange(BLOCK) within a sample stored NCHW or NHWC."""
    if NHWC:
        return keyed_normal_at(logical_index(offs.to(tl.int64), C, HW, NHWC), g, t, stream, k0, k1)
    return keyed_normal_block(start, g, t, stream, k0, k1, BLOCK)


@triton.jit
def logical_index(offs, C, HW, NHWC: tl.constexpr):
    """The NCHW index of memory offset ``offs`` within a sample stored NCHW or NHWC."""
    if NHWC:
        return (offs % C) * HW + offs // C
    return offs


def split_seed(seed: int) -> tuple[int, int]:
    """The key (k0, k1): the low and high 32-bit words of ``seed`` as signed 32-bit ints. Triton types an int
    argument i32 or i64 by its value, so words past 2**31 passed as they are would make a second variant of each
    keyed kernel, compiled again on the first such seed; the kernels take the words' bits back with
    ``.to(tl.uint32)``."""

    def signed(word: int) -> int:
        return word - (1 << 32) if word >= 1 << 31 else word

    return signed(seed & 0xFFFFFFFF), signed((seed >> 32) & 0xFFFFFFFF)


def block_size(n: int) -> int:
    """Elements a program: a power of two, 1024 at most (memory-bound kernels; Triton tutorial 01's rule)."""
    return min(1024, triton.next_power_of_2(max(n, 16)))
