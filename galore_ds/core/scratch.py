"""Buffers reused across optimizer steps for per-step temporaries (never optimizer state).

On CPU, fresh tensors are fresh pages every step: page faults were 15% of a 60M step. Views
into one buffer per (slot, device, dtype) avoid them; batches over MAX_NUMEL elements get
fresh tensors instead (one huge full-rank tensor)."""
from __future__ import annotations

import math

import torch

MAX_NUMEL = 1 << 24


class Scratch:
    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def views(self, slot: str, shapes: list[tuple[int, ...]], device: torch.device,
              dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Views of `shapes` into the slot's buffer, or None when they total over MAX_NUMEL."""
        sizes = [math.prod(shape) for shape in shapes]
        total = sum(sizes)
        if total > MAX_NUMEL:
            return None
        key = (slot, device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < total:
            buf = self._buffers[key] = torch.empty(total, device=device, dtype=dtype)
        views, offset = [], 0
        for shape, size in zip(shapes, sizes):
            views.append(buf[offset:offset + size].view(shape))
            offset += size
        return views

    def like(self, slot: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Uninitialised tensors shaped like `tensors`, from the buffer when they share a
        device and dtype."""
        key = (tensors[0].device, tensors[0].dtype)
        views = None
        if all((t.device, t.dtype) == key for t in tensors):
            views = self.views(slot, [tuple(t.shape) for t in tensors], *key)
        return views if views is not None else [torch.empty_like(t) for t in tensors]
