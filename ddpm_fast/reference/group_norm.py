"""Reference GroupNorm (Wu & He 2018) + SiLU, with the ResBlock's per-(batch, channel) add folded in front."""

from __future__ import annotations

import torch.nn.functional as F


def group_norm_silu(x, num_groups, weight, bias, eps=1e-5, *, silu=True, add=None):
    """y = SiLU(GroupNorm(x + add[:, :, None, None]) * weight + bias); add and SiLU optional."""
    h = x if add is None else x + add.view(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(h, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y
