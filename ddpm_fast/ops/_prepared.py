"""Prepared weights and reused buffers: what the fused paths keep between calls.

- :class:`Prepared`: a tensor derived from parameters (a Winograd transform, a reordered oneDNN weight, stacked
  projections), rebuilt only when a parameter changes (its storage or in-place version); a few variants (tile
  sizes, input shapes) are kept side by side. ``ops.conv2d(..., prepared=)`` keeps its backend's transformed weight in one.
- :class:`Scratch`: intermediates reused across inference calls (a fresh multi-MB tensor page-faults on every call
  on the CPU); ``Scratch.slot(name)`` is what ``ops.linear(..., scratch=)`` may return its result in.
"""

from __future__ import annotations

import threading

import torch


def weight_key(t: torch.Tensor) -> tuple[int, int]:
    """Identifies a parameter's current values for caches of derived weights: storage and in-place version.

    Inference tensors carry no version counter; an in-place change to one inside inference_mode goes unseen.
    """
    return (t.data_ptr(), -1 if t.is_inference() else t._version)


class Prepared:
    """Values derived from tensors, kept until one of them changes: one per variant (a layer that alternates
    between batch sizes may use two, e.g. Winograd tile sizes or oneDNN reorders for two input shapes), the
    ``MAX_VARIANTS`` most recently used."""

    MAX_VARIANTS = 4

    def __init__(self):
        self._key = None
        self._values = {}  # variant -> value, least recently used first

    def get(self, tensors, variant, build):
        """``build()``'s value for ``tensors`` (their current values) and ``variant`` (any hashable)."""
        key = tuple(weight_key(p) for p in tensors if p is not None)
        if self._key != key:
            self._values.clear()
            self._key = key
        value = self._values.pop(variant, None)
        if value is None:
            value = build()
        self._values[variant] = value  # (re)inserted last: the most recently used
        while len(self._values) > self.MAX_VARIANTS:
            del self._values[next(iter(self._values))]
        return value


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

    def slot(self, name: str) -> ScratchSlot:
        """A named place an op may return its result in (``ops.linear(..., scratch=)``)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"name: expected a non-empty str, got {name!r}")
        return ScratchSlot(self, name)


class ScratchSlot:
    """One name of a :class:`Scratch`: ``get(like, shape)`` is that name's tensor for this configuration."""

    __slots__ = ("scratch", "name")

    def __init__(self, scratch: Scratch, name: str):
        self.scratch, self.name = scratch, name

    def get(self, like: torch.Tensor, shape: tuple | None = None) -> torch.Tensor:
        return self.scratch.get(self.name, like, shape)
