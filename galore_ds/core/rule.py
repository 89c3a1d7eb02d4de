"""What an update rule declares to the layers above it.

Layouts, the checkpoint formats and the ZeRO binding never recognise a rule by its class: they
read these declarations. A rule (core/adamw.py, core/adamw8bit.py, core/adafactor.py, core/fira.py,
core/apollo.py) is a class with the attributes and methods below; a new rule is one file here
plus its public constructor.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

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
    #: fp32 values (its `state_shapes`) and quantize them back on load (QuantizedRule)
    quantized: bool
    #: it reads each GaLore matrix's full gradient besides R (Fira's residual, APOLLO's scaled
    #: gradient): the step hands it over as Item.full_grad, clipping scales it with R, and a
    #: layout that frees or never forms it (the low-rank DDP hook, the per-layer wrapper)
    #: cannot carry the rule
    needs_full_grad: bool
    #: its update of a matrix split across ranks sums over the whole matrix (Adafactor's
    #: statistics, the family's limiter and tensor-wise norms): every rank of the matrix's
    #: group runs it, an empty block too
    sums_over_matrix: bool
    #: the projector sources it works with, its default first: "svd" (the top singular
    #: subspace of the gradient, by the group's `refresh`) or "random" (a seeded Gaussian
    #: matrix, projector.gaussian_basis); a group picks one with `proj` (`projection_of`)
    projections: Sequence[str]

    #: how each state tensor of `state_shapes` lies over the gradient block it follows, by
    #: name: "grad" (shaped like it: its rows and columns are the gradient's), "rows" (one
    #: value per row: Adafactor's row statistic), "cols" (one per column); a key not named is
    #: whole, the same on every rank that holds the parameter (counters, RMS, a limiter's
    #: norm). Checkpoints that reshard read it to cut and join each tensor.
    state_layout: Mapping[str, str]

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


class QuantizedRule(UpdateRule, Protocol):
    """What a rule with `quantized = True` provides besides UpdateRule: the checkpoint formats
    and the optimizers' state_dict move its moments between its quantized form and their fp32
    values (named and shaped by `state_shapes`) through these, never through its codec."""

    #: state keys of its codes, each shaped like the block of the moment it quantizes
    code_keys: tuple[str, ...]
    #: state keys of the codes' per-block scales (absent where a block keeps fp32 values)
    scale_keys: tuple[str, ...]

    def zero_state(self, shape: Shape, group: dict[str, Any],
                   device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Zero moments in the form it keeps for a block of `shape` (the keys, shapes and dtypes
        `init_state` gives that block): what a loader expects to find saved."""
        ...

    def to_values(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The fp32 values of its moments from `state` (its `code_keys`, with the `scale_keys`
        present), by the names `state_shapes` gives them."""
        ...

    def from_values(self, values: dict[str, torch.Tensor], group: dict[str, Any], shape: Shape,
                    device: torch.device, exact: bool = False) -> dict[str, torch.Tensor]:
        """Its quantized state for a block of `shape` holding the moments' fp32 `values`
        (within its quantization step of them). With `exact`, values that its own form of this
        block dequantized to come back as codes that dequantize to exactly them (a resume on
        the saver's layout is bit-identical)."""
        ...


def projection_of(rule: UpdateRule, group: dict[str, Any]) -> str:
    """The projector source of a GaLore group: its `proj`, else the rule's default."""
    return group.get("proj", rule.projections[0])


def adam_state_shapes(grad_shape: Shape, group: dict[str, Any]) -> dict[str, Shape]:
    """Adam's two moments, shaped like the gradient they follow."""
    return {"exp_avg": tuple(grad_shape), "exp_avg_sq": tuple(grad_shape)}


#: Adam's two moments follow the gradient element for element
ADAM_STATE_LAYOUT: Mapping[str, str] = {"exp_avg": "grad", "exp_avg_sq": "grad"}


__all__ = ["UpdateRule", "QuantizedRule", "Shape", "adam_state_shapes", "ADAM_STATE_LAYOUT", "projection_of"]
