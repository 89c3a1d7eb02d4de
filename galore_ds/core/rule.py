"""What an update rule declares to the layers above it.

Layouts, the checkpoint formats and the ZeRO binding never recognise a rule by its class: they
read these declarations. A rule (core/adamw.py, core/adamw8bit.py, core/adafactor.py) is a class
with the attributes and methods below; a new rule is one file here plus its public constructor.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch

from galore_ds.core.update import Item

Shape = tuple[int, ...]


class UpdateRule(Protocol):
    #: refresh policies for the low-rank moments it supports (subset of settings.MOMENT_POLICIES)
    moment_policies: Sequence[str]
    #: its statistics span whole rows and columns of each matrix (Adafactor's factored second
    #: moment): a layout that splits a matrix keeps 2-D rows and completes them across ranks
    whole_rows: bool
    #: it keeps moments as blockwise 8-bit codes with an absmax per block of the rank's own
    #: values: not blocks of one logical tensor, so checkpoints that reshard carry the moments'
    #: fp32 values (its `state_shapes`) and quantize them back on load
    quantized: bool

    def state_shapes(self, grad_shape: Shape, group: dict[str, Any]) -> dict[str, Shape]:
        """The logical state tensors of one gradient block of `grad_shape` (the projected
        gradient of a GaLore matrix, the full gradient otherwise), by name: what a resharding
        checkpoint stores and creates before it loads."""
        ...

    def init_state(self, item: Item) -> None:
        """Its zero state for `item`, without an update (torch's state-creation step)."""
        ...

    def update(self, items: list[Item], reduce: Callable | None = None) -> None:
        """One step of the rule on every item (`reduce` completes statistics across ranks)."""
        ...

    def rotate(self, state: dict, rot: torch.Tensor, right: bool) -> None:
        """Moments into a new basis (moments="reproject"); rules without it raise."""
        ...

    def reset(self, state: dict) -> None:
        """Zero the moments (moments="reset")."""
        ...


def adam_state_shapes(grad_shape: Shape, group: dict[str, Any]) -> dict[str, Shape]:
    """Adam's two moments, shaped like the gradient they follow."""
    return {"exp_avg": tuple(grad_shape), "exp_avg_sq": tuple(grad_shape)}


__all__ = ["UpdateRule", "Shape", "adam_state_shapes"]
