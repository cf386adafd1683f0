"""GaussianDiffusion: DDPM training (Algorithm 1) and sampling (Algorithm 2) of Ho et al. 2020 on fused ops."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import ops
from .ops import _checks as C
from .reference.noise import STREAM_X_T
from .schedule import NoiseSchedule

METHODS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m", "unipc")
MULTISTEP = ("dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m")  # ops.dpmpp_step with a history of data predictions
ODES = ("dpmpp_2m", "dpmpp_3m", "unipc")  # no noise after x_T


class NonFiniteSampleError(FloatingPointError):
    """A sampling chain produced NaN or inf (broken weights, or an overflow in a low-precision dtype).

    ``step``: the chain step (1-based) where it first appeared, ``timestep``: its t, ``where``: "model output" or
    "x_t"; None when only the result was checked (``cuda_graph=True``).
    """

    def __init__(self, message: str, step: int | None = None, timestep: int | None = None, where: str | None = None):
        super().__init__(message)
        self.step, self.timestep, self.where = step, timestep, where


def _model_in_eval_mode(method):
    """Run ``method`` with ``self.model`` in eval mode (dropout off), restoring its mode after: sampling is
    inference, and keyed noise promises the same images whatever mode the model was left in."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        model = self.model
        training = bool(getattr(model, "training", False))
        with contextlib.ExitStack() as stack:
            if training:
                model.eval()
                stack.callback(model.train)
            return method(self, *args, **kwargs)

    return wrapper


class GaussianDiffusion:
    """A denoiser ``model(x_t, t) -> epsilon`` (or x_0 / v) with a fixed noise schedule.

    ``backend`` picks the kernels of the noising and reverse-step ops (None: the fastest available).
    Sampling defaults follow diffusers' DDPMScheduler: fixed_small variance, x_0 clipped to [-1, 1].
    """

    def __init__(
        self,
        model,
        schedule: NoiseSchedule | None = None,
        *,
        backend: str | None = None,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        clip_range: float = 1.0,
    ):
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x_t, t), got {type(model).__name__}")
        self.model = model
        self.schedule = C.schedule(schedule if schedule is not None else NoiseSchedule.linear())
        self.backend = ops.check_backend(backend)
        self.prediction_type = C.choice("prediction_type", prediction_type, C.PREDICTION_TYPES)
        self.variance_type = C.choice("variance_type", variance_type, C.VARIANCE_TYPES)
        self.clip_sample = bool(clip_sample)
        self.clip_range = C.number("clip_range", clip_range, positive=True)

    @property
    def num_timesteps(self) -> int:
        return len(self.schedule)

    # ------------------------------------------------------------------ Algorithm 1
    def loss(self, x0: torch.Tensor, t=None, *, seed=None, generator=None) -> torch.Tensor:
        """L_simple = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2, t ~ Uniform.

        eps is drawn inside the fused noising kernel (keyed by ``seed``; None takes one from torch's generator).
        """
        x0 = C.tensor("x0", x0, min_dim=2)
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device="cpu").to(x0.device)
        x_t, eps = ops.q_sample(x0, t, None, self.schedule, seed=seed, backend=self.backend)
        target = {"epsilon": eps, "sample": x0}.get(self.prediction_type)
        if target is None:  # v = sqrt(abar) eps - sqrt(1 - abar) x0
            abar = self.schedule.alphas_cumprod.to(x0.device)[torch.as_tensor(t, device=x0.device).expand(B)]
            abar = abar.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
            target = abar.sqrt() * eps - (1 - abar).sqrt() * x0
        return F.mse_loss(self.model(x_t, t), target)

    def _graphed(self, full, timesteps, method, eta, device, dtype, capture=None):
        from .graphs import GraphedSampler

        key = (full, tuple(timesteps), method, float(eta), str(device), dtype, capture)
        cache = self.__dict__.setdefault("_graph_cache", {})
        if key not in cache:
            cache.clear()  # one captured graph at a time: each holds its own activation memory
            cache[key] = GraphedSampler(
                self, full[0], full[1:], timesteps, method=method, eta=eta, device=device, dtype=dtype, capture=capture
            )
        return cache[key]

    # ------------------------------------------------------------------ Algorithm 2
    def _unipc_step(self, x, model_output, timesteps, i, x0s, last, orders, order=2, solver_type="bh2"):
        """Step i of the UniPC chain in place: x becomes x_{t_next}, x0s[i % 2] this step's D0 (over D2), last the
        corrected sample. ``orders``: the predictor orders so far (the corrector's order is the previous step's)."""
        from .reference.unipc_step import unipc_coefficients

        n = len(timesteps)
        t_next = timesteps[i + 1] if i + 1 < n else -1
        p = min(order, n - i, i + 1)  # lower_order_final and the warm-up, as diffusers' step
        c = orders[-1] if i > 0 else 0
        # every sample is at the same t: one row for all (its float64 terms are computed row by row)
        full = [torch.full((1,), v) for v in (timesteps[i], t_next, *timesteps[max(0, i - 2) : i][::-1])]
        row = unipc_coefficients(full[0], full[1], self.schedule, self.prediction_type, full[2:], p, c, solver_type)
        history = tuple(x0s[(i - j) % 2] for j in range(1, min(i, 2) + 1))  # D1, D2 newest first
        ops.unipc_step(
            x, model_output, row[0].to(torch.float32), history, last if c else None, backend=self.backend, out=x,
            x0_out=x0s[i % 2], sample_out=last,
        )  # fmt: skip
        orders.append(p)

    @_model_in_eval_mode
    @torch.inference_mode()
    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        shape: tuple[int, ...] | None = None,
        sample_offset: int = 0,
        device=None,
        dtype=None,
        progress: bool = True,
        steps: int | None = None,
        method: str = "ddpm",
        eta: float = 0.0,
        cuda_graph: bool = False,
        check_finite: bool = True,
    ) -> torch.Tensor:
        """Draw ``n`` samples by running the reverse chain from x_T ~ N(0, I) down to x_0.

        ``steps``: run a subsequence of that many timesteps (diffusers' "leading" spacing: 0, T/steps, ...) with
        the step's own alpha recomputed from abar (respacing, Nichol & Dhariwal 2021); ``method`` "ddpm" (the
        posterior of the respaced chain), "ddim" (Song et al. 2021, ``eta`` = 0 deterministic), "dpmpp_2m"
        (DPM-Solver++(2M), Lu et al. 2022: :func:`ddpm_fast.ops.dpmpp_step`, first order at the first and the last
        step as diffusers' DPMSolverMultistepScheduler runs it; an ODE solver: no noise after x_T, and
        ``clip_sample`` does not apply), "dpmpp_3m" (DPM-Solver++(3M): orders 1, 2, then 3, as diffusers'
        ``solver_order=3`` with ``lower_order_final``: the last step first order, the one before it at most second
        order below 15 steps) or "sde_dpmpp_2m" (SDE-DPM-Solver++(2M), midpoint, diffusers' "sde-dpmsolver++": the
        same noise as "ddpm", keyed or from the generator, enters every step but the last) or "unipc" (UniPC,
        Zhao et al. 2023, as diffusers' UniPCMultistepScheduler defaults: bh2, order 2, the corrector UniC at every
        step after the first, the last step first order: :func:`ddpm_fast.ops.unipc_step`).

        With ``seed`` (or neither seed nor generator: a seed from torch's generator), x_T and every z come from the
        keyed generator, so sample i depends only on (seed, sample_offset + i): ``sample(8, seed=s)[:4]`` equals
        ``sample(4, seed=s)``, on any backend. With ``generator``, noise is drawn with torch.randn in order.

        ``cuda_graph``: on CUDA, capture one step (U-Net + fused Triton step) in a CUDA graph and replay it per
        step (:class:`ddpm_fast.graphs.GraphedSampler`, cached per batch/shape/steps); keyed noise only, same images.

        ``check_finite`` (default True): raise :class:`NonFiniteSampleError` when the model output or x_t holds NaN
        or inf, naming the first step (1-based, and its t) where it did. Each step's check runs on the device and
        is read back once, after the chain (no per-step synchronisation); with ``cuda_graph`` only the result is
        checked. ``check_finite=False`` returns whatever the chain gives.

        ``dtype``: the chain's (x_t's) and the result's; by default the model's, but float32 for a bf16 or fp16
        model: x_t stays in fp32 and each step casts it for the model and the model's output back.

        The model runs in eval mode (dropout off) and is returned to the mode it was in.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        if seed is not None and generator is not None:
            raise ValueError("seed, generator: give one of them, not both")
        param = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        device = C.device("device", device) if device is not None else (param.device if param is not None else "cpu")
        model_dtype = param.dtype if param is not None else torch.float32
        # a half-precision model gets the chain in fp32: each step's x_t is cast for the model, its output back
        dtype = dtype or (torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype)
        if shape is None:
            if not hasattr(self.model, "in_channels") or not hasattr(self.model, "sample_size"):
                raise ValueError("shape: the model has no in_channels/sample_size; pass shape=(C, H, W)")
            shape = (self.model.in_channels, self.model.sample_size, self.model.sample_size)
        full = (int(n), *shape)
        sample_offset = C.sample_offset(sample_offset, n)
        C.choice("method", method, METHODS)
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta: expected a finite number >= 0, got {eta!r}")
        T = self.num_timesteps
        if steps is None:
            timesteps = list(range(T - 1, -1, -1))
        else:
            if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= T:
                raise ValueError(f"steps: expected an int in [1, {T}], got {steps!r}")
            timesteps = [i * (T // steps) for i in range(steps)][::-1]

        if cuda_graph:
            if generator is not None:
                raise ValueError("cuda_graph: needs keyed noise (seed), not a generator")
            if device.type != "cuda":
                raise ValueError(f"cuda_graph: needs a CUDA device, got {device}")
            if method in (*MULTISTEP, "unipc"):
                raise ValueError(f"cuda_graph: runs the ddpm and ddim methods, not {method}")
            x = self._graphed(full, timesteps, method, eta, device, dtype).sample(
                seed=C.seed_value(seed), sample_offset=sample_offset
            )
            if check_finite and not bool(torch.isfinite(x).all()):
                raise NonFiniteSampleError(
                    f"sample: the result of the {len(timesteps)}-step chain holds NaN or inf (cuda_graph: steps not "
                    "checked one by one; sample without it to find the step)"
                )
            return x
        if generator is None:
            seed = C.seed_value(seed)
            x = ops.keyed_normal(
                full,
                seed=seed,
                stream=STREAM_X_T,
                sample_offset=sample_offset,
                dtype=dtype,
                device=device,
                backend=self.backend,
            )
            z = None
        else:
            x = torch.randn(full, generator=generator, device=device, dtype=dtype)
            z = None if method in ODES else torch.empty_like(x)
        # the last steps' data predictions, in place: step i reads D1 = x0s[(i - 1) % 2] (and D2 = x0s[i % 2]) and
        # writes its D0 over the oldest
        x0s = [torch.empty_like(x), torch.empty_like(x)] if method in MULTISTEP else None
        order = {"dpmpp_2m": 2, "dpmpp_3m": 3, "sde_dpmpp_2m": 2}.get(method, 0)
        if method == "unipc":  # D1, D2 (the corrector of order 2 reads both) and the corrected sample
            x0s, last = [torch.empty_like(x), torch.empty_like(x)], torch.empty_like(x)
            unipc_orders = []
        model_in = x if model_dtype == x.dtype else torch.empty_like(x, dtype=model_dtype)
        t_batch = torch.empty(n, dtype=torch.int64, device=device)
        # per step: model output finite, x_t finite; written on the device, read once after the chain
        finite = torch.ones(len(timesteps), 2, dtype=torch.bool, device=device) if check_finite else None
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            if model_in is not x:
                model_in.copy_(x)
            model_output = self.model(model_in, t_batch.fill_(t))
            if model_output.dtype != x.dtype:
                model_output = model_output.to(x.dtype)
            if finite is not None:
                finite[i, 0] = torch.isfinite(model_output).all()
            if z is not None and t > 0:
                torch.randn(full, generator=generator, device=device, dtype=dtype, out=z)
            if method in MULTISTEP:
                # diffusers' order: one more each step up to the solver's, the last step first order (t_prev = -1
                # is), the one before it at most second order below 15 steps (lower_order_final)
                k = min(order, i + 1, 2 if i == len(timesteps) - 2 and len(timesteps) < 15 else order)
                ops.dpmpp_step(
                    x,
                    model_output,
                    t,
                    t_prev,
                    self.schedule,
                    x0s[(i - 1) % 2] if k >= 2 else None,
                    timesteps[i - 1] if k >= 2 else None,
                    x0_last2=x0s[i % 2] if k == 3 else None,
                    t_last2=timesteps[i - 2] if k == 3 else None,
                    sde=method == "sde_dpmpp_2m",
                    noise=z if method == "sde_dpmpp_2m" and generator is not None else None,
                    seed=seed,
                    sample_offset=sample_offset,
                    prediction_type=self.prediction_type,
                    backend=self.backend,
                    out=x,
                    x0_out=x0s[i % 2],
                )
            elif method == "unipc":
                self._unipc_step(x, model_output, timesteps, i, x0s, last, unipc_orders)
            elif method == "ddim":
                ops.ddim_step(
                    x,
                    model_output,
                    t,
                    t_prev,
                    self.schedule,
                    z,
                    eta=eta,
                    seed=seed,
                    sample_offset=sample_offset,
                    prediction_type=self.prediction_type,
                    clip_sample=self.clip_sample,
                    clip_range=self.clip_range,
                    backend=self.backend,
                    out=x,
                )
            else:
                ops.ddpm_step(
                    x,
                    model_output,
                    t,
                    self.schedule,
                    z,
                    seed=seed,
                    sample_offset=sample_offset,
                    variance_type=self.variance_type,
                    prediction_type=self.prediction_type,
                    clip_sample=self.clip_sample,
                    clip_range=self.clip_range,
                    t_prev=t_prev,
                    backend=self.backend,
                    out=x,  # in place: the chain reuses one buffer for x_t
                )
            if finite is not None:
                finite[i, 1] = torch.isfinite(x).all()
        if finite is not None and not bool(finite.all()):
            i, which = (~finite).nonzero()[0].tolist()
            where = ("model output", "x_t")[which]
            raise NonFiniteSampleError(
                f"sample: the {where} holds NaN or inf at step {i + 1} of {len(timesteps)} (t={timesteps[i]}); "
                + ("the model gives non-finite values (broken weights?)" if which == 0 else "the chain overflowed"),
                step=i + 1,
                timestep=timesteps[i],
                where=where,
            )
        return x
