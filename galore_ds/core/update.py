"""What an update rule works on: one parameter's gradient in the rule's coordinates, and the
map from those coordinates back into the parameter this rank holds.

A rule (AdamW, 8-bit AdamW, Adafactor) only sees `Item`s. How the parameter is split across
ranks (galore_ds/layouts) decides what an Item holds:
  param  the values this rank writes (a block of the full matrix, possibly empty)
  grad   the gradient the rule consumes: the projected gradient R (GaLore) or the full
         gradient block (other parameters); R may be this rank's rows of R, its columns, or
         all of R (identical on the ranks that hold it)
  proj   the part of the projector that maps R back onto `param`: Q[:, c0:c1] (right) or
         P[r0:r1] (left): every row of R lands on a row block (right), every column on a
         column block (left)
  split  how `grad` is split across ranks, for rules whose statistics span the whole tensor
         (Adafactor): see `Split`
  full_grad  the full gradient block matching `param`, for rules that need it (Fira, APOLLO)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from galore_ds.core import projector as pj


@dataclass
class Split:
    """How an Item's `grad` (2-D: R, or a full gradient) is split across the ranks of `group`.

    dim     the split dimension of `grad` (0: rows, 1: columns) or None (whole here)
    owned   along `dim`, the slice this rank counts in whole-tensor sums (a row that two ranks
            both hold, as a ZeRO partition boundary makes it, is counted by one of them)
    group   the process group whose ranks' parts add up to the whole `grad` (None: whole here,
            or identical on every rank that holds it)
    param_group  the group over which `param`'s blocks are disjoint (None: whole here); sums of
            the parameter itself (Adafactor's RMS(W)) run over it
    grad_shape the global shape of `grad` (what the split pieces add up to)
    """

    dim: int | None = None
    owned: slice = field(default_factory=lambda: slice(None))
    group: Any = None
    param_group: Any = None
    grad_shape: tuple[int, ...] = ()



@dataclass
class Item:
    """One parameter in one step (see the module docstring)."""

    param: torch.Tensor
    grad: torch.Tensor
    state: dict
    group: dict
    galore: bool
    proj: torch.Tensor | None = None
    right: bool = True
    split: Split = field(default_factory=Split)
    param_sq: Callable[[], torch.Tensor] | None = None  # sum of squares of this rank's own param elements
    param_numel: int = 0               # elements of the whole parameter
    # the full gradient block matching `param`, for rules that declare `needs_full_grad`
    # (Fira's residual, APOLLO's channel scaling); None for the others
    full_grad: torch.Tensor | None = None
    full_group: Any = None   # the group across which full_grad's blocks are disjoint (norms)
    # a ZeRO piece padded to whole rows (Layout.local): the flat range of the block it holds;
    # the rest of param and full_grad is padding (zero in full_grad, never written back)
    held: tuple[int, int] | None = None

    @property
    def side(self) -> pj.Side:
        return "right" if self.right else "left"

    def zero_padding_(self, t: torch.Tensor) -> torch.Tensor:
        """Zero what `t` (shaped like `param`) holds outside this rank's piece."""
        if self.held is not None:
            flat = t.view(-1)
            flat[:self.held[0]] = 0
            flat[self.held[1]:] = 0
        return t

    def scale_(self, coef: float) -> None:
        """Clip: scale every gradient the rule consumes (R, and the full block if it has one)."""
        self.grad.mul_(coef)
        if self.full_grad is not None:
            self.full_grad.mul_(coef)


def apply_update(item: Item, update: torch.Tensor, alpha: float) -> None:
    """param += alpha * update, mapped back through the projector for GaLore items.

    Default: one fused addmm into the weight (no full-size temporary). signs="lapack" is
    galore-torch compatibility mode: its unfused arithmetic, (N Q) * scale then add, so that
    the run is bit-identical (a 1-ulp difference would flip a LAPACK sign at the next refresh
    and the runs would part).
    """
    if not item.galore:
        item.param.add_(update.to(item.param.dtype), alpha=alpha)
        return
    if item.param.numel() == 0:
        return
    if item.group["signs"] == "lapack":
        back = pj.project_back(update, item.proj, item.side)
        item.param.add_((back * item.group["scale"]).to(item.param.dtype), alpha=alpha)
    else:
        pj.project_back_(item.param, update, item.proj, item.side, alpha * item.group["scale"])


def decay_weight(item: Item, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay on the values this rank holds (galore-torch's order: after the
    AdamW update, before the Adafactor one)."""
    if weight_decay:
        item.param.add_(item.param, alpha=-lr * weight_decay)


def rotate_low_rank(t: torch.Tensor, rot: torch.Tensor, right: bool) -> torch.Tensor:
    """Coordinates in the old basis -> the new one: right (m, r) @ C; left C^T @ (r, n)."""
    return t @ rot if right else rot.t() @ t


def clip_coefficient(norm: float, max_norm: float | None) -> float:
    """torch's clip_grad_norm_ formula: min(1, max_norm / (norm + 1e-6)); 1 without clipping."""
    return 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))


def check_adam_hyperparameters(lr: float, betas: tuple[float, float], eps: float) -> None:
    """Refuse bad Adam settings where they enter, naming the value."""
    if lr < 0.0:
        raise ValueError(f"lr={lr}: must be >= 0")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas={tuple(betas)}: each must be in [0, 1)")
    if eps < 0.0:
        raise ValueError(f"eps={eps}: must be >= 0")


__all__ = ["Item", "Split", "apply_update", "clip_coefficient", "decay_weight", "rotate_low_rank",
           "check_adam_hyperparameters"]
