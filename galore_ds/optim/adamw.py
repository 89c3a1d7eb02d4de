"""GaLoreAdamW: AdamW whose moments live in each matrix's low-rank gradient subspace."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from galore_ds.optim.base import GaLoreOptimizer, ParamItem, check_adam_hyperparameters, rotate_low_rank


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW with GaLore projection for groups that set `rank` (galore-torch's GaLoreAdamW).

    Defaults are galore-torch's (eps=1e-6, decoupled weight decay applied after the
    update). Groups without `rank` get plain AdamW in the same optimizer. GaLore options
    (refresh, signs, moments, stagger, ...) are keywords here and may be overridden per
    group; see `GALORE_OPTION_DEFAULTS`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        **galore_options,
    ) -> None:
        check_adam_hyperparameters(lr, betas, eps)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, **galore_options)
        super().__init__(params, defaults)

    def _update(self, item: ParamItem) -> None:
        group, state = item.group, item.state
        grad = self._low_rank_grad(item)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32 if item.galore else None)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        step = state["step"] + 1

        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            # galore-torch's evaluation order, so signs="lapack" runs are bit-identical
            step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

        self._apply_update(item, exp_avg / denom, -step_size)
        if group["weight_decay"] > 0.0:
            item.param.add_(item.param, alpha=-group["lr"] * group["weight_decay"])

    def _rotate_moments(self, state: dict, rot: torch.Tensor, side) -> None:
        # First moment is linear in the gradient: rotate exactly. The second moment is a
        # per-coordinate variance; (C*C) maps it as if coordinates were independent, and
        # keeps it non-negative.
        if "exp_avg" in state:
            state["exp_avg"] = rotate_low_rank(state["exp_avg"], rot, side)
            state["exp_avg_sq"] = rotate_low_rank(state["exp_avg_sq"], rot * rot, side)

    def _reset_moments(self, state: dict) -> None:
        if "exp_avg" in state:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
