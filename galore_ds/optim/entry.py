"""One parameter in one optimizer step, as the step skeleton and the refresh see it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from galore_ds.core import projector as pj
from galore_ds.layouts.base import Layout


@dataclass
class Entry:
    key: Any                    # optimizer state key: the parameter, or a string (ZeRO pieces)
    param: torch.Tensor         # the optimizer's parameter object (plain, DTensor or flat)
    layout: Layout
    group: dict
    index: int                  # stable parameter index (seeds, owner assignment)
    state: dict
    galore: bool
    p_local: torch.Tensor       # the block this rank holds (see Layout.local)
    g_local: torch.Tensor | None
    write_back: Callable[[], None] | None = None
    g_piece: torch.Tensor | None = None   # the raw gradient piece (gathers), when it differs from g_local
    averaged: bool = False      # its projected gradient is already averaged over the layout's reduce_group
    owner: int | None = None    # replicated matrices: the rank of its group that refreshes it
    # the rule's declaration of how each state tensor lies over the gradient (core/rule.py:
    # UpdateRule.state_layout), read by the checkpoint formats that cut and join state
    state_layout: Mapping[str, str] = field(default_factory=dict)

    @property
    def side(self) -> pj.Side:
        return pj.choose_side(self.layout.shape, self.group["proj_type"])

    @property
    def holds(self) -> bool:
        """Whether this rank holds any of the parameter (a ZeRO rank may hold none)."""
        return self.layout.piece is None or self.layout.piece.numel > 0

    def raw_grad(self) -> torch.Tensor:
        """The gradient piece as contiguous elements of the layout's gather order."""
        if self.g_piece is not None:
            return self.g_piece
        return self.layout.gather_piece(self.g_local)


__all__ = ["Entry"]
