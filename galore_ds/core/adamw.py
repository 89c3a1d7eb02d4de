"""The AdamW rule on low-rank (or full) gradients: galore-torch's GaLoreAdamW arithmetic.

Moments live in the coordinates of the gradient the rule consumes (m x r or r x n for a
GaLore matrix, fp32 even for bf16 weights). Decoupled weight decay is applied after the
update (galore-torch's order). Every operation is elementwise, so the rule is the same on
any block of the moments a rank holds.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from galore_ds.core.scratch import MAX_NUMEL, Scratch
from galore_ds.core.rule import ADAM_STATE_LAYOUT, adam_state_shapes
from galore_ds.core.settings import MOMENT_POLICIES  # every policy; AdamW supports them all
from galore_ds.core.update import Item, apply_update, decay_weight, rotate_low_rank


class AdamWRule:
    moment_policies = MOMENT_POLICIES
    whole_rows = False
    quantized = False
    needs_full_grad = False
    projections = ("svd",)
    state_shapes = staticmethod(adam_state_shapes)
    state_layout = ADAM_STATE_LAYOUT
    sums_over_matrix = False

    def __init__(self) -> None:
        self.scratch = Scratch()

    def update(self, items: list[Item], reduce=None) -> None:
        for batch in self.batches(items):
            self._adam(batch)

    def _adam(self, items: list[Item]) -> None:
        """AdamW for items of one param group."""
        group = items[0].group
        for item, normed, step_size in self.directions(items):
            apply_update(item, normed, -step_size)
            decay_weight(item, group["lr"], group["weight_decay"])

    @staticmethod
    def batches(items: list[Item]) -> Iterator[list[Item]]:
        """Items of one param group at a time, bounded so the foreach temporaries never exceed
        ~3 x 64 MiB (a whole 7B model's low-rank tensors at once would be tens of GiB)."""
        pending: dict[int, tuple[list[Item], int]] = {}
        for item in items:
            batch, size = pending.get(id(item.group), ([], 0))
            numel = item.grad.numel()
            if batch and size + numel > MAX_NUMEL:
                yield batch
                batch, size = [], 0
            batch.append(item)
            pending[id(item.group)] = (batch, size + numel)
        for batch, _ in pending.values():
            yield batch

    def directions(self, items: list[Item]) -> Iterator[tuple[Item, torch.Tensor, float]]:
        """Adam's moments of items of one param group, updated with foreach kernels (one C++
        loop instead of a Python loop of small kernels; same arithmetic); yields each item with
        its direction m / (sqrt(v) + eps), in a buffer the next call reuses, and step size."""
        group = items[0].group
        beta1, beta2 = group["betas"]
        grads = [item.grad for item in items]
        for item in items:
            self.init_state(item)
        exp_avgs = [item.state["exp_avg"] for item in items]
        exp_avg_sqs = [item.state["exp_avg_sq"] for item in items]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # m / (sqrt(v) + eps) in place in a reused buffer: the same arithmetic as
        # torch._foreach_div(m, torch._foreach_sqrt(v) + eps)
        normed_all = self.scratch.like("normed", exp_avg_sqs)
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
            yield item, normed, step_size

    @staticmethod
    def init_state(item: Item) -> None:
        """Zero moments shaped like the gradient the rule consumes (fp32 for GaLore's R): what
        the first update starts from, and what a state-creation step makes without updating."""
        if "exp_avg" not in item.state:
            item.state["exp_avg"] = torch.zeros_like(item.grad, dtype=torch.float32 if item.galore else None)
            item.state["exp_avg_sq"] = torch.zeros_like(item.state["exp_avg"])

    @staticmethod
    def rotate(state: dict, rot: torch.Tensor, right: bool) -> None:
        # The first moment is linear in the gradient: rotate exactly. The second moment is a
        # per-coordinate variance; (C*C) maps it as if coordinates were independent, and
        # keeps it non-negative.
        if "exp_avg" in state:
            state["exp_avg"] = rotate_low_rank(state["exp_avg"], rot, right)
            state["exp_avg_sq"] = rotate_low_rank(state["exp_avg_sq"], rot * rot, right)

    @staticmethod
    def reset(state: dict) -> None:
        if "exp_avg" in state:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
