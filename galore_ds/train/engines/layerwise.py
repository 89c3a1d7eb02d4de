"""The per-layer engine (engine.mode = "layerwise"): the 24 GB single-GPU mode.

The single engine's contract and numbers, but each parameter is updated inside its
post-accumulate-grad hook (galore_ds.LayerwiseOptimizer) and its full gradient freed: full
gradients are never all stored. Accumulation over the step's micro-batches is exact (low-rank
accumulators), clipping uses the same norm as every engine (what the optimizer consumes), the
scheduler steps once per optimizer step, and the checkpoint holds the per-layer state.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from galore_ds import GaLoreOptimizer, LayerwiseOptimizer
from galore_ds.train.config import ConfigError
from galore_ds.train.engines.base import StepResult
from galore_ds.train.engines.single import SingleEngine


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
    optimizer.max_grad_norm = None  # the per-layer wrapper clips (the optimizer's step never runs)
    return LayerwiseOptimizer(optimizer, accumulation_steps=engine.accumulation,
                              max_grad_norm=t.grad_clip if t.grad_clip > 0 else None,
                              clip_timing=t.clip_timing, lr_scheduler=scheduler, accum_dtype=accum_dtype,
                              reduce_dtype=reduce_dtype)


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


class LayerwiseEngine(SingleEngine):
    name = "layerwise"
    wants_meta_model = True  # a 7B model is materialised straight into its bf16 storage

    def setup(self, model: nn.Module) -> None:
        super().setup(model)  # model, optimizer and scheduler exactly as the single engine
        self.layerwise = layerwise_for(self, self.optimizer, self.scheduler)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        total, result = layerwise_step(self, self.layerwise, micro_batches)
        result.loss = total / len(micro_batches)
        return result

    def save(self, directory: Path) -> None:
        torch.save({"model": self._model.state_dict(), "layerwise": self.layerwise.state_dict()},
                   Path(directory) / "engine.pt")

    def load(self, directory: Path) -> None:
        # mmap: a 7B checkpoint is paged in as it is copied, not held twice in memory
        sd = torch.load(Path(directory) / "engine.pt", map_location=self.device, weights_only=True,
                        mmap=torch.device(self.device).type == "cpu")
        self._model.load_state_dict(sd["model"])
        self.layerwise.load_state_dict(sd["layerwise"])
        self.skipped_steps = self.layerwise.skipped_steps


__all__ = ["LayerwiseEngine", "layerwise_for", "layerwise_step"]
