"""The single-process engine: one rank, gradients stored, a plain optimizer step.

The reference every other engine is compared against, so it is written to be obviously right:
backward on every micro-batch with loss / n (mean over the step), one clip on the accumulated
gradient, one optimizer step, one scheduler step."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from galore_ds.config import Config, DistEnv
from galore_ds.model import materialize
from galore_ds.train import faults
from galore_ds.train.engine import Engine, StepResult
from galore_ds.train.optim import build_optimizer, build_param_groups
from galore_ds.train.scheduler import warmup_cosine


class SingleEngine(Engine):
    name = "single"

    def __init__(self, cfg: Config, dist: DistEnv) -> None:
        super().__init__(cfg, dist)
        self.device = torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def setup(self, model: nn.Module) -> None:
        if any(p.is_meta for p in model.parameters()):
            materialize(model, self.device, self.cfg.model.init_std, self.cfg.training.seed)
        self._model = model.to(self.device)
        self._model.train()
        t = self.cfg.training
        self.optimizer = build_optimizer(build_param_groups(self._model, self.cfg), self.cfg)
        self.scheduler = warmup_cosine(self.optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)

    @property
    def model(self) -> nn.Module:
        return self._model

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        n = len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for mb in micro_batches:
            loss = self._model(**self._to_device(mb)).loss
            (loss / n).backward()  # equal-length packed sequences: mean of means is the mean
            total += loss.item()
        params = [p for p in self._model.parameters() if p.grad is not None]
        clip = self.cfg.training.grad_clip
        # clip_grad_norm_ with inf max_norm only measures: the logged norm is always real.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf).item()
        lr = self.optimizer.param_groups[0]["lr"]
        if faults.nonfinite(grad_norm):  # NaN/Inf gradient: skip the step, change no state
            return StepResult(loss=total / n, grad_norm=grad_norm, lr=lr,
                              extra={"skipped_steps": faults.skip_step(self, self.optimizer)})
        self.optimizer.step()
        self.scheduler.step()
        return StepResult(loss=total / n, grad_norm=grad_norm, lr=lr)

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        if not batches:
            return math.nan
        self._model.eval()
        try:
            losses = [self._model(**self._to_device(b)).loss.item() for b in batches]
        finally:
            self._model.train()
        return sum(losses) / len(losses)

    def save(self, directory: Path) -> None:
        torch.save({"model": self._model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, Path(directory) / "engine.pt")

    def load(self, directory: Path) -> None:
        sd = torch.load(Path(directory) / "engine.pt", map_location=self.device, weights_only=True)
        self._model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])

    def galore_stats(self) -> dict:
        return {**dict(getattr(self.optimizer, "galore_stats", {}) or {}), "skipped_steps": getattr(self, "skipped_steps", 0)}
