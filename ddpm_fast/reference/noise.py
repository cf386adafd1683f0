"""Keyed Gaussian noise: Philox4x32-10 + Box-Muller, written with int64 tensor ops (the spec).

The noise for element ``i`` (flat index within one sample, in logical NCHW order) of the sample with global
index ``g`` at step ``t`` depends only on ``(seed, g, t, stream, i)``:

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (i // 4, g, t, stream)
    w0..w3  = Philox4x32-10(counter, key)                      (Salmon et al. 2011, Random123)
    u_j     = ((w_j >> 8) + 0.5) * 2**-24                      in (0, 1), exact in fp32
    z0, z1  = sqrt(-2 ln u0) * (cos, sin)(2 pi u1);  z2, z3 likewise from (u2, u3)
    element i takes z[i % 4]

``csrc/common/philox.h`` and ``kernels/philox.py`` compute the same function.
"""

from __future__ import annotations

import math

import torch

STREAM_STEP = 0  # the reverse step's z
STREAM_Q_SAMPLE = 1  # q_sample's eps
STREAM_X_T = 2  # the initial x_T of a sampling chain

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a < 2**32 and uint32 values in int64 tensors."""
    lo = (b * a) & _MASK  # int64 wraps mod 2**64; the low 32 bits stay exact
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi = (b * a_hi + ((b * a_lo) >> 16)) >> 16  # every partial product < 2**49
    return hi & _MASK, lo


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32 with 10 rounds on four uint32 words held in int64 tensors."""
    c0, c1, c2, c3 = (c & _MASK for c in counter)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def split_seed(seed: int) -> tuple[int, int]:
    return seed & _MASK, (seed >> 32) & _MASK


def keyed_normal(shape, seed: int, t, stream: int, sample_offset: int = 0, device="cpu") -> torch.Tensor:
    """float32 noise of ``shape`` (B, ...): sample b uses global index sample_offset + b and step t[b].

    ``t`` is an int or a (B,) integer tensor.
    """
    B = shape[0]
    n = math.prod(shape[1:])
    n4 = (n + 3) // 4
    i4 = torch.arange(n4, dtype=torch.int64, device=device).expand(B, n4)
    g = (torch.arange(B, dtype=torch.int64, device=device) + sample_offset).view(B, 1).expand(B, n4)
    t = torch.as_tensor(t, dtype=torch.int64, device=device).reshape(-1, 1).expand(B, n4)
    s = torch.full_like(i4, stream)
    w = philox4x32_10([i4, g, t, s], split_seed(seed))
    u = [((wj >> 8).to(torch.float32) + 0.5) * 2.0**-24 for wj in w]
    two_pi = torch.tensor(2 * math.pi, dtype=torch.float32)
    z = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        r = torch.sqrt(-2.0 * torch.log(a))
        theta = two_pi * b
        z += [r * torch.cos(theta), r * torch.sin(theta)]
    z = torch.stack(z, dim=-1).reshape(B, 4 * n4)[:, :n]
    return z.reshape(shape)
