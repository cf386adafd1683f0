"""CUDA-graph sampling: one reverse step (U-Net forward + the fused Triton step) captured once, replayed per step.

A captured graph replays fixed kernel arguments, so no value of a step may come from the host. Before capture,
every step's timestep and coefficient row (the float64 -> fp32 numbers ``ops.ddpm_step``/``ops.ddim_step``
use) go to tables on the device; the step index is a device tensor that the graph advances itself, and the
Triton step kernel reads t and its coefficients from memory. A replay is then the whole step: index the tables,
U-Net, fused update with keyed noise (which is keyed by the t read from memory, so the images equal the eager
sampler's). Without CUDA (``capture=False``, e.g. under ``TRITON_INTERPRET=1`` in the tests) the same body runs
eagerly, which checks the tables and the kernel path on the CPU.

What a replay may touch: every tensor the graph recorded must stay allocated for as long as the graph replays.
The sampler's own tensors (tables, step index, x, t) live as long as it does; the U-Net's reused intermediates
(``ops.Scratch``) are never freed once handed out during a capture; the model's parameters and the
weights derived from them (the attention block's stacked projection) are checked before each sample: when one
was replaced or changed in place since the capture, the step is captured again rather than replayed on freed or
stale memory.
"""

from __future__ import annotations

import itertools

import torch

from .ops import _checks as C
from .ops._trace import record
from .reference import ddim_coefficients, step_coefficients
from .reference.noise import STREAM_X_T


class GraphedSampler:
    """Sampling of ``diffusion`` at a fixed batch/shape/step sequence with keyed noise, one graph per step.

    Build once (tables, warm-up, capture), then :meth:`sample` for any seed and sample offset; each call replays
    the captured step ``len(timesteps)`` times.
    """

    def __init__(
        self,
        diffusion,
        n: int,
        shape,
        timesteps,
        *,
        method="ddpm",
        eta=0.0,
        device=None,
        dtype=None,
        capture: bool | None = None,
    ):
        from .kernels import ddpm_step as tk

        self._tk = tk
        self.diffusion, self.model = diffusion, diffusion.model
        self.device = torch.device(device if device is not None else "cuda")
        self.dtype = dtype or torch.float32
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"capture: CUDA graphs need a CUDA device, got {self.device}")
        self.n, self.shape = int(n), tuple(shape)
        self.op = "ddim_step" if method == "ddim" else "ddpm_step"  # the public op the kernel serves (ops.trace)
        self.timesteps = [int(t) for t in timesteps]
        s, d = diffusion.schedule, diffusion
        rows = []
        for i, t in enumerate(self.timesteps):
            tt = torch.tensor([t])
            tp = torch.tensor([self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1])
            if method == "ddim":
                k = ddim_coefficients(tt, tp, s, d.prediction_type, float(eta))
            else:
                k = step_coefficients(tt, tp, s, d.prediction_type, d.variance_type)
            rows.append(tk.coefficient_table(k))
        self.coef_table = torch.cat(rows).to(self.device)  # (S, 9) fp32
        self.t_table = torch.tensor(self.timesteps, dtype=torch.int64, device=self.device)  # (S,)
        self.index = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.coef = torch.empty(self.n, 9, dtype=torch.float32, device=self.device)
        self.t = torch.empty(self.n, dtype=torch.int64, device=self.device)
        self.x = torch.empty((self.n, *self.shape), dtype=self.dtype, device=self.device)
        self.graph = None
        self._key = None

    def _weights_key(self) -> tuple:
        """Storage and in-place version of each of the model's parameters and buffers (inference tensors carry no
        version: an in-place change to one inside inference_mode goes unseen)."""
        m = self.model
        if not hasattr(m, "parameters"):
            return ()
        tensors = itertools.chain(m.parameters(), m.buffers() if hasattr(m, "buffers") else ())
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)

    def _body(self, seed: int, sample_offset: int) -> None:
        """One step, device values only: the capturable unit."""
        self.coef.copy_(self.coef_table.index_select(0, self.index).expand(self.n, 9))
        self.t.copy_(self.t_table.index_select(0, self.index).expand(self.n))
        self.index.add_(1)
        m = self.model(self.x, self.t)
        d = self.diffusion
        record(self.op, "triton", "triton")  # the launcher is called directly: the step's values stay on the device
        self._tk.ddpm_step(
            self.x,
            m,
            None,
            self.x,
            None,
            self.coef,
            self.t,
            seed,
            sample_offset,
            d.clip_sample,
            d.clip_range,
            False,
            noise_mode=self._tk.NOISE_KEYED,
        )

    @torch.inference_mode()
    def sample(self, *, seed: int, sample_offset: int = 0) -> torch.Tensor:
        """x_0 of samples sample_offset .. sample_offset + n - 1 under ``seed`` (same images as the eager sampler)."""
        from . import ops

        seed = C.seed_value(seed)
        sample_offset = C.sample_offset(sample_offset, self.n)
        x_T = ops.keyed_normal(
            (self.n, *self.shape),
            seed=seed,
            stream=STREAM_X_T,
            sample_offset=sample_offset,
            dtype=self.dtype,
            device=self.device,
            backend="triton",
        )
        if not self.capture:
            self.index.zero_()
            self.x.copy_(x_T)
            for _ in self.timesteps:
                self._body(seed, sample_offset)
            return self.x.clone()
        # the noise key enters the kernel as arguments: capture per key; and again when a weight changed
        key = (seed, sample_offset, self._weights_key())
        if self.graph is None or self._key != key:
            self._capture(seed, sample_offset, x_T)
            self._key = key
        self.index.zero_()
        self.x.copy_(x_T)
        for _ in self.timesteps:
            self.graph.replay()
        return self.x.clone()

    def _capture(self, seed: int, sample_offset: int, x_T: torch.Tensor) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuDNN/cuBLAS pick algorithms and workspaces
            for _ in range(2):
                self.index.zero_()
                self.x.copy_(x_T)
                self._body(seed, sample_offset)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.index.zero_()
        with torch.cuda.graph(self.graph):
            self._body(seed, sample_offset)
