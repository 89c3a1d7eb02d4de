"""GaLoreAdamW: AdamW whose moments live in each matrix's low-rank gradient subspace."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from galore_ds import projector as pj
from galore_ds.optim.base import (
    GaLoreOptimizer, ParamItem, check_adam_hyperparameters, rotate_low_rank, side_of,
)


_FOREACH_BATCH_NUMEL = 1 << 24


def _low_rank_shape(item: ParamItem) -> tuple[int, ...]:
    """Shape of the gradient the rule sees: (m, r) or (r, n) for GaLore, else the param's."""
    if not item.galore:
        return tuple(item.param.shape)
    proj = item.state["proj"]
    if item.state["proj_right"]:       # proj (r, n): low-rank (m, r)
        return (item.param.shape[0], proj.shape[0])
    return (proj.shape[1], item.param.shape[1])  # proj (m, r): low-rank (r, n)


def _low_rank_numel(item: ParamItem) -> int:
    return math.prod(_low_rank_shape(item))


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
        self._adam([item])

    def _update_items(self, items: list[ParamItem]) -> None:
        # Batches of one param group, bounded so the foreach temporaries (projected
        # gradients, denominators, normalised updates) never exceed ~3 x 64 MiB: a whole
        # 7B model's low-rank tensors at once would be tens of GiB.
        pending: dict[int, tuple[list[ParamItem], int]] = {}
        for item in items:
            batch, size = pending.get(id(item.group), ([], 0))
            numel = _low_rank_numel(item)
            if batch and size + numel > _FOREACH_BATCH_NUMEL:
                self._adam(batch)
                batch, size = [], 0
            batch.append(item)
            pending[id(item.group)] = (batch, size + numel)
        for batch, _ in pending.values():
            self._adam(batch)

    def _adam(self, items: list[ParamItem]) -> None:
        """The AdamW rule for items of one param group, moments updated with foreach kernels
        (one C++ loop instead of a Python loop of small kernels; same arithmetic)."""
        group = items[0].group
        beta1, beta2 = group["betas"]
        grads = self._low_rank_grads(items)
        for item, grad in zip(items, grads):
            if "exp_avg" not in item.state:
                item.state["exp_avg"] = torch.zeros_like(
                    grad, dtype=torch.float32 if item.galore else None)
                item.state["exp_avg_sq"] = torch.zeros_like(item.state["exp_avg"])
        exp_avgs = [item.state["exp_avg"] for item in items]
        exp_avg_sqs = [item.state["exp_avg_sq"] for item in items]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # m / (sqrt(v) + eps) in place in a reused buffer (see _scratch): the same arithmetic
        # as torch._foreach_div(m, torch._foreach_sqrt(v) + eps)
        normed_all = self._scratch_like(exp_avg_sqs)
        torch._foreach_copy_(normed_all, exp_avg_sqs)
        torch._foreach_sqrt_(normed_all)
        torch._foreach_add_(normed_all, group["eps"])
        for exp_avg, denom in zip(exp_avgs, normed_all):
            torch.div(exp_avg, denom, out=denom)
        for item, normed in zip(items, normed_all):
            step = item.state["step"] + 1
            step_size = group["lr"]
            if group["correct_bias"]:
                # galore-torch's evaluation order, so signs="lapack" runs are bit-identical
                step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
            self._apply_update(item, normed, -step_size)
            if group["weight_decay"] > 0.0:
                item.param.add_(item.param, alpha=-group["lr"] * group["weight_decay"])

    def _scratch(self, slot: str, shapes: list[tuple[int, ...]], device: torch.device,
                 dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Views of `shapes` into one buffer per (slot, device, dtype), kept across steps, or
        None for a batch over _FOREACH_BATCH_NUMEL elements (one huge full-rank tensor).
        Fresh tensors would be fresh pages on CPU every step: page faults were 15% of a 60M
        step. Not optimizer state: never saved."""
        sizes = [math.prod(shape) for shape in shapes]
        if sum(sizes) > _FOREACH_BATCH_NUMEL:
            return None
        buffers = self.__dict__.setdefault("_scratch_buffers", {})
        key = (slot, device, dtype)
        buf = buffers.get(key)
        if buf is None or buf.numel() < sum(sizes):
            buf = buffers[key] = torch.empty(sum(sizes), device=device, dtype=dtype)
        views, offset = [], 0
        for shape, size in zip(shapes, sizes):
            views.append(buf[offset:offset + size].view(shape))
            offset += size
        return views

    def _scratch_like(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        key = (tensors[0].device, tensors[0].dtype)
        views = None
        if all((t.device, t.dtype) == key for t in tensors):
            views = self._scratch("normed", [tuple(t.shape) for t in tensors], *key)
        return views if views is not None else [torch.empty_like(t) for t in tensors]

    def _low_rank_grads(self, items: list[ParamItem]) -> list[torch.Tensor]:
        """The batch's gradients in the rule's coordinates. fp32 GaLore matrices (the common
        case) are projected straight into a reused buffer: the same matmul, no fresh tensor."""
        fp32 = all(item.galore and item.lowrank_grad is None and item.grad.dtype == torch.float32
                   and item.state["proj"].dtype == torch.float32 for item in items)
        views = None
        if fp32:
            shapes = [_low_rank_shape(item) for item in items]
            views = self._scratch("grad", shapes, items[0].grad.device, torch.float32)
        if views is None:
            return [self._low_rank_grad(item) for item in items]
        for item, out in zip(items, views):
            pj.project(item.grad, item.state["proj"], side_of(item.state), out=out)
        return views

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
