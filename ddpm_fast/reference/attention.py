"""Reference scaled dot-product attention (Vaswani et al. 2017), optional residual added to the output."""

from __future__ import annotations

import math


def attention(q, k, v, *, scale=None, residual=None):
    """softmax(q k^T * scale) v (+ residual) for q, k, v of shape (B, H, N, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    weights = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)
    out = weights @ v
    return out if residual is None else out + residual
