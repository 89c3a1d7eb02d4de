"""The per-layer wrapper as the engines use it (layerwise, fsdp and ddp with
engine.*.layerwise): built over the recipe's optimizer, stepped over a step's micro-batches."""
from __future__ import annotations

import math

import torch

from galore_ds import GaLoreOptimizer, LayerwiseOptimizer
from galore_ds.train.config import ConfigError
from galore_ds.train.engines.base import StepResult


def layerwise_for(engine, optimizer, scheduler, accum_dtype: torch.dtype = torch.float32,
                  reduce_dtype: torch.dtype | None = None) -> LayerwiseOptimizer:
    """The recipe's per-layer wrapper. Exact clipping (or accumulation) defers the updates to
    the end of backward, which is also what lets a NaN/Inf step be dropped whole; without
    either (no clipping, or training.clip_timing=delayed) updates run inside the hooks (least
    memory: the 7B recipe) and only the affected parameters' updates are dropped."""
    t = engine.cfg.training
    if not isinstance(optimizer, GaLoreOptimizer):
        raise ConfigError("training.optimizer", f"{t.optimizer!r} has no per-layer mode",
                          "use galore_adamw, galore_adamw8bit or galore_adafactor (galore.enabled=false "
                          "gives their full-rank rule)")
    # clipping: the optimizer's (build_optimizer gave it training.grad_clip and clip_timing),
    # which the wrapper's phases use
    return LayerwiseOptimizer(optimizer, accumulation_steps=engine.accumulation, lr_scheduler=scheduler,
                              accum_dtype=accum_dtype, reduce_dtype=reduce_dtype)


def layerwise_step(engine, lw: LayerwiseOptimizer, micro_batches) -> tuple[float, StepResult]:
    """One optimizer step of micro-batches through a per-layer wrapper: (loss sum, result)."""
    n = len(micro_batches)
    if n != engine.accumulation:
        raise ValueError(f"train_step got {n} micro-batches; the recipe's accumulation is {engine.accumulation}")
    lr = lw.optimizer.param_groups[0]["lr"]
    total, done = 0.0, False
    for mb in micro_batches:
        loss = engine.forward_loss(mb)
        (loss / lw.loss_divisor).backward()   # parameters update inside backward at the last micro-batch
        total += float(loss.detach())
        done = lw.step()
    assert done, "the per-layer window did not close at the end of the step"
    engine.skipped_steps = lw.skipped_steps
    extra = {"clip_coef": lw.clip_coef, "skipped_steps": lw.skipped_steps,
             "nonfinite_params_skipped": lw.nonfinite_params_skipped}
    norm = lw.grad_norm if lw.grad_norm is not None else math.nan
    return total, StepResult(loss=math.nan, grad_norm=norm, lr=lr, extra=extra)


__all__ = ["layerwise_for", "layerwise_step"]
