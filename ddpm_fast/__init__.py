"""ddpm_fast: fused-kernel DDPM (Ho et al. 2020) sampling and training, with a PyTorch reference as its spec."""

from __future__ import annotations

from . import ops, reference
from .diffusion import GaussianDiffusion
from .models import UNet, UNetConfig
from .ops import backends
from .schedule import NoiseSchedule

__all__ = ["GaussianDiffusion", "NoiseSchedule", "UNet", "UNetConfig", "backends", "ops", "reference"]
__version__ = "0.1.0"
