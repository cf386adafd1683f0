"""Noise schedules of DDPM (Ho et al. 2020, section 2 and 4) computed once in float64.

Every derived term of the forward process q(x_t | x_0) and of the posterior q(x_{t-1} | x_t, x_0)
(equations (4), (6), (7) of the paper) lives here, indexed with 0-based t as in diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A fixed variance schedule beta_0..beta_{T-1} and everything derived from it, in float64.

    Build one with :meth:`linear`, :meth:`cosine` or :meth:`from_betas`.
    """

    betas: torch.Tensor
    # Derived terms (float64, shape (T,)), filled in __post_init__.
    alphas: torch.Tensor = field(init=False)
    alphas_cumprod: torch.Tensor = field(init=False)
    alphas_cumprod_prev: torch.Tensor = field(init=False)
    sqrt_alphas_cumprod: torch.Tensor = field(init=False)
    sqrt_one_minus_alphas_cumprod: torch.Tensor = field(init=False)
    sqrt_recip_alphas_cumprod: torch.Tensor = field(init=False)
    sqrt_recipm1_alphas_cumprod: torch.Tensor = field(init=False)
    posterior_variance: torch.Tensor = field(init=False)
    posterior_log_variance_clipped: torch.Tensor = field(init=False)
    posterior_mean_coef1: torch.Tensor = field(init=False)
    posterior_mean_coef2: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = self.betas
        if not isinstance(betas, torch.Tensor):
            raise TypeError(f"betas: expected a torch.Tensor, got {type(betas).__name__}")
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas: expected a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        betas = betas.detach().to(device="cpu", dtype=torch.float64).clone()
        if not torch.isfinite(betas).all():
            raise ValueError("betas: schedule contains non-finite values")
        if (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas: every beta_t must lie in (0, 1]")
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t  (eq. 7); 0 at t = 0.
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # log of beta~ is -inf at t = 0: clip it to beta~_1 as the paper's code does.
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        set_ = object.__setattr__
        set_(self, "betas", betas)
        set_(self, "alphas", alphas)
        set_(self, "alphas_cumprod", abar)
        set_(self, "alphas_cumprod_prev", abar_prev)
        set_(self, "sqrt_alphas_cumprod", abar.sqrt())
        set_(self, "sqrt_one_minus_alphas_cumprod", (1.0 - abar).sqrt())
        set_(self, "sqrt_recip_alphas_cumprod", abar.rsqrt())
        set_(self, "sqrt_recipm1_alphas_cumprod", (1.0 / abar - 1.0).sqrt())
        set_(self, "posterior_variance", post_var)
        set_(self, "posterior_log_variance_clipped", post_log_var)
        # mu~_t = coef1 * x_0 + coef2 * x_t  (eq. 7)
        set_(self, "posterior_mean_coef1", betas * abar_prev.sqrt() / (1.0 - abar))
        set_(self, "posterior_mean_coef2", (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar))
        if not all(torch.isfinite(getattr(self, n)).all() for n in ("posterior_mean_coef1", "posterior_mean_coef2")):
            raise ValueError("betas: schedule gives non-finite posterior coefficients (is 1 - abar_t zero?)")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """The paper's schedule: betas linear from beta_start to beta_end (diffusers' "linear")."""
        _check_T(num_timesteps)
        if not (0 < beta_start <= beta_end <= 1):
            raise ValueError(
                f"beta_start/beta_end: expected 0 < beta_start <= beta_end <= 1, got {beta_start}, {beta_end}"
            )
        # diffusers builds this with torch.linspace in float32; do it in float64 for accuracy.
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal (2021) eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at max_beta.

        Same construction as diffusers' "squaredcos_cap_v2".
        """
        _check_T(num_timesteps)

        def f(t: float) -> float:
            return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

        T = num_timesteps
        betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        """Any schedule given as its betas (a sequence or tensor of length T)."""
        if not isinstance(betas, torch.Tensor):
            try:
                betas = torch.as_tensor(betas, dtype=torch.float64)
            except (TypeError, ValueError) as e:
                raise TypeError(f"betas: expected a sequence of numbers or a tensor ({e})") from None
        return cls(betas)

    # ------------------------------------------------------------------ helpers
    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        b = self.betas
        return f"NoiseSchedule(T={len(self)}, beta[0]={b[0].item():.3g}, beta[-1]={b[-1].item():.3g})"

    def variance(self, t: int, variance_type: str = "fixed_small") -> float:
        """sigma_t^2 of the reverse step at t (diffusers' ``_get_variance``)."""
        if variance_type == "fixed_small":
            return max(float(self.posterior_variance[t]), 1e-20)
        if variance_type == "fixed_large":
            return float(self.betas[t])
        raise ValueError(f"variance_type: expected 'fixed_small' or 'fixed_large', got {variance_type!r}")

    def table(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """A derived term cast once to (dtype, device) and cached: what kernels gather from."""
        key = (name, dtype, torch.device(device))
        cache = self.__dict__.setdefault("_tables", {})
        if key not in cache:
            cache[key] = getattr(self, name).to(device=device, dtype=dtype).contiguous()
        return cache[key]


def _check_T(num_timesteps) -> None:
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
