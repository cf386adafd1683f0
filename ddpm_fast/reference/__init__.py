"""Plain PyTorch implementations of every op: the specification the fused kernels are tested against."""

from .attention import attention
from .conv import conv3x3
from .ddim_step import ddim_coefficients, ddim_step
from .ddpm_step import ddpm_step, predict_x0, step_coefficients
from .dpmpp_step import dpmpp_coefficients, dpmpp_step
from .group_norm import group_norm_silu
from .noise import keyed_normal
from .q_sample import q_sample

__all__ = [
    "ddim_coefficients",
    "ddim_step",
    "attention",
    "conv3x3",
    "ddpm_step",
    "dpmpp_coefficients",
    "dpmpp_step",
    "group_norm_silu",
    "keyed_normal",
    "predict_x0",
    "q_sample",
    "step_coefficients",
]
