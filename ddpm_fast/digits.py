"""Real pictures without downloads: a DDPM trained on scikit-learn's bundled handwritten digits (1,797 images,
8x8), sampled with the fused kernels, and a quality measure from a digits classifier (class histogram, mean
confidence, and the Frechet distance between generated and real digits in the classifier's feature space).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import atomic_write
from .diffusion import GaussianDiffusion
from .models import UNet, UNetConfig
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
    """Atomically (temporary file, fsync, rename): a kill leaves the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not a checkpoint
        raise ValueError(
            f"checkpoint: {path} is not a readable ddpm_fast checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != "ddpm_fast.digits/1":
        raise ValueError(f"checkpoint: {path} is not a ddpm_fast digits checkpoint")
    return state


def model_from_checkpoint(path: str, ema: bool = True) -> tuple[UNet, NoiseSchedule]:
    state = load_checkpoint(path)
    model = UNet(UNetConfig(**state["unet"]))
    model.load_state_dict(state["ema" if ema else "model"])
    return model.eval(), NoiseSchedule.linear(state["timesteps"])


# ---------------------------------------------------------------------------------------------- training
def train_digits(
    out_dir: str,
    *,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 5e-4,
    ema_decay: float = 0.998,
    timesteps: int = 1000,
    checkpoint_every: int = 250,
    seed: int = 0,
    max_minutes: float | None = None,
    progress: bool = True,
) -> str:
    """Algorithm 1 on the digits with an EMA of the weights; resumes from out_dir/checkpoint.pt if present.

    Returns the checkpoint path. A killed run resumes from its last checkpoint (at most checkpoint_every steps
    lost). Writes out_dir/loss.png at the end.
    """
    path = os.path.join(out_dir, "checkpoint.pt")
    data = load_digits_tensor()
    torch.manual_seed(seed)
    cfg = dict(DIGITS_UNET)
    model = UNet(UNetConfig(**cfg))
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, losses = 0, []
    if os.path.exists(path):
        state = load_checkpoint(path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
        torch.set_rng_state(state["rng"])
    diffusion = GaussianDiffusion(model, NoiseSchedule.linear(timesteps))
    start = time.time()
    bar = tqdm(total=steps, initial=step, desc="training", disable=not progress)

    def checkpoint():
        save_checkpoint(
            path,
            {
                "format": "ddpm_fast.digits/1",
                "unet": cfg,
                "timesteps": timesteps,
                "step": step,
                "losses": losses,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(),
            },
        )

    model.train()
    while step < steps:
        idx = torch.randint(0, len(data), (batch_size,))
        loss = diffusion.loss(data[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % checkpoint_every == 0 or step == steps:
            checkpoint()
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
            checkpoint()
            break
    bar.close()
    plot_losses(losses, os.path.join(out_dir, "loss.png"))
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
    fig.savefig(path, dpi=120)
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
