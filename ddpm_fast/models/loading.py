"""Load diffusers UNet2DModel weights (the classic DDPM blocks) into ddpm_fast.UNet, without network access."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import torch

from .._io import _short, load_state
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


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model: {path} is not readable JSON ({_short(e)})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model: {path} holds a {type(cfg).__name__}, not a config object")
    return cfg


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

            try:
                return load_file(path)
            except Exception as e:  # noqa: BLE001 - a damaged or cut-short file
                raise ValueError(f"model: {path} is not a readable safetensors file ({_short(e)})") from None
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            state, _ = load_state(path, "model")  # weights_only: no code in the file runs
            return state
    raise FileNotFoundError(f"model: no diffusion_pytorch_model.safetensors or .bin in {folder}")


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
            raise FileNotFoundError(f"model: no config.json in {folder} (not a diffusers model folder)")
        cfg = _read_json(cfg_path)
        try:
            config = config_from_diffusers(cfg)
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"model: {cfg_path}: not a supported UNet2DModel config ({_short(e)})") from None
        return unet_from_weights(config, _load_folder_weights(folder), f"model: {folder}")
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        return unet_from_weights(config_from_diffusers(dict(source.config)), source.state_dict(), "source")
    raise TypeError(f"source: expected a diffusers UNet2DModel or a folder path, got {type(source).__name__}")


# ---------------------------------------------------------------------------------------------- checked weights
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(UNetConfig)}


def unet_config(cfg, where: str) -> UNetConfig:
    """A UNetConfig from a checkpoint's config dict, each field checked (ValueError naming ``where``)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: its U-Net config is a {type(cfg).__name__}, not a dict")
    unknown = sorted(str(k) for k in cfg if k not in _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"{where}: its U-Net config has unknown fields {unknown}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 2**20

    fields = {}
    for key, v in cfg.items():
        if key in ("ch_mult", "attn_resolutions"):
            ok = isinstance(v, (list, tuple)) and all(is_int(i) for i in v) and (key != "ch_mult" or len(v) > 0)
            v = tuple(v) if ok else v
        elif key == "attention_head_dim":
            ok = v is None or is_int(v)
        elif key in ("dropout", "eps"):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        else:
            ok = is_int(v)
        if not ok:
            raise ValueError(f"{where}: its U-Net config has an invalid {key}={v!r}")
        fields[key] = v
    return UNetConfig(**fields)


def unet_from_weights(config: UNetConfig, weights, where: str) -> UNet:
    """A UNet of ``config`` holding ``weights`` (a state dict): ValueError naming ``where`` when they do not fit
    (missing, unexpected or misshapen tensors) or when a weight holds NaN or inf.

    The fit is checked on a meta-device model first, so a config that does not match its weights allocates nothing.
    """
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{where}: its weights are not a dict of tensors")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: its U-Net config is not valid ({_short(e)})") from None
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [k for k in expected if k in weights and tuple(weights[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (first {k}: {tuple(weights[k].shape)}, config {expected[k]})")
        raise ValueError(f"{where}: its weights do not match its U-Net config: {', '.join(parts)} tensors")
    for k, v in weights.items():
        if not (v.is_floating_point() or v.is_complex()):
            continue
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}: weight {k} holds NaN or inf; the model cannot give finite samples")
    model = UNet(config)
    model.load_state_dict(weights)
    return model


# ---------------------------------------------------------------------------------------------- whole samplers
SAMPLING_KEYS = ("prediction_type", "variance_type", "clip_sample", "clip_range")
UNET_FORMAT = "ddpm_fast.unet/2"
DIGITS_FORMAT = "ddpm_fast.digits/2"
# the formats written before checkpoints carried a checksum, by the format that replaced them
_LEGACY_FORMATS = {UNET_FORMAT: "ddpm_fast.unet/1", DIGITS_FORMAT: "ddpm_fast.digits/1"}


class UncheckedCheckpointWarning(UserWarning):
    """A checkpoint of an older format, without a checksum: damage to it cannot be detected."""


def read_checkpoint(path: str, what: str, formats: tuple[str, ...], kind: str = "ddpm_fast") -> dict:
    """A checked ddpm_fast checkpoint's state dict, read without running code in the file.

    ``formats``: the current formats accepted; their files must carry a matching checksum. The older formats
    (``/1``) have none: they are still read, with an :class:`UncheckedCheckpointWarning`. Anything else is a
    ValueError naming ``what`` and the file (FileNotFoundError when there is none).
    """
    state, checked = load_state(path, what)
    fmt = state.get("format")
    legacy = [_LEGACY_FORMATS[f] for f in formats if f in _LEGACY_FORMATS]
    if fmt in formats:
        if not checked:
            raise ValueError(f"{what}: {path} has no checksum, which its format {fmt} requires: the file was changed")
    elif fmt in legacy:
        warnings.warn(
            f"{what}: {path} has no checksum (an older ddpm_fast wrote it): damage to it cannot be detected; "
            "saving it again adds one",
            UncheckedCheckpointWarning,
            stacklevel=3,
        )
    else:
        raise ValueError(f"{what}: {path} is not a {kind} checkpoint (format {' or '.join(formats)})")
    return state


def model_from_state(state: dict, path: str, what: str, key: str = "model") -> UNet:
    """The U-Net of a checkpoint state (``state["unet"]`` config, ``state[key]`` weights), checked."""
    where = f"{what}: {path}"
    if not isinstance(state.get(key), dict):
        raise ValueError(f"{where}: holds no {key!r} weights")
    return unet_from_weights(unet_config(state.get("unet"), where), state[key], where)


def save_model(path: str, model: UNet, schedule, **sampling) -> None:
    """One file with everything a sampler needs: U-Net config and weights, betas, sampling options.

    ``sampling``: GaussianDiffusion options (prediction_type, variance_type, clip_sample, clip_range).
    Written atomically with a sha256 of its contents; read back with :func:`load_pretrained` (which reads
    tensors, dicts, numbers and strings only, and checks the sha256).
    """
    import dataclasses

    from .._io import save_state
    from ..schedule import NoiseSchedule

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(model, UNet):
        raise TypeError(f"model: expected a ddpm_fast.UNet, got {type(model).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a ddpm_fast.NoiseSchedule, got {type(schedule).__name__}")
    bad = sorted(set(sampling) - set(SAMPLING_KEYS))
    if bad:
        raise ValueError(f"sampling: unknown options {bad} (expected some of {SAMPLING_KEYS})")
    state = {
        "format": UNET_FORMAT,
        "unet": dataclasses.asdict(model.config),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "betas": schedule.betas.detach().cpu().clone(),
        "sampling": dict(sampling),
    }
    save_state(path, state)


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
        raise ValueError(
            "config: thresholding=True is not supported by the fused sampler (accelerate(pipe, strict=False) runs "
            "the U-Net on ddpm_fast and keeps diffusers' scheduler)"
        )
    sampling = dict(
        prediction_type=cfg.get("prediction_type", "epsilon"),
        variance_type=variance,
        clip_sample=cfg.get("clip_sample", True),
        clip_range=cfg.get("clip_sample_range", 1.0),
    )
    return schedule, sampling


def _check_sampling(sampling, schedule, where: str) -> dict:
    """The sampling options, checked as GaussianDiffusion would, with errors naming ``where``."""
    from ..ops import _checks as C

    if not isinstance(sampling, dict) or set(sampling) - set(SAMPLING_KEYS):
        raise ValueError(f"{where}: its sampling options {sampling!r} are not some of {SAMPLING_KEYS}")
    try:  # as GaussianDiffusion checks them
        C.choice("prediction_type", sampling.get("prediction_type", "epsilon"), C.PREDICTION_TYPES)
        C.choice("variance_type", sampling.get("variance_type", "fixed_small"), C.VARIANCE_TYPES)
        C.number("clip_range", sampling.get("clip_range", 1.0), positive=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its sampling options are not valid ({e})") from None
    return dict(sampling)


def load_pretrained(path: str):
    """``(UNet, NoiseSchedule, sampling options)`` from a ddpm_fast checkpoint file or a diffusers folder.

    Files: written by :func:`save_model` or by ``ddpm-fast train-digits`` (its EMA weights), read with
    ``torch.load(weights_only=True)`` (no code in the file runs) and checked against their sha256. Folders: a
    diffusers ``DDPMPipeline.save_pretrained`` folder (``unet/`` and ``scheduler/``) or a ``UNet2DModel`` folder
    (the linear 1000-step schedule then). Local files only. A damaged, cut-short or changed file, weights that do
    not fit the config, or weights holding NaN/inf: a ValueError naming the file.
    """
    from ..schedule import NoiseSchedule

    path = os.fspath(path)
    if os.path.isdir(path):
        model = from_diffusers(path)
        sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json")
        try:
            schedule, sampling = _scheduler_from_config(_read_json(sched_cfg) if os.path.exists(sched_cfg) else {})
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"model: {sched_cfg}: {e}") from None
        return model.eval(), schedule, _check_sampling(sampling, schedule, f"model: {sched_cfg}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: no file or folder at {path}")
    state = read_checkpoint(path, "model", (UNET_FORMAT, DIGITS_FORMAT))
    model = model_from_state(state, path, "model", "ema" if "ema" in state else "model")
    try:
        if "betas" in state:
            if not isinstance(state["betas"], torch.Tensor):
                raise TypeError("betas: expected a tensor")
            schedule = NoiseSchedule.from_betas(state["betas"])
        else:
            schedule = NoiseSchedule.linear(state.get("timesteps"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {path}: its noise schedule is not valid ({e})") from None
    return model.eval(), schedule, _check_sampling(state.get("sampling", {}), schedule, f"model: {path}")
