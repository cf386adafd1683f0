"""The DDPM U-Net (Ho et al. 2020, Appendix B; a PixelCNN++-style backbone with Wide ResNet blocks).

Every GroupNorm(+SiLU) and self-attention goes through ``ddpm_fast.ops`` so the fused kernels of the chosen
backend run inside the model. The module layout follows diffusers' ``UNet2DModel`` with the classic blocks
(ResnetBlock2D + Attention), so ``UNet.ddpm_cifar10()`` has the same 35,746,307 parameters as the
google/ddpm-cifar10-32 configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


@dataclass
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 3
    sample_size: int = 32
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    attention_head_dim: int | None = None  # None: one head over all channels (the paper); diffusers' default is 8
    dropout: float = 0.1
    num_groups: int = 32
    eps: float = 1e-6  # GroupNorm epsilon of the paper's code and of diffusers' UNet2DModel

    def __post_init__(self):
        def positive_int(name, v):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")

        for name in ("in_channels", "out_channels", "sample_size", "ch", "num_res_blocks", "num_groups"):
            positive_int(name, getattr(self, name))
        self.ch_mult = tuple(self.ch_mult) if isinstance(self.ch_mult, (list, tuple)) else self.ch_mult
        if not isinstance(self.ch_mult, tuple) or not self.ch_mult:
            raise ValueError(f"ch_mult: expected a non-empty tuple of positive ints, got {self.ch_mult!r}")
        for m in self.ch_mult:
            positive_int("ch_mult", m)
        if self.sample_size % self.downsampling:
            raise ValueError(
                f"sample_size: {self.sample_size} is not divisible by {self.downsampling} "
                f"(the U-Net halves it {len(self.ch_mult) - 1} times)"
            )
        if isinstance(self.attn_resolutions, list):
            self.attn_resolutions = tuple(self.attn_resolutions)
        if not isinstance(self.attn_resolutions, tuple) or any(
            isinstance(r, bool) or not isinstance(r, int) for r in self.attn_resolutions
        ):
            raise ValueError(f"attn_resolutions: expected a tuple of ints, got {self.attn_resolutions!r}")
        if self.attention_head_dim is not None:
            positive_int("attention_head_dim", self.attention_head_dim)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ValueError(f"eps: expected a number in (0, 1), got {self.eps!r}")

    @property
    def downsampling(self) -> int:
        """How many times smaller the lowest level is than the input: H and W must be multiples of it."""
        return 2 ** (len(self.ch_mult) - 1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the Transformer (Vaswani et al. 2017), as in the DDPM code: [sin, cos]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.linear_1 = Linear(ch, temb_ch)
        self.linear_2 = Linear(temb_ch, temb_ch)

    def forward(self, emb):
        return self.linear_2(F.silu(self.linear_1(emb)))


def _gemm_backend(backend: str | None) -> str | None:
    """The backend of a model's convolutions and linear layers: the reference with backend 'torch', else the
    device's own (a model's backend names the kernels of its norms and attention; its GEMMs run in the fastest
    library for the device: oneDNN/BLAS on the CPU, cuDNN/cuBLAS on a GPU)."""
    return "torch" if backend == "torch" else None


class Linear(nn.Linear):
    """nn.Linear whose forward is ops.linear (oneDNN or the BLAS on the CPU, cuBLAS on a GPU, the reference in
    training), with an optional residual added by the same call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = None

    def forward(self, x, residual=None, scratch=None):
        return ops.linear(x, self.weight, self.bias, residual, scratch=scratch, backend=_gemm_backend(self.backend))


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose forward is ops.conv2d, its transformed weight kept between calls (rebuilt when the weight
    changes), with an optional residual added by the same call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"padding_mode: ops.conv2d pads with zeros, got {self.padding_mode!r}")
        self.backend = None
        self.prepared = ops.Prepared()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return ops.conv2d(
            x,
            self.weight,
            self.bias,
            residual,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            prepared=self.prepared,
            backend=_gemm_backend(self.backend),
        )


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm whose forward is ops.group_norm_silu (optionally with SiLU and the time-embedding add)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, silu: bool):
        super().__init__(num_groups, num_channels, eps)
        self.silu = silu
        self.backend = None

    def forward(self, x, add=None, out=None):
        return ops.group_norm_silu(
            x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu, add=add, backend=self.backend, out=out
        )


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_ch: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = GroupNormAct(cfg.num_groups, cin, cfg.eps, silu=True)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = Linear(temb_ch, cout)
        self.norm2 = GroupNormAct(cfg.num_groups, cout, cfg.eps, silu=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb_act):
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, add=self.time_emb_proj(temb_act))  # the time embedding is added before the norm
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return self.conv2(self.dropout(h), residual=skip)  # the residual add fused into the conv where it can be


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, residual added after the output projection."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        head_dim = cfg.attention_head_dim or ch
        if ch % head_dim:
            raise ValueError(f"attention_head_dim: {ch} channels are not divisible by {head_dim}")
        self.num_heads = ch // head_dim
        self.group_norm = GroupNormAct(cfg.num_groups, ch, cfg.eps, silu=False)
        self.to_q = Linear(ch, ch)
        self.to_k = Linear(ch, ch)
        self.to_v = Linear(ch, ch)
        self.to_out = nn.ModuleList([Linear(ch, ch)])  # diffusers' name: to_out.0
        self.backend = None
        self.scratch = ops.Scratch()  # a UNet gives all its attention blocks one
        self._qkv = ops.Prepared()

    def _projection_weights(self, fold_out: bool):
        """to_q, to_k, to_v stacked into one (3C, C) projection, kept until a weight changes.

        fold_out (one head): the output projection folded into the value projection, v' = v W_out^T + b_out, so
        attention(q, k, v') = attention(q, k, v) W_out^T + b_out (each row of softmax weights sums to 1) and the
        block needs neither the output GEMM nor a separate residual add.
        """
        lins = (self.to_q, self.to_k, self.to_v) + ((self.to_out[0],) if fold_out else ())

        def stack():
            with torch.no_grad():
                wv, bv = self.to_v.weight, self.to_v.bias
                if fold_out:
                    wo, bo = self.to_out[0].weight, self.to_out[0].bias
                    wv, bv = wo @ wv, torch.addmv(bo, wo, bv)
                w = torch.cat([self.to_q.weight, self.to_k.weight, wv]).detach()
                b = torch.cat([self.to_q.bias, self.to_k.bias, bv]).detach()
            return w, b

        return self._qkv.get([p for lin in lins for p in (lin.weight, lin.bias)], fold_out, stack)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, HW, C) -> (B, heads, HW, d): a strided view the attention kernel reads in place."""
        B, N, C = t.shape
        return t.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x):
        if torch.is_grad_enabled() or self.backend == "torch":
            return self._forward_modules(x)
        return self._forward_inference(x)

    def _forward_modules(self, x):
        """Training and backend 'torch': the plain modules (differentiable), each through ops."""
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): a free view when x is channels_last
        q, k, v = (self._heads(proj(h)) for proj in (self.to_q, self.to_k, self.to_v))
        o = ops.attention(q, k, v, backend=self.backend)
        o = o.transpose(1, 2).reshape(B, H * W, C)  # merging the heads is a view of the kernel's output
        return x + self.to_out[0](o).transpose(1, 2).reshape(B, C, H, W)

    def _forward_inference(self, x):
        """Inference: one GEMM for the three projections; every intermediate in a reused buffer."""
        B, C, H, W = x.shape
        h = self.group_norm(x, out=self.scratch.get("normed", x)).flatten(2).transpose(1, 2)
        fold_out = self.num_heads == 1
        w, b = self._projection_weights(fold_out)
        qkv = ops.linear(h, w, b, scratch=self.scratch.slot("qkv"), backend=_gemm_backend(self.backend))
        q, k, v = qkv.split(C, dim=-1)
        if fold_out:  # attention with the output projection folded in and the residual in its epilogue
            res = x.permute(0, 2, 3, 1).reshape(B, 1, H * W, C)  # a view when x is channels_last
            o = ops.attention(q[:, None], k[:, None], v[:, None], residual=res, backend=self.backend)
            return o.transpose(2, 3).reshape(B, C, H, W)  # (B, HW, C) memory: channels_last, no copy
        o = self.scratch.get("heads", x, (B, H * W, C))  # (B, HW, heads, d): merging the heads is a view
        ops.attention(self._heads(q), self._heads(k), self._heads(v), backend=self.backend, out=self._heads(o))
        x_rows = x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view when x is channels_last
        out = self.to_out[0](o.view(B * H * W, C), residual=x_rows)  # o W_out^T + b_out + x in one call
        return out.view(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TensorFlow's "SAME" padding at stride 2, as in the paper


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The ResBlocks (each with its attention, if any) of one resolution, then a resampler.

    Attribute names follow diffusers' blocks (resnets, attentions, downsamplers/upsamplers) so state dicts match.
    """

    def __init__(self, resnets, attentions, sampler=None, sampler_name=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.sampler_name = sampler_name
        if sampler is not None:
            setattr(self, sampler_name, nn.ModuleList([sampler]))

    @property
    def sampler(self):
        return getattr(self, self.sampler_name)[0] if self.sampler_name and hasattr(self, self.sampler_name) else None


class UNet(nn.Module):
    """eps_theta(x_t, t): the DDPM U-Net. ``UNet.ddpm_cifar10()`` is the paper's 35.7M-parameter CIFAR-10 model."""

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or UNetConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("UNet: give either a UNetConfig or keyword arguments, not both")
        if cfg.ch % cfg.num_groups:
            raise ValueError(f"ch: {cfg.ch} channels are not divisible by num_groups={cfg.num_groups}")
        self.config = cfg
        ch, temb_ch = cfg.ch, 4 * cfg.ch
        self.time_embedding = TimestepEmbedding(ch, temb_ch)
        self.conv_in = Conv2d(cfg.in_channels, ch, 3, padding=1)

        chans = [ch * m for m in cfg.ch_mult]
        skips, res, cin = [ch], cfg.sample_size, ch
        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(chans):
            last = i == len(chans) - 1
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks):
                resnets.append(ResBlock(cin, cout, temb_ch, cfg))
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(cout, cfg))
                cin = cout
                skips.append(cin)
            self.down_blocks.append(Level(resnets, attns, None if last else Downsample(cin), "downsamplers"))
            if not last:
                skips.append(cin)
                res //= 2

        self.mid_block = Level(
            [ResBlock(cin, cin, temb_ch, cfg), ResBlock(cin, cin, temb_ch, cfg)], [AttnBlock(cin, cfg)]
        )

        self.up_blocks = nn.ModuleList()
        for i, cout in reversed(list(enumerate(chans))):
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(ResBlock(cin + skips.pop(), cout, temb_ch, cfg))
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(cout, cfg))
                cin = cout
            self.up_blocks.append(Level(resnets, attns, Upsample(cin) if i else None, "upsamplers"))
            if i:
                res *= 2

        scratch = ops.Scratch()  # the attention blocks run one after another: one set of intermediates for all
        for m in self.modules():
            if isinstance(m, AttnBlock):
                m.scratch = scratch
        self.conv_norm_out = GroupNormAct(cfg.num_groups, cin, cfg.eps, silu=True)
        self.conv_out = Conv2d(cin, cfg.out_channels, 3, padding=1)
        self.backend = None

    @classmethod
    def ddpm_cifar10(cls, **overrides) -> UNet:
        """The paper's CIFAR-10 model: ch 128, ch_mult (1, 2, 2, 2), 2 ResBlocks a level, attention at 16x16."""
        return cls(UNetConfig(**overrides))

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    @classmethod
    def from_diffusers(cls, source) -> UNet:
        """Weights (and configuration) of a diffusers UNet2DModel, or of its ``save_pretrained`` folder."""
        from .loading import from_diffusers

        return from_diffusers(source)

    def set_backend(self, backend: str | None) -> UNet:
        """Backend for every norm and attention inside the model (None: auto)."""
        ops.check_backend(backend)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.config.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, {self.config.in_channels}, H, W), got {shape}")
        k = self.config.downsampling
        if x.shape[2] % k or x.shape[3] % k:
            raise ValueError(
                f"x: height and width must be multiples of {k} (the levels halve them), got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected a number or shape ({x.shape[0]},) (x's batch), got shape {tuple(t.shape)}")
        if self.backend != "torch" and x.device.type == "cpu" and not torch.is_grad_enabled():
            # CPU inference runs channels_last: oneDNN convolutions and the fused NHWC kernels are faster there
            x = x.contiguous(memory_format=torch.channels_last)
        temb = self.time_embedding(timestep_embedding(t, self.config.ch).to(x.dtype))
        temb_act = F.silu(temb)  # every ResBlock projects SiLU(temb): compute it once

        h = self.conv_in(x)
        hs = [h]
        for level in self.down_blocks:
            for j, block in enumerate(level.resnets):
                h = block(h, temb_act)
                if level.attentions is not None:
                    h = level.attentions[j](h)
                hs.append(h)
            if level.sampler is not None:
                h = level.sampler(h)
                hs.append(h)
        mid = self.mid_block
        h = mid.resnets[1](mid.attentions[0](mid.resnets[0](h, temb_act)), temb_act)
        for level in self.up_blocks:
            for j, block in enumerate(level.resnets):
                h = block(torch.cat([h, hs.pop()], dim=1), temb_act)
                if level.attentions is not None:
                    h = level.attentions[j](h)
            if level.sampler is not None:
                h = level.sampler(h)
        return self.conv_out(self.conv_norm_out(h))
