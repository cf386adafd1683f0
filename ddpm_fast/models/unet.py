"""The DDPM U-Net (Ho et al. 2020, Appendix B; a PixelCNN++-style backbone with Wide ResNet blocks).

Every GroupNorm(+SiLU) and self-attention goes through ``ddpm_fast.ops`` so the fused kernels of the chosen
backend run inside the model. The module layout follows diffusers' ``UNet2DModel`` with the classic blocks
(ResnetBlock2D + Attention), so ``UNet.ddpm_cifar10()`` has the same 35,746,307 parameters as the
google/ddpm-cifar10-32 configuration.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext, ops


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
        self.linear_1 = nn.Linear(ch, temb_ch)
        self.linear_2 = nn.Linear(temb_ch, temb_ch)

    def forward(self, emb):
        return self.linear_2(F.silu(self.linear_1(emb)))


def _weight_key(t: torch.Tensor) -> tuple[int, int]:
    """Identifies a parameter's current values for caches of derived weights: storage and in-place version.

    Inference tensors carry no version counter; an in-place change to one inside inference_mode goes unseen.
    """
    return (t.data_ptr(), -1 if t.is_inference() else t._version)


def _onednn_linear(x: torch.Tensor) -> bool:
    """Whether an inference linear layer on x runs oneDNN's linear rather than MKL's sgemm: where the extension
    runs its Winograd products in oneDNN too (gemm.h says why), on fp32 CPU tensors. MKL takes its AVX2 path on
    AMD CPUs; at the attention block's projection (2048 x 256 -> 768) on a 2-core AMD EPYC with AVX-512,
    oneDNN's linear ran 2.1x MKL's addmm (380 vs 184 GFLOP/s), its freshly allocated result included."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and _ext.gemm_library() == "onednn"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, in CPU inference on channels_last fp32 input, runs fused kernels with weights transformed
    once (and again only when the weight or input shape changes), and can fuse a residual add into the same call:

    - 3x3, stride 1, padding 1 (the ResBlocks' and samplers' convolutions): ``ops.conv3x3``, Winograd F(2x2, 3x3)
      on the ``cpu`` backend (2.25x fewer multiply-adds than a direct convolution);
    - the others (1x1 shortcuts, strided downsampling, the 3-channel ends): oneDNN with a reordered weight.

    Training, other devices and dtypes, and backend 'torch' run F.conv2d (the reference path).
    """

    # below this many channels a side, Winograd's transforms cost more than the products they save
    WINOGRAD_MIN_CHANNELS = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = None
        self._packed = None  # (key, oneDNN weight or Winograd transform)

    def _use_packed(self, x: torch.Tensor) -> bool:
        return (
            self.backend != "torch"
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and torch.backends.mkldnn.is_available()
        )

    def _winograd(self) -> bool:
        return (
            self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and min(self.in_channels, self.out_channels) >= self.WINOGRAD_MIN_CHANNELS
            and _ext.cpu_unavailable_reason() is None
        )

    def _packed_weight(self, x: torch.Tensor, winograd: bool) -> torch.Tensor:
        w = self.weight
        key = (_weight_key(w), winograd or tuple(x.shape))
        if self._packed is None or self._packed[0] != key:
            if winograd:
                packed = ops.winograd_weight(w.detach())
            else:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    w.detach().to_mkldnn(),
                    list(self.padding),
                    list(self.stride),
                    list(self.dilation),
                    self.groups,
                    list(x.shape),
                )
            self._packed = (key, packed)
        return self._packed[1]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self._use_packed(x) and (residual is None or residual.is_contiguous(memory_format=torch.channels_last)):
            if self._winograd():
                packed = self._packed_weight(x, True)
                return ops.conv3x3(x, self.weight, self.bias, residual, packed=packed, backend="cpu")
            args = (
                self._packed_weight(x, False),
                self.bias,
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
            )
            ops.record("conv2d", "cpu", "onednn")
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", 1.0, None, [], None)
        ops.record("conv2d", "torch", "reference")
        y = super().forward(x)
        return y if residual is None else y + residual


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
        self.time_emb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = GroupNormAct(cfg.num_groups, cout, cfg.eps, silu=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb_act):
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, add=self.time_emb_proj(temb_act))  # the time embedding is added before the norm
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return self.conv2(self.dropout(h), residual=skip)  # the residual add fused into the conv where it can be


class Scratch:
    """Intermediates reused across inference calls: a fresh multi-MB tensor page-faults on every call on the CPU.

    One tensor per (thread, name, configuration), the configuration being the shape and strides of the `like`
    tensor (or contiguous of `shape`), its dtype and device, and whether inference_mode is on (inference tensors
    can only be written there). Each configuration keeps its own tensor, so a model whose attention shapes
    alternate (16x16, 4x4, 16x16 in the CIFAR U-Net) allocates nothing after its first call. A tensor from
    ``get`` is valid until the next ``get`` of the same name and configuration on the same thread, so a module
    may only use it for values that are dead when its forward returns; then modules that run one after another
    can share one Scratch (a UNet's attention blocks do), and threads never share a tensor.

    Invariant for CUDA graphs: a tensor handed out while the current CUDA stream is capturing is never freed
    for the Scratch's lifetime (a captured graph reads and writes the addresses it recorded on every replay;
    freed, that memory would go to later allocations that each replay then overwrites). A later capture of the
    same configuration gets the same tensor again. Tensors never handed out during a capture are evicted, least
    recently used first, beyond ``MAX_UNPINNED`` configurations per name, and never while capturing: memory is
    bounded by MAX_UNPINNED configurations per name plus the configurations that were captured.
    """

    MAX_UNPINNED = 4

    def __init__(self):
        self._tensors = {}  # (thread, name) -> {configuration: tensor}, least recently used first
        self._pinned = {}  # (thread, name) -> configurations handed out while capturing

    @staticmethod
    def _capturing(like: torch.Tensor) -> bool:
        return like.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def get(self, name: str, like: torch.Tensor, shape: tuple | None = None) -> torch.Tensor:
        key = (threading.get_ident(), name)
        if shape is None:
            config = (tuple(like.shape), like.stride(), like.dtype, like.device, torch.is_inference_mode_enabled())
        else:
            config = (tuple(shape), None, like.dtype, like.device, torch.is_inference_mode_enabled())
        bufs = self._tensors.setdefault(key, {})
        buf = bufs.pop(config, None)
        if buf is None:
            buf = torch.empty_like(like) if shape is None else like.new_empty(shape)
        bufs[config] = buf  # (re)inserted last: the most recently used
        pinned = self._pinned.setdefault(key, set())
        if self._capturing(like):
            pinned.add(config)
        else:
            unpinned = [c for c in bufs if c not in pinned]
            for c in unpinned[: max(0, len(unpinned) - self.MAX_UNPINNED)]:
                del bufs[c]
        return buf


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, residual added after the output projection."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        head_dim = cfg.attention_head_dim or ch
        if ch % head_dim:
            raise ValueError(f"attention_head_dim: {ch} channels are not divisible by {head_dim}")
        self.num_heads = ch // head_dim
        self.group_norm = GroupNormAct(cfg.num_groups, ch, cfg.eps, silu=False)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers' name: to_out.0
        self.backend = None
        self.scratch = Scratch()  # a UNet gives all its attention blocks one

    def _projection_weights(self, fold_out: bool):
        """to_q, to_k, to_v stacked into one (3C, C) projection, cached until a weight changes.

        fold_out (one head): the output projection folded into the value projection, v' = v W_out^T + b_out, so
        attention(q, k, v') = attention(q, k, v) W_out^T + b_out (each row of softmax weights sums to 1) and the
        block needs neither the output GEMM nor a separate residual add.
        """
        lins = (self.to_q, self.to_k, self.to_v) + ((self.to_out[0],) if fold_out else ())
        key = (fold_out, *(_weight_key(p) for lin in lins for p in (lin.weight, lin.bias)))
        if getattr(self, "_proj", None) is None or self._proj[0] != key:
            with torch.no_grad():
                wv, bv = self.to_v.weight, self.to_v.bias
                if fold_out:
                    wo, bo = self.to_out[0].weight, self.to_out[0].bias
                    wv, bv = wo @ wv, torch.addmv(bo, wo, bv)
                w = torch.cat([self.to_q.weight, self.to_k.weight, wv]).detach()
                b = torch.cat([self.to_q.bias, self.to_k.bias, bv]).detach()
            self._proj = (key, w, b)
        return self._proj[1], self._proj[2]

    def _project(self, h: torch.Tensor, fold_out: bool) -> torch.Tensor:
        """q, k, v (B, HW, 3C) = h W^T + b by one GEMM: oneDNN's linear, or MKL's into a reused buffer (inference)."""
        w, b = self._projection_weights(fold_out)
        B, N, C = h.shape
        if _onednn_linear(h):
            return torch.ops.mkldnn._linear_pointwise(h.reshape(B * N, C), w, b, "none", [], "").view(B, N, 3 * C)
        qkv = self.scratch.get("qkv", h, (B, N, 3 * C))
        torch.addmm(b, h.reshape(B * N, C), w.t(), out=qkv.view(B * N, 3 * C))
        return qkv

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, HW, C) -> (B, heads, HW, d): a strided view the attention kernel reads in place."""
        B, N, C = t.shape
        return t.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x):
        if torch.is_grad_enabled() or self.backend == "torch":
            return self._forward_modules(x)
        return self._forward_inference(x)

    def _forward_modules(self, x):
        """Training and backend 'torch': the plain modules (differentiable), the attention through ops."""
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
        if self.num_heads == 1:  # attention with the output projection folded in and the residual in its epilogue
            q, k, v = self._project(h, fold_out=True).split(C, dim=-1)
            res = x.permute(0, 2, 3, 1).reshape(B, 1, H * W, C)  # a view when x is channels_last
            o = ops.attention(q[:, None], k[:, None], v[:, None], residual=res, backend=self.backend)
            return o.transpose(2, 3).reshape(B, C, H, W)  # (B, HW, C) memory: channels_last, no copy
        q, k, v = (self._heads(t) for t in self._project(h, fold_out=False).split(C, dim=-1))
        o = self.scratch.get("heads", x, (B, H * W, C))  # (B, HW, heads, d): merging the heads is a view
        ops.attention(q, k, v, backend=self.backend, out=self._heads(o))
        x_rows = x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view when x is channels_last
        to_out = self.to_out[0]
        if _onednn_linear(x):  # o W_out^T + b_out + x in one oneDNN call (the add as its post-op)
            out = torch.ops.mkldnn._linear_pointwise.binary(
                o.view(B * H * W, C), x_rows, to_out.weight, to_out.bias, "add"
            )
        else:  # (x + b_out) in one pass, then o W_out^T accumulated onto it in place by one GEMM (beta = 1)
            out = torch.add(x_rows, to_out.bias)
            out.addmm_(o.view(B * H * W, C), to_out.weight.t())
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

        scratch = Scratch()  # the attention blocks run one after another: one set of intermediates for all
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
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.config.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, {self.config.in_channels}, H, W), got {shape}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
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
