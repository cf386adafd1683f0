"""ddpm_fast: fused-kernel DDPM (Ho et al. 2020) sampling and training, with a PyTorch reference as its spec."""

from __future__ import annotations

from . import ops, reference
from .diffusion import GaussianDiffusion, NonFiniteSampleError
from .models import UNet, UNetConfig
from .ops import backends
from .schedule import NoiseSchedule

__all__ = [
    "AccelerateError",
    "AccelerateReport",
    "FusedDDIMScheduler",
    "FusedDDPMScheduler",
    "FusedDPMSolverMultistepScheduler",
    "FusedUniPCMultistepScheduler",
    "GaussianDiffusion",
    "NoiseSchedule",
    "NonFiniteSampleError",
    "UNet",
    "UNetConfig",
    "accelerate",
    "backends",
    "deaccelerate",
    "ops",
    "reference",
]
__version__ = "0.1.0"


def __getattr__(name):  # the diffusers drop-ins import diffusers, which is optional: load them on first use
    drop_ins = (
        "FusedDDPMScheduler",
        "FusedDDIMScheduler",
        "FusedDPMSolverMultistepScheduler",
        "FusedUniPCMultistepScheduler",
    )
    if name in ("AccelerateError", "AccelerateReport", *drop_ins, "accelerate", "deaccelerate"):
        from .integrations import diffusers as _integration

        return getattr(_integration, name)
    raise AttributeError(f"module 'ddpm_fast' has no attribute {name!r}")
