"""Drop-ins for diffusers: FusedDDPMScheduler, FusedDDIMScheduler, FusedDPMSolverMultistepScheduler,
FusedUniPCMultistepScheduler and accelerate()/deaccelerate().

FusedDDPMScheduler is diffusers' DDPMScheduler (same constructor, config, save/load, set_timesteps,
scale_model_input, previous_timestep, custom timesteps) whose ``step`` and ``add_noise`` run ddpm_fast's fused
kernels. Each step's scalar coefficients are computed from diffusers' own float32 ``alphas_cumprod`` in
diffusers' order of operations and handed to the kernel, and the noise is drawn exactly as diffusers draws it
(``randn_tensor`` with the generator), so results match diffusers up to the kernel's rounding. What it cannot
fuse (thresholding, learned or log variances) runs diffusers' own code; ``unfused_reason`` says why.

FusedDDIMScheduler is diffusers' DDIMScheduler whose ``step`` runs the fused reverse-step kernel with DDIM's
coefficient table (eta, use_clipped_model_output, the three prediction types, clip_sample), the coefficients computed
from diffusers' own float32 ``alphas_cumprod`` and ``final_alpha_cumprod`` in its order of operations, and the noise
(eta > 0) drawn as diffusers draws it or taken from ``variance_noise``; thresholding runs diffusers' code.

FusedDPMSolverMultistepScheduler is diffusers' DPMSolverMultistepScheduler whose ``step`` runs the fused
DPM-Solver++ step (ops.dpmpp_step: the data prediction and the multistep update in one pass) for
``algorithm_type`` "dpmsolver++" and "sde-dpmsolver++", ``solver_order`` 1, 2 or 3, either solver type and any of
diffusers' sigma schedules, with coefficients computed from diffusers' own float32 sigmas in its order of operations
and the SDE's noise drawn as diffusers draws it.

FusedUniPCMultistepScheduler is diffusers' UniPCMultistepScheduler whose ``step`` runs the corrector UniC and the
predictor UniP in one fused pass (ops.unipc_step) for ``predict_x0=True``, bh1 and bh2, orders 1 to 3.

accelerate() swaps a pipeline's U-Net and scheduler for ddpm_fast's, or raises AccelerateError saying what it cannot
swap (strict, the default); it returns an AccelerateReport.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch

from .. import ops
from ..models.loading import config_from_diffusers
from ..models.unet import UNet
from ..ops import _checks as C
from ..schedule import NoiseSchedule

log = logging.getLogger("ddpm_fast")

try:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - diffusers is an optional dependency
    raise ImportError("ddpm_fast.integrations.diffusers needs diffusers: pip install diffusers") from e

_FUSED_VARIANCES = ("fixed_small", "fixed_large")


def _nonfinite(t: int) -> str:
    return f"timestep {t}: non-finite coefficients (abar underflows at these betas); diffusers' own inf/nan maths runs"


def _tensors_unfused_reason(model_output: torch.Tensor, sample: torch.Tensor) -> str | None:
    """Why a step's tensors are not ones the fused step kernels take (None: they are)."""
    if model_output.shape != sample.shape:
        return f"model_output: shape {tuple(model_output.shape)} differs from the sample's {tuple(sample.shape)}"
    if model_output.dtype != sample.dtype:
        return f"model_output: dtype {model_output.dtype} differs from the sample's {sample.dtype}"
    if sample.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"sample: dtype {sample.dtype}; the kernel takes float32, float16 or bfloat16"
    if sample.dim() < 1:
        return "sample: a 0-d tensor"
    return None


class FusedDDPMScheduler(DDPMScheduler):
    """diffusers.DDPMScheduler with ``step`` and ``add_noise`` on ddpm_fast's fused kernels.

    ``use_keyed_noise(seed)`` switches ``step`` from diffusers' generator noise to ddpm_fast's in-kernel keyed
    noise (Philox, stream 0; sample i of the batch is global sample ``sample_offset + i``).
    """

    backend: str | None = None
    _keyed_seed: int | None = None
    _sample_offset: int = 0

    def use_keyed_noise(self, seed: int | None, sample_offset: int = 0) -> FusedDDPMScheduler:
        """seed=None returns to drawing noise as diffusers does."""
        self._keyed_seed, self._sample_offset = seed, sample_offset
        return self

    # ------------------------------------------------------------------ helpers
    def _schedule(self) -> NoiseSchedule | None:
        """A ddpm_fast schedule of these betas, or None when they are not a valid schedule (betas outside (0, 1]:
        diffusers accepts them and its own code then runs)."""
        cached = self.__dict__.get("_df_schedule")
        if cached is None or cached[0] is not self.betas:
            try:
                schedule = NoiseSchedule.from_betas(self.betas)
            except ValueError:
                schedule = None
            cached = (self.betas, schedule)
            self.__dict__["_df_schedule"] = cached
        return cached[1]

    def config_unfused_reason(self) -> str | None:
        """None when this configuration's steps can run the fused kernel, else why they all run diffusers' code."""
        if self.config.thresholding:
            return "thresholding=True: dynamic thresholding (per-sample quantiles) runs diffusers' code"
        if self.variance_type not in _FUSED_VARIANCES:
            return f"variance_type={self.variance_type!r}: the kernel takes {' or '.join(_FUSED_VARIANCES)}"
        if self._schedule() is None:
            return "betas: not a valid schedule (outside (0, 1]); diffusers' own maths runs"
        return None

    def unfused_reason(self, model_output: torch.Tensor, sample: torch.Tensor, timestep=None) -> str | None:
        """None when ``step(model_output, timestep, sample)`` runs the fused ddpm_step kernel, else why it runs
        diffusers' code instead (the configuration, these tensors, or with ``timestep`` that step's coefficients)."""
        why = self.config_unfused_reason()
        if why is not None:
            return why
        why = _tensors_unfused_reason(model_output, sample)
        if why is not None:
            return why
        if timestep is not None:
            t = int(C.timesteps(timestep, 1, self.config.num_train_timesteps, "cpu", name="timestep")[0])
            if not torch.isfinite(self._step_coefficients(t, int(self.previous_timestep(t)))).all():
                return _nonfinite(t)
        return None

    def _step_coefficients(self, t: int, prev_t: int) -> torch.Tensor:
        """[px, pm, q, c0, c1, cm, sigma] in float32, computed as DDPMScheduler.step computes its terms."""
        acp = self.alphas_cumprod
        alpha_prod_t = acp[t]
        alpha_prod_t_prev = acp[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        pt = self.config.prediction_type
        one, zero = torch.ones_like(alpha_prod_t), torch.zeros_like(alpha_prod_t)
        if pt == "epsilon":  # (sample - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
            px, pm, q = one, -(beta_prod_t**0.5), 1 / alpha_prod_t**0.5
        elif pt == "sample":
            px, pm, q = zero, one, one
        elif pt == "v_prediction":  # alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * v
            px, pm, q = alpha_prod_t**0.5, -(beta_prod_t**0.5), one
        else:
            raise ValueError(f"prediction_type given as {pt} must be one of `epsilon`, `sample` or `v_prediction`")
        c0 = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        c1 = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        sigma = self._get_variance(t) ** 0.5 if t > 0 else torch.zeros_like(alpha_prod_t)
        return torch.stack([px, pm, q, c0, c1, zero, sigma]).to(torch.float32).view(1, 7)

    # ------------------------------------------------------------------ diffusers API
    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        n = self.config.num_train_timesteps  # an out-of-range, meta or unsigned timestep: a clear error, never an index
        data = ("sample", sample.device) if isinstance(sample, torch.Tensor) else None
        t = int(C.timesteps(timestep, 1, n, "cpu", name="timestep", data=data)[0])
        why = self.unfused_reason(model_output, sample)
        if why is None:
            coefficients = self._step_coefficients(t, int(self.previous_timestep(t)))
            if not torch.isfinite(coefficients).all():
                why = _nonfinite(t)
        if why is not None:
            log.debug("ddpm_fast: FusedDDPMScheduler.step runs diffusers' code (%s)", why)
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        B = sample.shape[0]
        coefficients = coefficients.expand(B, 7)
        noise, seed = None, None
        if t > 0:
            if self._keyed_seed is None:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            else:
                seed = self._keyed_seed
        else:
            noise = torch.zeros_like(sample)
        pred_original_sample = torch.empty_like(sample)
        prev_sample = ops.ddpm_step(
            sample,
            model_output,
            t,
            self._schedule(),
            noise,
            seed=seed,
            sample_offset=self._sample_offset,
            variance_type=self.variance_type,
            prediction_type=self.config.prediction_type,
            clip_sample=bool(self.config.clip_sample),
            clip_range=float(self.config.clip_sample_range),
            coefficients=coefficients,
            backend=self.backend,
            x0_out=pred_original_sample,
        )
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        fusable = (
            original_samples.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and noise.shape == original_samples.shape
            and noise.dtype == original_samples.dtype
            and original_samples.dim() >= 1
            and self._schedule() is not None
        )
        if isinstance(timesteps, torch.Tensor) or not isinstance(timesteps, (list, tuple)):
            batch = timesteps.numel() if isinstance(timesteps, torch.Tensor) and timesteps.dim() else 1
            n = self.config.num_train_timesteps
            data = ("original_samples", original_samples.device)
            t = C.timesteps(timesteps, batch, n, "cpu", name="timesteps", data=data)
        else:
            t = torch.as_tensor(timesteps, device="cpu").to(torch.int64).reshape(-1)
        if not fusable or t.numel() not in (1, original_samples.shape[0]):
            return super().add_noise(original_samples, noise, timesteps)
        B = original_samples.shape[0]
        acp = self.alphas_cumprod  # float32, as diffusers' add_noise uses it
        sqrt_alpha_prod = acp[t] ** 0.5
        sqrt_one_minus_alpha_prod = (1 - acp[t]) ** 0.5
        coefficients = torch.stack([sqrt_alpha_prod, sqrt_one_minus_alpha_prod], dim=1).float().expand(B, 2)
        return ops.q_sample(
            original_samples, t.expand(B), noise, self._schedule(), coefficients=coefficients, backend=self.backend
        )


class FusedDDIMScheduler(DDIMScheduler):
    """diffusers.DDIMScheduler with ``step`` on ddpm_fast's fused reverse-step kernel (DDIM's coefficient table).

    Fused: prediction_type epsilon / sample / v_prediction, any eta >= 0, use_clipped_model_output, clip_sample with
    its range, every timestep spacing, steps_offset and set_alpha_to_one, and model output and sample of one shape
    and dtype (fp32/fp16/bf16). Thresholding runs diffusers' own ``step`` (``unfused_reason`` says why); after each
    step ``fused`` says which ran. With eta > 0 the noise is ``variance_noise`` or drawn exactly as diffusers draws it
    (``randn_tensor`` with the generator, at every step, the last included), so the images match diffusers';
    ``use_keyed_noise(seed)`` switches to ddpm_fast's in-kernel keyed noise instead.
    """

    backend: str | None = None
    fused: bool | None = None  # whether the last step ran the fused kernel (None before the first)
    _keyed_seed: int | None = None
    _sample_offset: int = 0
    _schedule = FusedDDPMScheduler._schedule
    use_keyed_noise = FusedDDPMScheduler.use_keyed_noise

    def config_unfused_reason(self) -> str | None:
        """None when this configuration's steps can run the fused kernel, else why they all run diffusers' code."""
        c = self.config
        if c.thresholding:
            return "thresholding=True: dynamic thresholding (per-sample quantiles) runs diffusers' code"
        if c.prediction_type not in C.PREDICTION_TYPES:
            return f"prediction_type={c.prediction_type!r}: the kernel takes {', '.join(C.PREDICTION_TYPES)}"
        if self._schedule() is None:
            return "betas: not a valid schedule (outside (0, 1]); diffusers' own maths runs"
        return None

    def unfused_reason(self, model_output: torch.Tensor, sample: torch.Tensor, timestep=None, eta=0.0) -> str | None:
        """None when ``step(model_output, timestep, sample, eta)`` runs the fused kernel, else why it runs diffusers'
        code instead (the configuration, these tensors, or with ``timestep`` that step's coefficients)."""
        why = self.config_unfused_reason()
        if why is not None:
            return why
        why = _tensors_unfused_reason(model_output, sample)
        if why is not None:
            return why
        if timestep is not None and self.num_inference_steps is not None:
            t = int(C.timesteps(timestep, 1, self.config.num_train_timesteps, "cpu", name="timestep")[0])
            if not torch.isfinite(self._ddim_coefficients(t, _eta(eta), False)).all():
                return _nonfinite(t)
        return None

    def _ddim_coefficients(self, t: int, eta: float, use_clipped_model_output: bool) -> torch.Tensor:
        """(1, 7) [px, pm, q, c0, c1, cm, sigma]: each term computed as DDIMScheduler.step computes it (float32),
        the products that fold two of its terms into one coefficient taken in float64."""
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        std_dev_t = eta * self._get_variance(t, prev_t) ** 0.5
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5  # times pred_epsilon
        a, b = (alpha_prod_t**0.5).double(), (beta_prod_t**0.5).double()
        d = direction.double()
        one, zero = torch.ones_like(d), torch.zeros_like(d)
        c0 = (alpha_prod_t_prev**0.5).double()
        pt = self.config.prediction_type
        if pt == "epsilon":  # x0 = (sample - beta_prod_t ** 0.5 * m) / alpha_prod_t ** 0.5, eps = m
            px, pm, q = one, -b, 1 / a
            c1, cm = zero, d
        elif pt == "sample":  # x0 = m, eps = (sample - alpha_prod_t ** 0.5 * m) / beta_prod_t ** 0.5
            px, pm, q = zero, one, one
            c1, cm = d / b, -d * a / b
        else:  # v_prediction: x0 = a sample - b m, eps = a m + b sample
            px, pm, q = a, -b, one
            c1, cm = d * b, d * a
        if use_clipped_model_output:  # eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5, x0 clipped
            c0, c1, cm = c0 - d * a / b, d / b, zero
        sigma = std_dev_t.double() if eta > 0 else zero
        return torch.stack([px, pm, q, c0, c1, cm, sigma]).to(torch.float32).view(1, 7)

    # ------------------------------------------------------------------ diffusers API
    def step(
        self,
        model_output,
        timestep,
        sample,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise=None,
        return_dict: bool = True,
    ):
        eta = _eta(eta)
        if use_clipped_model_output is None:  # DDIMPipeline's default
            use_clipped_model_output = False
        if not isinstance(use_clipped_model_output, bool):
            name = type(use_clipped_model_output).__name__
            raise TypeError(f"use_clipped_model_output: expected a bool, got {name}")
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("generator, variance_noise: give one of them, not both (diffusers' rule)")
        why = self.unfused_reason(model_output, sample)
        if why is None and self.num_inference_steps is None:
            why = "set_timesteps has not run (diffusers' step raises)"
        if why is None and eta > 0 and variance_noise is not None:
            why = _noise_unfused_reason(variance_noise, sample)
        if why is None:
            n = self.config.num_train_timesteps  # an out-of-range, meta or unsigned timestep: a clear error
            t = int(C.timesteps(timestep, 1, n, "cpu", name="timestep", data=("sample", sample.device))[0])
            coefficients = self._ddim_coefficients(t, eta, use_clipped_model_output)
            if not torch.isfinite(coefficients).all():
                why = _nonfinite(t)
        self.fused = why is None
        if not self.fused:
            log.debug("ddpm_fast: FusedDDIMScheduler.step runs diffusers' code (%s)", why)
            kwargs = dict(eta=eta, use_clipped_model_output=use_clipped_model_output, generator=generator)
            return super().step(
                model_output, timestep, sample, variance_noise=variance_noise, return_dict=return_dict, **kwargs
            )
        noise, seed = variance_noise, None
        if eta == 0:  # sigma = 0: the kernel draws nothing (diffusers draws nothing either)
            noise, seed = None, 0
        elif noise is None and self._keyed_seed is not None:
            seed = self._keyed_seed
        elif noise is None:  # drawn at every step, the last included, as diffusers draws it
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        pred_original_sample = torch.empty_like(sample)
        prev_sample = ops.ddpm_step(
            sample,
            model_output,
            t,
            self._schedule(),
            noise,
            seed=seed,
            sample_offset=self._sample_offset,
            prediction_type=self.config.prediction_type,
            clip_sample=bool(self.config.clip_sample),
            clip_range=float(self.config.clip_sample_range),
            coefficients=coefficients.expand(sample.shape[0], 7),
            backend=self.backend,
            x0_out=pred_original_sample,
        )
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


def _eta(eta) -> float:
    """DDIM's eta as a float: a finite number >= 0 (diffusers takes a Python number)."""
    if isinstance(eta, torch.Tensor) and eta.numel() == 1 and eta.device.type != "meta":
        eta = eta.item()
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta: expected a number, got {type(eta).__name__}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a finite number >= 0, got {eta!r}")
    return float(eta)


def _noise_unfused_reason(variance_noise, sample: torch.Tensor) -> str | None:
    """Why a given variance_noise is not one the kernel takes as z (None: it is; else diffusers' code broadcasts)."""
    if not isinstance(variance_noise, torch.Tensor):
        return f"variance_noise: a {type(variance_noise).__name__}, not a tensor"
    if variance_noise.shape != sample.shape or variance_noise.dtype != sample.dtype:
        got = f"{tuple(variance_noise.shape)} {variance_noise.dtype}"
        return f"variance_noise: {got} differs from the sample's {tuple(sample.shape)} {sample.dtype}"
    if variance_noise.device != sample.device:
        return f"variance_noise: on {variance_noise.device}, the sample on {sample.device}"
    return None


def _check_multistep_config(config, num_inference_steps, solver: str) -> None:
    """What a multistep scheduler's set_timesteps takes silently: a solver order outside 1-3 and more inference
    steps than the training schedule has timesteps."""
    order = config.solver_order
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"solver_order: {solver} has orders 1, 2 and 3, got {order!r}")
    n = config.num_train_timesteps
    if num_inference_steps is not None and not (
        isinstance(num_inference_steps, numbers.Integral) and not isinstance(num_inference_steps, bool)
        and 1 <= num_inference_steps <= n
    ):  # fmt: skip
        raise ValueError(
            f"num_inference_steps: expected an int in [1, {n}] (num_train_timesteps), got {num_inference_steps!r}"
        )


class FusedDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """diffusers.DPMSolverMultistepScheduler with ``step`` on ddpm_fast's fused DPM-Solver++ step.

    Fused: ``algorithm_type`` "dpmsolver++" or "sde-dpmsolver++", ``solver_order`` 1, 2 or 3 (with diffusers'
    lower-order warm-up and final steps), ``solver_type`` "midpoint" or "heun", prediction_type epsilon / sample /
    v_prediction, no thresholding, no learned variance, no flow sigmas, and model output and sample of one shape and
    dtype (fp32/fp16/bf16). The SDE's noise is drawn as diffusers draws it (``randn_tensor`` with the generator) or
    taken from ``variance_noise``; ``use_keyed_noise(seed)`` draws it in the kernel instead (Philox, stream 0 at the
    step's timestep; sample i of the batch is global sample ``sample_offset + i``). Anything else runs diffusers'
    own ``step`` (``unfused_reason`` says why); after each step ``fused`` says which ran.
    """

    backend: str | None = None
    fused: bool | None = None  # whether the last step ran the fused kernel (None before the first)
    _keyed_seed: int | None = None
    _sample_offset: int = 0
    _schedule = FusedDDPMScheduler._schedule
    use_keyed_noise = FusedDDPMScheduler.use_keyed_noise

    def config_unfused_reason(self) -> str | None:
        """None when this configuration's steps can run the fused kernel, else why they all run diffusers' code."""
        c = self.config
        if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            return f"algorithm_type={c.algorithm_type!r}: the kernel runs 'dpmsolver++' and 'sde-dpmsolver++'"
        if c.solver_order not in (1, 2, 3):
            return f"solver_order={c.solver_order}: the kernel runs orders 1, 2 and 3"
        if c.solver_type not in ("midpoint", "heun"):
            return f"solver_type={c.solver_type!r}: the kernel runs 'midpoint' or 'heun'"
        if c.prediction_type not in C.PREDICTION_TYPES:
            return f"prediction_type={c.prediction_type!r}: the kernel takes {', '.join(C.PREDICTION_TYPES)}"
        if c.thresholding:
            return "thresholding=True: dynamic thresholding (per-sample quantiles) runs diffusers' code"
        if c.variance_type is not None:
            return f"variance_type={c.variance_type!r}: a learned variance runs diffusers' code"
        if getattr(c, "use_flow_sigmas", False):
            return "use_flow_sigmas=True: flow sigmas run diffusers' code"
        if self._schedule() is None:
            return "betas: not a valid schedule (outside (0, 1]); diffusers' own maths runs"
        return None

    def unfused_reason(self, model_output: torch.Tensor, sample: torch.Tensor, variance_noise=None) -> str | None:
        """None when ``step(model_output, timestep, sample, variance_noise=...)`` runs the fused dpmpp_step kernel,
        else why it runs diffusers' code instead (the configuration, these tensors or the given noise)."""
        why = self.config_unfused_reason()
        if why is not None:
            return why
        why = _tensors_unfused_reason(model_output, sample)
        if why is None and variance_noise is not None and self.config.algorithm_type == "sde-dpmsolver++":
            why = _noise_unfused_reason(variance_noise, sample)
        return why

    def _dpmpp_coefficients(self, order: int) -> torch.Tensor:
        """(1, 9) [px, pm, q, a_x, a_0, a_d, a_e, rho, a_z] from diffusers' float32 sigmas, each term computed as
        DPMSolverMultistepScheduler computes it (convert_model_output and the first-, second- and third-order
        updates, ODE or SDE), the per-term products folded in float64 (ddpm_fast/reference/dpmpp_step.py has the
        formulas)."""
        i = self.step_index
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[i])
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        one, zero = torch.ones_like(alpha_s0), torch.zeros_like(alpha_s0)
        pt = self.config.prediction_type
        if pt == "epsilon":  # (sample - sigma_t * model_output) / alpha_t
            px, pm, q = one, -sigma_s0, 1 / alpha_s0.double()
        elif pt == "sample":
            px, pm, q = zero, one, one
        else:  # v_prediction: alpha_t * sample - sigma_t * model_output
            px, pm, q = alpha_s0, -sigma_s0, one
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        a_z = zero
        if sde:  # x_t = (sigma_t / sigma_s0 e^{-h}) x + alpha_t (1 - e^{-2h}) D0 + sigma_t sqrt(1 - e^{-2h}) z
            a_x, a_0 = sigma_t / sigma_s0 * torch.exp(-h), alpha_t * (1 - torch.exp(-2.0 * h))
            a_z = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
            mid = 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h)))
            heun = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        else:  # x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) D0
            a_x, a_0 = sigma_t / sigma_s0, -(alpha_t * (torch.exp(-h) - 1.0))
            mid = -0.5 * (alpha_t * (torch.exp(-h) - 1.0))
            heun = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        a_d = a_e = rho = zero.double()
        if order >= 2:
            alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(self.sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            inv_r0 = (1.0 / r0).double()  # D1 = (1 / r0) (m0 - m1)
        if order == 2:
            a_d = (mid if self.config.solver_type == "midpoint" else heun).double() * inv_r0
        if order == 3:  # + c1 D1 + c2 D2 with diffusers' D1, D2 (third-order update) over m0 - m1 and the second
            # difference (m0 - m1) - rho (m1 - m2): D1_0 - D1_1 = (1 / r0) (m0 - m1) - (1 / r1) (m1 - m2)
            alpha_s2, sigma_s2 = self._sigma_to_alpha_sigma_t(self.sigmas[i - 2])
            lambda_s2 = torch.log(alpha_s2) - torch.log(sigma_s2)
            r1 = (lambda_s1 - lambda_s2) / h
            inv_r1 = (1.0 / r1).double()
            w, v = (r0 / (r0 + r1)).double(), (1.0 / (r0 + r1)).double()
            if sde:
                c2 = alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            else:
                c2 = -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
            c1, c2 = heun.double(), c2.double()
            a_d, a_e, rho = c1 * inv_r0, (c1 * w + c2 * v) * inv_r0, inv_r1 / inv_r0
        row = [px, pm, q, a_x, a_0, a_d, a_e, rho, a_z]
        return torch.stack([v.double() for v in row]).to(torch.float32).view(1, 9)

    def _order(self) -> int:
        """The order diffusers' step takes here: lower at the start (one more each step up to solver_order), and at
        the end where lower_order_final, euler_at_final or a final sigma of zero ask for it
        (DPMSolverMultistepScheduler.step)."""
        c = self.config
        n = len(self.timesteps)
        last = self.step_index == n - 1
        lower_order_final = last and (
            getattr(c, "euler_at_final", False)
            or (c.lower_order_final and n < 15)
            or getattr(c, "final_sigmas_type", "zero") == "zero"
        )
        lower_order_second = self.step_index == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            return 1
        if c.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            return 2
        return 3

    # ------------------------------------------------------------------ diffusers API
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, **kwargs):
        """diffusers' set_timesteps, after checking what it would take silently: a solver order it has no update for
        (it runs order 3's for any order above 2) and more steps than the training schedule has timesteps."""
        _check_multistep_config(self.config, num_inference_steps, "DPM-Solver++ multistep")
        return super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps, **kwargs)

    def _check_step(self, model_output, timestep, sample) -> None:
        """What diffusers' step would compute silently or fail on obscurely: a model output of another shape, a step
        other than the next one (the multistep history would belong to other timesteps)."""
        if isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor):
            if model_output.shape != sample.shape:
                raise ValueError(
                    f"model_output: expected the sample's shape {tuple(sample.shape)}, got {tuple(model_output.shape)}"
                )
        if (
            self.step_index is not None
            and self.num_inference_steps is not None
            and self.step_index < len(self.timesteps)
        ):
            expected = self.timesteps[self.step_index]
            given = timestep.item() if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 else timestep
            if isinstance(given, numbers.Number) and given != expected.item():
                raise ValueError(
                    f"timestep: the next step is {expected.item()} (step {self.step_index} of {len(self.timesteps)}), "
                    f"got {given}: the multistep solver's steps run in order (set_timesteps starts over)"
                )

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        self._check_step(model_output, timestep, sample)
        why = self.unfused_reason(model_output, sample, variance_noise)
        if why is None and self.num_inference_steps is None:
            why = "set_timesteps has not run (diffusers' step raises)"
        if why is None:
            n = self.config.num_train_timesteps  # an out-of-range or meta timestep: a clear error, never an index
            t = int(C.timesteps(timestep, 1, n, "cpu", name="timestep", data=("sample", sample.device))[0])
            if self.step_index is None:
                self._init_step_index(timestep)
            order = self._order()
            coefficients = self._dpmpp_coefficients(order)
            if not torch.isfinite(coefficients).all():
                why = f"step {self.step_index}: non-finite coefficients; diffusers' own inf/nan maths runs"
        self.fused = why is None
        if not self.fused:
            log.debug("ddpm_fast: FusedDPMSolverMultistepScheduler.step runs diffusers' code (%s)", why)
            kwargs = dict(generator=generator, variance_noise=variance_noise, return_dict=return_dict)
            return super().step(model_output, timestep, sample, **kwargs)
        noise, seed = None, None
        if self.config.algorithm_type == "sde-dpmsolver++":  # drawn at every step, as diffusers draws it
            if variance_noise is not None:
                noise = variance_noise
            elif self._keyed_seed is None:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32
                ).to(sample.dtype)
            else:
                seed = self._keyed_seed
        # the table carries the step (diffusers' sigmas): t is only checked, and t_prev = -1 stands for any target
        prev_sample, x0 = ops.dpmpp_step(
            sample,
            model_output,
            t,
            -1,
            self._schedule(),
            self.model_outputs[-1] if order >= 2 else None,
            x0_last2=self.model_outputs[-2] if order == 3 else None,
            noise=noise,
            seed=seed,
            sample_offset=self._sample_offset,
            prediction_type=self.config.prediction_type,
            solver_type=self.config.solver_type,
            coefficients=coefficients.expand(sample.shape[0], 9),
            backend=self.backend,
        )
        for i in range(self.config.solver_order - 1):  # the history, kept as diffusers keeps it
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = x0
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)


class FusedUniPCMultistepScheduler(UniPCMultistepScheduler):
    """diffusers.UniPCMultistepScheduler with ``step`` on ddpm_fast's fused multistep kernel (ops.unipc_step): the
    data prediction, the corrector UniC and the predictor UniP of one step in one pass over memory, writing
    x_{t-1}, the data prediction and the corrected sample (kept as diffusers keeps it, as ``last_sample``).

    Fused: ``predict_x0=True``, ``solver_type`` "bh1" or "bh2", ``solver_order`` 1 to 3 (diffusers' warm-up,
    lower_order_final, disable_corrector), prediction_type epsilon / sample / v_prediction, no thresholding, no
    ``solver_p``, no flow sigmas, and model output and sample of one shape and dtype (fp32/fp16/bf16). The
    coefficients are computed from diffusers' own float32 sigmas in its order of operations
    (ddpm_fast/reference/unipc_step.py). Anything else runs diffusers' own ``step`` (``unfused_reason`` says why);
    after each step ``fused`` says which ran.
    """

    backend: str | None = None
    fused: bool | None = None  # whether the last step ran the fused kernel (None before the first)
    _schedule = FusedDDPMScheduler._schedule

    def config_unfused_reason(self) -> str | None:
        """None when this configuration's steps can run the fused kernel, else why they all run diffusers' code."""
        c = self.config
        if not c.predict_x0:
            return "predict_x0=False: the kernel runs UniPC's data prediction"
        if self.solver_p is not None:
            return "solver_p: another scheduler's predictor runs diffusers' code"
        if c.solver_type not in ("bh1", "bh2"):
            return f"solver_type={c.solver_type!r}: the kernel runs 'bh1' and 'bh2'"
        if c.solver_order not in (1, 2, 3):
            return f"solver_order={c.solver_order}: the kernel runs orders 1, 2 and 3"
        if c.prediction_type not in C.PREDICTION_TYPES:
            return f"prediction_type={c.prediction_type!r}: the kernel takes {', '.join(C.PREDICTION_TYPES)}"
        if c.thresholding:
            return "thresholding=True: dynamic thresholding (per-sample quantiles) runs diffusers' code"
        if getattr(c, "use_flow_sigmas", False):
            return "use_flow_sigmas=True: flow sigmas run diffusers' code"
        if self._schedule() is None:
            return "betas: not a valid schedule (outside (0, 1]); diffusers' own maths runs"
        return None

    def unfused_reason(self, model_output: torch.Tensor, sample: torch.Tensor) -> str | None:
        """None when ``step(model_output, timestep, sample)`` runs the fused kernel, else why it runs diffusers'
        code instead (the configuration or these tensors)."""
        why = self.config_unfused_reason()
        if why is not None:
            return why
        return _tensors_unfused_reason(model_output, sample)

    def _lambda(self, i: int):
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[i])
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def _unipc_coefficients(self, use_corrector: bool, order: int) -> torch.Tensor:
        """(1, 14) rows of this step from diffusers' float32 sigmas: D0 as convert_model_output computes it, UniC of
        the previous step's order (where ``use_corrector``) and UniP of ``order``, their terms computed as
        multistep_uni_c_bh_update and multistep_uni_p_bh_update compute them, folded in float64."""
        from ..reference.dpmpp_step import ROW
        from ..reference.unipc_step import corrector_terms, predictor_terms

        i, st = self.step_index, self.config.solver_type
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(i)
        one, zero = torch.ones_like(alpha_s0), torch.zeros_like(alpha_s0)
        pt = self.config.prediction_type
        if pt == "epsilon":  # (sample - sigma_t * model_output) / alpha_t
            px, pm, q = one, -sigma_s0, 1 / alpha_s0.double()
        elif pt == "sample":
            px, pm, q = zero, one, one
        else:  # v_prediction: alpha_t * sample - sigma_t * model_output
            px, pm, q = alpha_s0, -sigma_s0, one
        row = torch.zeros(ROW, dtype=torch.float64)
        row[:3] = torch.stack([px.double(), pm.double(), q.double()])
        alpha_t, sigma_t, lambda_t = self._lambda(i + 1)
        earlier = [self._lambda(i - k)[2] for k in range(1, order)]
        p = predictor_terms(alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, earlier, order, st)
        row[3:8] = torch.stack([*p, torch.tensor(-1.0, dtype=torch.float64)])
        if use_corrector:  # UniC from the previous step (i - 1) to this one (i), of the order that step took
            _, sigma_p, lambda_p = self._lambda(i - 1)
            older = [self._lambda(i - 1 - k)[2] for k in range(1, self.this_order)]
            c = corrector_terms(alpha_s0, sigma_s0, sigma_p, lambda_s0, lambda_p, older, self.this_order, st)
            row[9:14] = torch.stack(c)
        return row.to(torch.float32).view(1, ROW)

    def _orders(self) -> tuple[bool, int]:
        """(whether the corrector runs, the predictor's order), as UniPCMultistepScheduler.step decides them."""
        c, i = self.config, self.step_index
        use_corrector = i > 0 and i - 1 not in self.disable_corrector and self.last_sample is not None
        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        return use_corrector, min(order, self.lower_order_nums + 1)

    # ------------------------------------------------------------------ diffusers API
    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        """diffusers' set_timesteps, after checking what it would take silently: a solver order it has no update for
        and more steps than the training schedule has timesteps."""
        _check_multistep_config(self.config, num_inference_steps, "the fused UniPC")
        return super().set_timesteps(num_inference_steps, device=device, **kwargs)

    _check_step = FusedDPMSolverMultistepScheduler._check_step

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        self._check_step(model_output, timestep, sample)
        why = self.unfused_reason(model_output, sample)
        if why is None and self.num_inference_steps is None:
            why = "set_timesteps has not run (diffusers' step raises)"
        if why is None:
            n = self.config.num_train_timesteps  # an out-of-range or meta timestep: a clear error, never an index
            C.timesteps(timestep, 1, n, "cpu", name="timestep", data=("sample", sample.device))
            if self.step_index is None:
                self._init_step_index(timestep)
            use_corrector, order = self._orders()
            coefficients = self._unipc_coefficients(use_corrector, order)
            if not torch.isfinite(coefficients).all():
                why = f"step {self.step_index}: non-finite coefficients; diffusers' own inf/nan maths runs"
            elif self.config.solver_type == "bh1" and float(self.sigmas[self.step_index + 1]) == 0:
                why = "bh1 to a final sigma of zero: B(h) = -inf, diffusers' own inf/nan maths runs"
        self.fused = why is None
        if not self.fused:
            log.debug("ddpm_fast: FusedUniPCMultistepScheduler.step runs diffusers' code (%s)", why)
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        history = tuple(m for m in reversed(self.model_outputs) if m is not None)
        prev_sample, x0, corrected = ops.unipc_step(
            sample,
            model_output,
            coefficients.expand(sample.shape[0], coefficients.shape[1]),
            history,
            self.last_sample if use_corrector else None,
            backend=self.backend,
        )
        for i in range(self.config.solver_order - 1):  # the history, kept as diffusers keeps it
            self.model_outputs[i] = self.model_outputs[i + 1]
            self.timestep_list[i] = self.timestep_list[i + 1]
        self.model_outputs[-1] = x0
        self.timestep_list[-1] = timestep
        self.this_order = order
        self.last_sample = corrected
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)


# ---------------------------------------------------------------------------------------------- accelerate()
def _tied_unet(unet2d) -> UNet:
    """A ddpm_fast.UNet whose parameters are the diffusers model's own Parameter objects (no copy)."""
    ours = UNet(config_from_diffusers(dict(unet2d.config)))
    theirs = dict(unet2d.named_parameters())
    for name, _ in list(ours.named_parameters()):
        prefix, _, leaf = name.rpartition(".")
        setattr(ours.get_submodule(prefix) if prefix else ours, leaf, theirs[name])
    return ours.train(unet2d.training)


class AccelerateError(ValueError):
    """accelerate() was asked to run a part on ddpm_fast's kernels and cannot (the reason is in the message)."""


@dataclass
class AccelerateReport:
    """What :func:`accelerate` replaced (part -> what runs it now) and what it left as it was (part -> why)."""

    obj: object = field(repr=False)
    backend: str | None
    swapped: dict[str, str] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)

    @property
    def accelerated(self) -> bool:
        """Every part it looked at now runs on ddpm_fast."""
        return bool(self.swapped) and not self.left

    def __str__(self) -> str:
        parts = [f"{part} -> {what}" for part, what in self.swapped.items()]
        parts += [f"{part} left as it is: {why}" for part, why in self.left.items()]
        return "; ".join(parts) or "nothing to accelerate"


def _install_unet(unet2d, ours: UNet) -> None:
    from diffusers.models.unets.unet_2d import UNet2DOutput

    def forward(sample, timestep, class_labels=None, return_dict=True, **kwargs):
        if class_labels is not None or kwargs:
            raise ValueError("class_labels: the accelerated UNet2DModel takes no class labels")
        t = torch.as_tensor(timestep, device=sample.device)
        out = ours(sample, t.expand(sample.shape[0]) if t.dim() == 0 else t)
        return UNet2DOutput(sample=out) if return_dict else (out,)

    unet2d.__dict__["_ddpm_fast_forward"] = (ours, unet2d.__dict__.get("forward"))
    unet2d.forward = forward  # an instance attribute: UNet2DModel.__call__ dispatches to it


def _plan_unet(unet2d, report: AccelerateReport) -> UNet | None:
    """The ddpm_fast.UNet to install in ``unet2d``, or None (installed before, or left: the report says why)."""
    if "_ddpm_fast_forward" in unet2d.__dict__:
        report.swapped["unet"] = "ddpm_fast.UNet (accelerated before)"
        return None
    try:
        ours = _tied_unet(unet2d)
    except (ValueError, KeyError) as e:
        report.left["unet"] = f"{type(unet2d).__name__} cannot run as ddpm_fast.UNet: {e}"
        return None
    report.swapped["unet"] = "ddpm_fast.UNet"
    return ours


_DROP_INS = {
    DDPMScheduler: FusedDDPMScheduler,
    DDIMScheduler: FusedDDIMScheduler,
    DPMSolverMultistepScheduler: FusedDPMSolverMultistepScheduler,
    UniPCMultistepScheduler: FusedUniPCMultistepScheduler,
}


def _plan_scheduler(sched, report: AccelerateReport):
    """The drop-in scheduler to put in place of ``sched``, or None (none needed, or left: the report says why)."""
    if sched is None:
        return None
    done = isinstance(sched, tuple(_DROP_INS.values()))
    if not done and type(sched) not in _DROP_INS:
        *rest, last = (cls.__name__ for cls in _DROP_INS)
        names = f"{', '.join(rest)} and {last}"
        report.left["scheduler"] = f"{type(sched).__name__}: ddpm_fast's drop-ins replace {names} only"
        return None
    # from the values the scheduler holds: diffusers' from_config puts defaults back for the arguments its config
    # lists in _use_default_values, which includes any passed positionally (DDPMScheduler(50) came back with 1000
    # training steps)
    config = {k: v for k, v in sched.config.items() if k != "_use_default_values"}
    fused = sched if done else _DROP_INS[type(sched)].from_config(config)
    why = fused.config_unfused_reason()
    if why is not None:
        report.left["scheduler"] = f"{type(sched).__name__}: {why}"
        return None
    report.swapped["scheduler"] = type(fused).__name__ + (" (accelerated before)" if done else "")
    return None if done else fused


def accelerate(obj, backend: str | None = None, *, strict: bool = True) -> AccelerateReport:
    """Make a diffusers ``DDPMPipeline``/``DDIMPipeline`` or ``UNet2DModel`` (classic DDPM blocks) run on ddpm_fast,
    in place.

    A pipeline's DDPMScheduler becomes a FusedDDPMScheduler with the same config (a DDIMScheduler a
    FusedDDIMScheduler, a DPMSolverMultistepScheduler a FusedDPMSolverMultistepScheduler, a UniPCMultistepScheduler a
    FusedUniPCMultistepScheduler), and its U-Net (or the
    given UNet2DModel) runs ddpm_fast's U-Net on the same Parameter objects: fused GroupNorm+SiLU and attention,
    and on the CPU channels_last with prepacked oneDNN convolutions. Returns an :class:`AccelerateReport` of what was swapped and what was left and why;
    :func:`deaccelerate` undoes it.

    ``strict=True`` (the default): a part that cannot run on ddpm_fast (a U-Net whose blocks ddpm_fast's UNet does
    not have, a scheduler without a drop-in or one whose configuration runs diffusers' code, no fused backend for
    the model's device) raises :class:`AccelerateError` naming the reason, and nothing is changed: who
    asks for acceleration expects an error, not a pipeline that quietly runs as slowly as before.
    ``strict=False`` swaps what it can, leaves the rest as it is, says so in the report and warns in one line.
    The check of the backend looks at the model's device now; moving the model later moves ddpm_fast's U-Net too.
    """
    unet = getattr(obj, "unet", None)
    if unet is None and hasattr(obj, "config") and hasattr(obj, "down_blocks"):
        unet, sched = obj, None
    elif unet is None:
        raise TypeError(f"obj: expected a diffusers pipeline with a unet or a UNet2DModel, got {type(obj).__name__}")
    else:
        sched = getattr(obj, "scheduler", None)
    report = AccelerateReport(obj, backend)
    param = next(unet.parameters(), None)
    why = ops.why_not_fused(param.device if param is not None else torch.device("cpu"), backend)
    if why is not None:
        report.left.update({"unet": why} if sched is None else {"unet": why, "scheduler": why})
        ours = fused = None
    else:
        ours, fused = _plan_unet(unet, report), _plan_scheduler(sched, report)
    if report.left and strict:
        reasons = "; ".join(f"{part}: {reason}" for part, reason in report.left.items())
        raise AccelerateError(f"accelerate({type(obj).__name__}): {reasons} (strict=False leaves them as they are)")
    if ours is not None:
        _install_unet(unet, ours.set_backend(backend))
    if fused is not None:
        fused.backend = backend
        obj.__dict__["_ddpm_fast_scheduler"] = sched
        obj.scheduler = fused
    if report.left:
        warnings.warn(f"ddpm_fast.accelerate: {report}", stacklevel=2)
    return report


def deaccelerate(obj):
    """Undo :func:`accelerate`: the original forward and scheduler come back. Returns ``obj``."""
    unet = getattr(obj, "unet", obj)
    saved = unet.__dict__.pop("_ddpm_fast_forward", None)
    if saved is not None:
        unet.__dict__.pop("forward", None)
        if saved[1] is not None:
            unet.forward = saved[1]
    sched = obj.__dict__.pop("_ddpm_fast_scheduler", None) if hasattr(obj, "__dict__") else None
    if sched is not None:
        obj.scheduler = sched
    return obj
