"""The single-process engine: one rank, gradients stored, one optimizer step.

The reference every other engine is compared against, so it is written to be obviously right:
backward on every micro-batch with loss / n (mean over the step), then one optimizer step,
which clips by the norm of what it consumes and skips a NaN/Inf step; one scheduler step."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from galore_ds.train.engines.base import Engine, StepResult
from galore_ds.train.model import materialize
from galore_ds.train.optim import build_optimizer, build_param_groups, warmup_cosine


class SingleEngine(Engine):
    name = "single"

    def setup(self, model: nn.Module) -> None:
        if any(p.is_meta for p in model.parameters()):
            materialize(model, self.device, self.cfg.model.init_std, self.cfg.training.seed)
        self._model = model.to(self.device)
        self._model.train()
        self.optimizer = build_optimizer(build_param_groups(self._model, self.cfg), self.cfg)
        self.scheduler = warmup_cosine(self.optimizer, self.cfg)

    @property
    def model(self) -> nn.Module:
        return self._model

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        total, result = self.accumulate_and_step(micro_batches)
        result.loss = total / len(micro_batches)
        result.extra["skipped_steps"] = self.skipped_steps
        return result

    def save(self, directory: Path) -> None:
        torch.save({"model": self._model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "skipped_steps": self.skipped_steps},
                   Path(directory) / "engine.pt")

    def load(self, directory: Path) -> None:
        # mmap: a 7B checkpoint is paged in as it is copied, not held twice in memory
        sd = torch.load(Path(directory) / "engine.pt", map_location=self.device, weights_only=True,
                        mmap=torch.device(self.device).type == "cpu")
        self._model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))


__all__ = ["SingleEngine"]
