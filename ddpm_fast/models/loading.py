"""Load diffusers UNet2DModel weights (the classic DDPM blocks) into ddpm_fast.UNet, without network access."""

from __future__ import annotations

import json
import os

import torch

from .unet import UNet, UNetConfig

# google/ddpm-cifar10-32's UNet2DModel configuration: the paper's CIFAR-10 model in diffusers' terms.
DIFFUSERS_CIFAR10_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_num_groups=32,
    attention_head_dim=None,
)

# diffusers config keys whose value must be this for the architecture to be the DDPM one ddpm_fast implements.
_REQUIRED = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "resnet_time_scale_shift": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "mid_block_scale_factor": 1,
    "add_attention": True,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "time_embedding_dim": None,
    "attn_norm_num_groups": None,
    "mid_block_type": "UNetMidBlock2D",
}


def config_from_diffusers(cfg: dict) -> UNetConfig:
    """UNetConfig for a diffusers UNet2DModel config (dict), or ValueError naming what does not fit."""
    for key, expected in _REQUIRED.items():
        if key in cfg and cfg[key] != expected:
            raise ValueError(f"config: {key}={cfg[key]!r} is not supported (expected {expected!r})")
    boc = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    if len(down) != len(boc) or len(up) != len(boc):
        raise ValueError("config: down_block_types/up_block_types must have one entry per block_out_channels")
    for kind, names, plain, attn in (
        ("down", down, "DownBlock2D", "AttnDownBlock2D"),
        ("up", up, "UpBlock2D", "AttnUpBlock2D"),
    ):
        bad = [n for n in names if n not in (plain, attn)]
        if bad:
            raise ValueError(f"config: {kind}_block_types {bad} are not supported (only {plain}, {attn})")
    with_attn = [i for i, n in enumerate(down) if n.startswith("Attn")]
    if [len(up) - 1 - i for i, n in enumerate(up) if n.startswith("Attn")][::-1] != with_attn:
        raise ValueError("config: attention must sit at the same levels in down_block_types and up_block_types")
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ValueError(f"config: block_out_channels {boc} must be multiples of the first")
    size = cfg.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return UNetConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        sample_size=size,
        ch=ch,
        ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attn_resolutions=tuple(size // 2**i for i in with_attn),
        attention_head_dim=cfg.get("attention_head_dim", 8),
        dropout=cfg.get("dropout", 0.0),
        num_groups=cfg.get("norm_num_groups", 32),
        eps=cfg.get("norm_eps", 1e-5),
    )


def _load_folder_weights(folder: str) -> dict:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            from safetensors.torch import load_file

            return load_file(path)
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"path: no diffusion_pytorch_model.safetensors or .bin in {folder}")


def from_diffusers(source) -> UNet:
    """A ddpm_fast.UNet with the weights of a diffusers UNet2DModel.

    ``source``: a UNet2DModel, or a folder written by its ``save_pretrained`` (the model folder, or a pipeline
    folder with a ``unet/`` subfolder). Reads local files only.
    """
    if isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        if os.path.isdir(os.path.join(folder, "unet")):
            folder = os.path.join(folder, "unet")
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"path: no config.json in {folder}")
        with open(cfg_path) as f:
            cfg = json.load(f)
        state = _load_folder_weights(folder)
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        cfg, state = dict(source.config), source.state_dict()
    else:
        raise TypeError(f"source: expected a diffusers UNet2DModel or a folder path, got {type(source).__name__}")
    model = UNet(config_from_diffusers(cfg))
    model.load_state_dict(state)
    return model
