"""The single-process engine: one rank, gradients stored, one optimizer step.

The reference every other engine is compared against, so it is written to be obviously right:
backward on every micro-batch with loss / n (mean over the step), then one optimizer step,
which clips by the norm of what it consumes and skips a NaN/Inf step; one scheduler step."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from galore_ds.train.engines.base import Engine, StepResult


class SingleEngine(Engine):
    name = "single"

    def setup(self, model: nn.Module) -> None:
        self._model = self.place_model(model)
        self.build_optimizer(self._model)

    @property
    def model(self) -> nn.Module:
        return self._model

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        total, result = self.accumulate_and_step(micro_batches)
        result.loss = total / len(micro_batches)
        result.extra["skipped_steps"] = self.skipped_steps
        return result

    def save(self, directory: Path) -> None:
        self.save_engine_file(directory)

    def load(self, directory: Path) -> None:
        self.load_engine_file(directory)


__all__ = ["SingleEngine"]
