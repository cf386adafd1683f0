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


# ---------------------------------------------------------------------------------------------- whole samplers
SAMPLING_KEYS = ("prediction_type", "variance_type", "clip_sample", "clip_range")
_CHECKPOINT_FORMATS = ("ddpm_fast.unet/1", "ddpm_fast.digits/1")


def save_model(path: str, model: UNet, schedule, **sampling) -> None:
    """One file with everything a sampler needs: U-Net config and weights, betas, sampling options.

    ``sampling``: GaussianDiffusion options (prediction_type, variance_type, clip_sample, clip_range).
    Written atomically; read back with :func:`load_pretrained`.
    """
    import dataclasses

    from .._io import atomic_write

    bad = sorted(set(sampling) - set(SAMPLING_KEYS))
    if bad:
        raise ValueError(f"sampling: unknown options {bad} (expected some of {SAMPLING_KEYS})")
    state = {
        "format": "ddpm_fast.unet/1",
        "unet": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        "betas": schedule.betas.clone(),
        "sampling": sampling,
    }
    atomic_write(path, lambda f: torch.save(state, f))


def _scheduler_from_config(cfg: dict):
    """NoiseSchedule and sampling options of a diffusers DDPMScheduler config (read as JSON, no diffusers needed)."""
    from ..schedule import NoiseSchedule

    T = cfg.get("num_train_timesteps", 1000)
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        schedule = NoiseSchedule.from_betas(torch.tensor(cfg["trained_betas"], dtype=torch.float64))
    elif kind == "linear":
        # diffusers builds these betas in float32; take them as it does so the chain matches its pipeline
        betas = torch.linspace(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), T, dtype=torch.float32)
        schedule = NoiseSchedule.from_betas(betas)
    elif kind == "squaredcos_cap_v2":
        schedule = NoiseSchedule.cosine(T)
    else:
        raise ValueError(f"config: beta_schedule={kind!r} is not supported (linear, squaredcos_cap_v2, trained_betas)")
    variance = cfg.get("variance_type", "fixed_small")
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"config: variance_type={variance!r} is not supported by the fused sampler")
    if cfg.get("thresholding", False):
        raise ValueError("config: thresholding=True is not supported by the fused sampler (use accelerate())")
    sampling = dict(
        prediction_type=cfg.get("prediction_type", "epsilon"),
        variance_type=variance,
        clip_sample=cfg.get("clip_sample", True),
        clip_range=cfg.get("clip_sample_range", 1.0),
    )
    return schedule, sampling


def load_pretrained(path: str):
    """``(UNet, NoiseSchedule, sampling options)`` from a ddpm_fast checkpoint file or a diffusers folder.

    Files: written by :func:`save_model` or by ``ddpm-fast train-digits`` (its EMA weights). Folders: a diffusers
    ``DDPMPipeline.save_pretrained`` folder (``unet/`` and ``scheduler/``) or a ``UNet2DModel`` folder (the
    linear 1000-step schedule then). Local files only.
    """
    from ..schedule import NoiseSchedule

    path = os.fspath(path)
    if os.path.isdir(path):
        model = from_diffusers(path)
        sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.exists(sched_cfg):
            with open(sched_cfg) as f:
                schedule, sampling = _scheduler_from_config(json.load(f))
        else:
            schedule, sampling = _scheduler_from_config({})
        return model.eval(), schedule, sampling
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: no file or folder at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not a checkpoint
        raise ValueError(f"model: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") not in _CHECKPOINT_FORMATS:
        raise ValueError(f"model: {path} is not a ddpm_fast checkpoint (formats {_CHECKPOINT_FORMATS})")
    model = UNet(UNetConfig(**state["unet"]))
    model.load_state_dict(state["ema"] if "ema" in state else state["model"])
    if "betas" in state:
        schedule = NoiseSchedule.from_betas(torch.as_tensor(state["betas"]))
    else:
        schedule = NoiseSchedule.linear(state["timesteps"])
    return model.eval(), schedule, dict(state.get("sampling", {}))
