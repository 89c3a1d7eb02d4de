"""The per-layer engine (engine.mode = "layerwise"): the 24 GB single-GPU mode.

The single engine's contract and numbers, but each parameter is updated inside its
post-accumulate-grad hook (galore_ds.LayerwiseOptimizer) and its full gradient freed: full
gradients are never all stored. Accumulation over the step's micro-batches is exact (low-rank
accumulators), clipping uses the same norm as every engine (what the optimizer consumes), the
scheduler steps once per optimizer step, and the checkpoint holds the per-layer state.
"""
from __future__ import annotations

import torch
from torch import nn

from galore_ds.train.engines.base import StepResult
from galore_ds.train.engines.per_layer import layerwise_step
from galore_ds.train.engines.single import SingleEngine


class LayerwiseEngine(SingleEngine):
    name = "layerwise"
    wants_meta_model = True  # a 7B model is materialised straight into its bf16 storage

    def setup(self, model: nn.Module) -> None:
        # the single engine's model, optimizer and schedule, stepped by the per-layer wrapper;
        # save/load are the single engine's (engine.pt holds the wrapper's state)
        self._model = self.place_model(model)
        self.build_optimizer(self._model, per_layer={})

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        total, result = layerwise_step(self, self.layerwise, micro_batches)
        result.loss = total / len(micro_batches)
        return result


__all__ = ["LayerwiseEngine"]
