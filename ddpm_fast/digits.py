"""Real pictures without downloads: a DDPM trained on scikit-learn's bundled handwritten digits (1,797 images,
8x8), sampled with the fused kernels, and a quality measure from a digits classifier (class histogram, mean
confidence, and the Frechet distance between generated and real digits in the classifier's feature space).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import atomic_write, check_output_folder, save_state
from .diffusion import GaussianDiffusion
from .models import UNet, UNetConfig
from .models.loading import DIGITS_FORMAT, model_from_state, read_checkpoint
from .schedule import NoiseSchedule

DIGITS_UNET = dict(
    in_channels=1,
    out_channels=1,
    sample_size=8,
    ch=48,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_groups=8,
    dropout=0.0,
)


def load_digits_tensor() -> torch.Tensor:
    """scikit-learn's digits as a (1797, 1, 8, 8) float32 tensor in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    return torch.from_numpy(images * 2 - 1).unsqueeze(1)


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, state: dict) -> None:
    """Atomically (temporary file, fsync, rename), with a sha256 of the contents: a kill leaves the previous one."""
    save_state(path, dict(state, format=DIGITS_FORMAT))


def load_checkpoint(path: str) -> dict:
    """The state of a train-digits checkpoint, read without running code in the file and checked (sha256)."""
    return read_checkpoint(path, "checkpoint", (DIGITS_FORMAT,), kind="ddpm_fast digits")


def _schedule(timesteps, where: str) -> NoiseSchedule:
    try:
        return NoiseSchedule.linear(timesteps)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: timesteps {timesteps!r} do not give a noise schedule ({e})") from None


def model_from_checkpoint(path: str, ema: bool = True) -> tuple[UNet, NoiseSchedule]:
    state = load_checkpoint(path)
    model = model_from_state(state, path, "checkpoint", "ema" if ema else "model")
    return model.eval(), _schedule(state.get("timesteps"), f"checkpoint: {path}")


# ---------------------------------------------------------------------------------------------- training
# optimisation settings and their values for a fresh run; a resumed run takes the checkpoint's unless given
TRAIN_DEFAULTS = dict(batch_size=64, lr=5e-4, ema_decay=0.998, checkpoint_every=250)
# settings fixed for the life of a run folder: the model is trained for one schedule, the data order for one seed
FIXED_DEFAULTS = dict(timesteps=1000, seed=0)


def _check_settings(steps, settings: dict, max_minutes) -> None:
    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")

    positive_int("steps", steps)
    for name in ("batch_size", "checkpoint_every", "timesteps"):
        if settings.get(name) is not None:
            positive_int(name, settings[name])
    for name, low, high in (("lr", 0.0, math.inf), ("ema_decay", 0.0, 1.0)):
        v = settings.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v!r}")
        if not (low < v if name == "lr" else low <= v <= high):
            raise ValueError(
                f"{name}: expected {'a positive number' if name == 'lr' else 'a number in [0, 1]'}, got {v!r}"
            )
    seed = settings.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63):
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
    if max_minutes is not None and (
        isinstance(max_minutes, bool)
        or not isinstance(max_minutes, numbers.Real)
        or not max_minutes > 0
        or not math.isfinite(max_minutes)
    ):
        raise ValueError(f"max_minutes: expected a positive number, got {max_minutes!r}")


def _clean_temporary_files(out_dir: str) -> list[str]:
    """Remove the temporary files of writes a kill cut short (``checkpoint.pt.*.tmp``, ``loss.png.*.tmp``)."""
    removed = []
    for name in os.listdir(out_dir):
        if name.endswith(".tmp") and name.startswith(("checkpoint.pt.", "loss.png.")):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    return removed


def _lock(out_dir: str):
    """An exclusive lock on ``out_dir`` for this run (another train-digits into it: ValueError)."""
    fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (not POSIX): run unlocked
        pass
    except OSError:
        os.close(fd)
        raise ValueError(f"out: another train-digits is running in {out_dir}") from None
    return fd


def _resume(path: str, state: dict) -> tuple[dict, UNet, UNet, int, list, dict]:
    """A checked checkpoint's (U-Net config, model, EMA model, step, losses, settings)."""
    where = f"checkpoint: {path}"
    model = model_from_state(state, path, "checkpoint", "model")
    ema = model_from_state(state, path, "checkpoint", "ema").eval()
    step, losses = state.get("step"), state.get("losses")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where}: its step {step!r} is not a count")
    if not isinstance(losses, list) or len(losses) != step or not all(isinstance(v, float) for v in losses):
        raise ValueError(f"{where}: its loss history does not match its step {step}")
    if not isinstance(state.get("optimizer"), dict) or not isinstance(state.get("rng"), torch.Tensor):
        raise ValueError(f"{where}: holds no optimizer or generator state")
    settings = state.get("settings")
    if settings is None:  # an older checkpoint: only the schedule and the learning rate are known
        groups = state["optimizer"].get("param_groups") or [{}]
        settings = dict(
            timesteps=state.get("timesteps"), lr=groups[0].get("lr") if isinstance(groups[0], dict) else None
        )
    if not isinstance(settings, dict) or set(settings) - set(TRAIN_DEFAULTS) - set(FIXED_DEFAULTS):
        raise ValueError(f"{where}: its settings {settings!r} are not train-digits settings")
    try:
        _check_settings(max(step, 1), settings, None)
    except ValueError as e:
        raise ValueError(f"{where}: its settings are not valid ({e})") from None
    return dataclasses.asdict(model.config), model, ema, step, losses, settings


def train_digits(
    out_dir: str,
    *,
    steps: int = 3000,
    batch_size: int | None = None,
    lr: float | None = None,
    ema_decay: float | None = None,
    timesteps: int | None = None,
    checkpoint_every: int | None = None,
    seed: int | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
) -> str:
    """Algorithm 1 on the digits with an EMA of the weights; resumes from out_dir/checkpoint.pt if present.

    Returns the checkpoint path. A killed run resumes from its last checkpoint (at most checkpoint_every steps
    lost). Writes out_dir/loss.png at the end.

    Every argument and ``out_dir`` (a writable folder) are checked before anything is written or trained. A
    fresh run takes ``TRAIN_DEFAULTS`` / ``FIXED_DEFAULTS`` for settings left None. On resume a setting left None
    keeps the checkpoint's value; a given ``batch_size``, ``lr``, ``ema_decay`` or ``checkpoint_every`` applies
    from the current step on (said on stderr and recorded in the checkpoint); a ``timesteps`` or ``seed`` other
    than the checkpoint's is refused (ValueError). A loss that turns NaN or inf stops training with a
    FloatingPointError, the last checkpoint kept.
    """
    given = dict(batch_size=batch_size, lr=lr, ema_decay=ema_decay, checkpoint_every=checkpoint_every)
    fixed = dict(timesteps=timesteps, seed=seed)
    _check_settings(steps, {**given, **fixed}, max_minutes)
    check_output_folder(out_dir)
    path = os.path.join(out_dir, "checkpoint.pt")
    settings = {**TRAIN_DEFAULTS, **FIXED_DEFAULTS}
    step, losses, changes, new_changes = 0, [], [], []
    if os.path.exists(path):  # everything in it checked before anything is written
        state = load_checkpoint(path)
        cfg, model, ema, step, losses, saved = _resume(path, state)
        for key, value in fixed.items():
            if value is not None and saved.get(key) is not None and value != saved[key]:
                raise ValueError(
                    f"{key}: {path} was trained with {key} {saved[key]!r}; resume with the same {key} "
                    f"(or leave it out), or train into a new --out"
                )
        settings.update({k: v for k, v in saved.items() if v is not None})
        changes = [c for c in state.get("setting_changes", []) if isinstance(c, dict)]
        for key, value in given.items():
            if value is not None and value != settings[key] and step < steps:
                new_changes.append(dict(step=step, setting=key, old=settings[key], new=value))
        changes += new_changes
    else:
        state = None
        torch.manual_seed(fixed["seed"] if fixed["seed"] is not None else FIXED_DEFAULTS["seed"])
        cfg = dict(DIGITS_UNET)
        model = UNet(UNetConfig(**cfg))
        ema = copy.deepcopy(model).eval()
    settings.update({k: v for k, v in {**given, **fixed}.items() if v is not None})
    schedule = _schedule(settings["timesteps"], "timesteps")
    opt = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    if state is not None:
        try:
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"checkpoint: {path}: its optimizer or generator state does not fit ({e})") from None
        for g in opt.param_groups:  # the state's lr, unless one was given
            g["lr"] = settings["lr"]
    data = load_digits_tensor()

    os.makedirs(out_dir, exist_ok=True)
    lock = _lock(out_dir)
    try:
        removed = _clean_temporary_files(out_dir)
        if removed:
            print(f"train-digits: removed {len(removed)} temporary file(s) of an interrupted write", file=sys.stderr)
        for c in new_changes:
            print(f"train-digits: {c['setting']} {c['old']!r} -> {c['new']!r} from step {c['step']}", file=sys.stderr)
        if step >= steps:
            print(f"train-digits: {path} is at step {step} already (--steps {steps})", file=sys.stderr)
        diffusion = GaussianDiffusion(model, schedule)
        saved_step = step
        start = time.time()
        bar = tqdm(total=steps, initial=min(step, steps), desc="training", disable=not progress)

        def checkpoint():
            nonlocal saved_step
            save_checkpoint(
                path,
                {
                    "unet": cfg,
                    "timesteps": settings["timesteps"],
                    "settings": dict(settings),
                    "setting_changes": changes,
                    "step": step,
                    "losses": losses,
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(),
                },
            )
            saved_step = step

        model.train()
        while step < steps:
            idx = torch.randint(0, len(data), (settings["batch_size"],))
            loss = diffusion.loss(data[idx])
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training: the loss is {value} at step {step + 1}: training diverged; {path} keeps step "
                    f"{saved_step} (a lower --lr may help)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - settings["ema_decay"])
            step += 1
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if step % settings["checkpoint_every"] == 0 or step == steps:
                checkpoint()
            if max_minutes is not None and time.time() - start > 60 * max_minutes:
                checkpoint()
                break
        bar.close()
        if not os.path.exists(path) or saved_step != step:
            checkpoint()
        plot_losses(losses, os.path.join(out_dir, "loss.png"))
    finally:
        os.close(lock)
    return path


def plot_losses(losses, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.4, label="loss")
    k = max(1, len(losses) // 50)
    if len(losses) >= k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, len(losses)), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("L_simple")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- sampling
def save_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 4) -> None:
    """(N, 1, H, W) images in [-1, 1] as one PNG grid."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    n, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = 255 - x[i]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


# ---------------------------------------------------------------------------------------------- quality
@dataclasses.dataclass
class DigitsQuality:
    frechet_distance: float
    mean_confidence: float
    class_histogram: list[int]

    def __str__(self) -> str:
        return (
            f"Frechet distance {self.frechet_distance:.3f}, mean confidence {self.mean_confidence:.3f}, "
            f"classes {self.class_histogram}"
        )


class DigitsClassifier:
    """A small MLP on the digits (scikit-learn); its hidden layer is the feature space of the Frechet distance."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier

        d = load_digits()
        self.mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
        self.mlp.fit(d.data / 16.0, d.target)
        self.real = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1).unsqueeze(1)

    @staticmethod
    def _flat(images: torch.Tensor) -> np.ndarray:
        return ((images.clamp(-1, 1) + 1) / 2).reshape(len(images), -1).double().numpy()

    def features(self, images: torch.Tensor) -> np.ndarray:
        x = self._flat(images)
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0)

    def quality(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> DigitsQuality:
        from scipy import linalg

        ref = self.real if reference is None else reference
        f1, f2 = self.features(images), self.features(ref)
        mu1, mu2 = f1.mean(0), f2.mean(0)
        eye = 1e-6 * np.eye(f1.shape[1])  # dead ReLU units make the covariances singular
        s1, s2 = np.cov(f1, rowvar=False) + eye, np.cov(f2, rowvar=False) + eye
        covmean = linalg.sqrtm(s1 @ s2).real
        fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
        proba = self.mlp.predict_proba(self._flat(images))
        hist = np.bincount(proba.argmax(1), minlength=10).tolist()
        return DigitsQuality(fd, float(proba.max(1).mean()), hist)


def write_report(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
