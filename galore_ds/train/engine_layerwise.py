"""The per-layer engine (engine.mode = "layerwise"): the 24 GB single-GPU mode.

Same contract and numbers as the single engine, but each parameter is updated inside its
post-accumulate-grad hook (galore_ds.layerwise.LayerwiseOptimizer) and its full gradient freed:
full gradients are never all stored. Accumulation over the step's micro-batches is exact
(low-rank accumulators), clipping is real, the scheduler steps once per optimizer step, and the
checkpoint holds the per-layer state.

grad_norm logged: with one micro-batch per step, the norm of the full gradient (what
clip_grad_norm_ sees, and clipping uses it: identical to the single engine); with several, the
norm of the gradient the optimizer consumes (projected gradients of GaLore matrices + full
gradients of the rest), which is also what is clipped. Both appear in `extra` when available.
One process only (multi-GPU per-layer mode is not implemented).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from galore_ds.config import Config, ConfigError, DistEnv
from galore_ds.layerwise import LayerwiseOptimizer
from galore_ds.optim.base import GaLoreOptimizer
from galore_ds.train.engine_single import SingleEngine
from galore_ds.train.engine import StepResult


class LayerwiseEngine(SingleEngine):
    name = "layerwise"
    wants_meta_model = True  # a 7B model is materialised straight into its bf16 storage

    def __init__(self, cfg: Config, dist: DistEnv) -> None:
        if dist.world_size > 1:
            raise ConfigError("engine.mode", f"'layerwise' runs one process but the launcher started "
                              f"{dist.world_size}", "launch one process, or use engine.mode=deepspeed/fsdp")
        super().__init__(cfg, dist)

    def setup(self, model: nn.Module) -> None:
        super().setup(model)  # model, optimizer and scheduler exactly as the single engine
        t = self.cfg.training
        if not isinstance(self.optimizer, GaLoreOptimizer):
            raise ConfigError("training.optimizer", f"{t.optimizer!r} has no per-layer mode",
                              "use galore_adamw, galore_adamw8bit or galore_adafactor (galore.enabled=false "
                              "gives their full-rank rule)")
        self.accumulation = max(1, self.cfg.accumulation(self.world_size))
        # Exact clipping (or accumulation) defers the updates to the end of backward, which
        # is also what lets a NaN/Inf step be dropped whole; without either (no clipping, or
        # training.clip_timing=delayed), updates run inside the hooks (least memory: the 7B
        # recipe) and only the affected parameters' updates are dropped.
        clip = t.grad_clip if t.grad_clip > 0 else None
        self.layerwise = LayerwiseOptimizer(
            self.optimizer, accumulation_steps=self.accumulation, max_grad_norm=clip,
            clip_norm="full" if self.accumulation == 1 else "lowrank", clip_timing=t.clip_timing,
            lr_scheduler=self.scheduler)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        n = len(micro_batches)
        if n != self.accumulation:
            raise ValueError(f"train_step got {n} micro-batches; the recipe's accumulation is {self.accumulation}")
        lr = self.optimizer.param_groups[0]["lr"]
        total = 0.0
        done = False
        for mb in micro_batches:
            loss = self._model(**self._to_device(mb)).loss
            (loss / n).backward()   # parameters update inside backward at the last micro-batch
            total += loss.item()
            done = self.layerwise.step()
        assert done, "the per-layer window did not close at the end of the step"
        lw = self.layerwise
        norm = lw.full_grad_norm if lw.full_grad_norm is not None else lw.grad_norm
        self.skipped_steps = lw.skipped_steps  # NaN/Inf: LayerwiseOptimizer dropped the step
        extra = {"grad_norm_lowrank": lw.grad_norm, "clip_coef": lw.clip_coef,
                 "skipped_steps": lw.skipped_steps,
                 "nonfinite_params_skipped": lw.nonfinite_params_skipped}
        if lw.full_grad_norm is not None:
            extra["grad_norm_full"] = lw.full_grad_norm
        return StepResult(loss=total / n, grad_norm=norm if norm is not None else math.nan, lr=lr,
                          extra=extra)

    def save(self, directory: Path) -> None:
        torch.save({"model": self._model.state_dict(), "layerwise": self.layerwise.state_dict()},
                   Path(directory) / "engine.pt")

    def load(self, directory: Path) -> None:
        sd = torch.load(Path(directory) / "engine.pt", map_location=self.device, weights_only=True)
        self._model.load_state_dict(sd["model"])
        self.layerwise.load_state_dict(sd["layerwise"])
        self.skipped_steps = self.layerwise.skipped_steps


__all__ = ["LayerwiseEngine"]
