"""The paper's schedule: linear warmup, then cosine decay to min_lr_ratio (10%) of the peak.

Indexed by optimizer steps (never micro-batches): engines call scheduler.step() exactly once
per optimizer step, after optimizer.step()."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR used by optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup: int, total: int, min_ratio: float = 0.1) -> LambdaLR:
    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, min_ratio))
