"""The Adafactor rule (Shazeer & Stern 2018; galore-torch / transformers semantics) on the
low-rank gradient, exact on any split of it.

For a GaLore matrix the factored second moment is kept for the (m, r) or (r, n) low-rank
gradient: m + r (or r + n) numbers. Weight decay is applied before the update (galore-torch's
order).

Adafactor divides by statistics of the whole tensor: the row and column means of the squared
gradient, the mean of the row statistic, RMS(update) for update clipping and RMS(W) for
scale_parameter. When a rank holds only rows (or only columns) of the gradient, it computes
partial sums and ONE reduction per step (the caller's `reduce`, one all-reduce per process
group for every tensor at once) completes them:
  rows split:    column sums, T_j = sum_i g_ij^2 / row_i, sum of the row statistic, sum W^2
  columns split: row sums,    T_i = sum_j g_ij^2 / col_j, sum W^2
RMS(update) needs no second round: sum(u^2) = mean(row) * sum_j T_j / col_j (rows split) or
mean(row) * sum_i T_i / row_i (columns split), because u_ij^2 = g_ij^2 mean(row) / (row_i col_j).
A whole gradient (one process, or R identical on every rank) takes the single-process
arithmetic, bit for bit galore-torch's.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from galore_ds.core.rule import ADAM_STATE_LAYOUT
from galore_ds.core.update import Item, apply_update

MOMENT_POLICIES = ("keep", "reset")
# reduce([(partial sums, process group), ...]) -> the sums over each group's ranks
Reduce = Callable[[list[tuple[torch.Tensor, object]]], list[torch.Tensor]]


def _rms(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:  # fp32 accumulation without an fp32 copy of a bf16 weight
        return torch.linalg.vector_norm(t, dtype=torch.float32) / (t.numel() ** 0.5)
    return t.norm(2) / (t.numel() ** 0.5)


def factored_direction(grad: torch.Tensor, row: torch.Tensor, row_mean: torch.Tensor,
                       col: torch.Tensor) -> torch.Tensor:
    """grad scaled by Adafactor's factored second moment: grad / sqrt(row col^T / mean(row))."""
    r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
    return torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)


def _whole_direction(state: dict, grad: torch.Tensor, sq: torch.Tensor, beta2t: float) -> torch.Tensor:
    """The second-moment update and the direction of a gradient held whole on this rank
    (`sq` = grad^2 + eps1): factored row/column statistics for matrices, a full one for vectors."""
    if grad.dim() >= 2:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        return factored_direction(grad, row, row.mean(dim=-1, keepdim=True), col)
    v = state["exp_avg_sq"]
    v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
    return v.rsqrt().mul_(grad)


def lr_of(group: dict, step: int, rms: torch.Tensor) -> float | torch.Tensor:
    lr = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * step if group["warmup_init"] else 1e-2
        lr = min(min_step, 1.0 / math.sqrt(step))
    if group["scale_parameter"]:
        lr = max(group["eps"][1], rms) * lr
    return lr


def init_state(state: dict, grad: torch.Tensor, group: dict) -> None:
    """Moments shaped by the gradient this rank holds: a row block keeps its rows of the row
    statistic and every column's, a column block the reverse."""
    if "RMS" in state:
        return
    if group["beta1"] is not None:
        state["exp_avg"] = torch.zeros_like(grad)
    if grad.dim() >= 2:
        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
    else:
        state["exp_avg_sq"] = torch.zeros_like(grad)


def _rule_grad(item: Item) -> torch.Tensor:
    grad = item.grad
    return grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad


class AdafactorRule:
    moment_policies = MOMENT_POLICIES
    whole_rows = True    # RMS and the factored second moment span whole rows and columns
    quantized = False
    needs_full_grad = False
    projections = ("svd",)

    # RMS is whole; the vector statistic of a 1-D parameter follows it like exp_avg
    state_layout = {**ADAM_STATE_LAYOUT, "exp_avg_sq_row": "rows", "exp_avg_sq_col": "cols"}
    sums_over_matrix = True

    @staticmethod
    def state_shapes(grad_shape: tuple[int, ...], group: dict) -> dict[str, tuple[int, ...]]:
        """RMS, the first moment when beta1 is set, and the second moment: factored into row and
        column statistics for a matrix, whole for a vector (transformers' Adafactor)."""
        shape = tuple(grad_shape)
        shapes: dict[str, tuple[int, ...]] = {"RMS": ()}
        if group["beta1"] is not None:
            shapes["exp_avg"] = shape
        if len(shape) >= 2:
            shapes["exp_avg_sq_row"] = shape[:-1]
            shapes["exp_avg_sq_col"] = shape[:-2] + shape[-1:]
        else:
            shapes["exp_avg_sq"] = shape
        return shapes

    def update(self, items: list[Item], reduce: Reduce | None = None) -> None:
        local, split = [], []
        for item in items:
            whole = item.split.dim is None and item.split.param_group is None
            (local if whole else split).append(item)
        for item in local:
            self._update_whole(item)
        if split:
            self._update_split(split, reduce)

    # ------------------------------------------------------------ one process
    def _update_whole(self, item: Item) -> None:
        group, state, p = item.group, item.state, item.param
        grad = _rule_grad(item)
        init_state(state, grad, group)
        step = state["step"] + 1
        state["RMS"] = _rms(p)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = _whole_direction(state, grad, grad**2 + group["eps"][0], beta2t)
        self._finish(item, update, _rms(update), step)

    # ------------------------------------------------------------ split across ranks
    def _update_split(self, items: list[Item], reduce: Reduce | None) -> None:
        requests, pending = [], []
        for item in items:
            sp, group, state = item.split, item.group, item.state
            grad = _rule_grad(item)
            init_state(state, grad, group)
            step = state["step"] + 1
            beta2t = 1.0 - math.pow(step, group["decay_rate"])
            grad_sq = grad.square()
            sq = grad_sq + group["eps"][0]
            weight_sq = item.param_sq().reshape(1)
            if sp.dim is None:                       # R whole (identical here); W split
                parts = [weight_sq]
                stat = None
            elif grad.dim() >= 2 and sp.dim == 0:    # rows of R here: columns need the others
                stat = state["exp_avg_sq_row"].mul(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
                own_sq, own_t = sq[sp.owned], (grad_sq / stat.unsqueeze(-1))[sp.owned]
                parts = [own_sq.sum(dim=-2), own_t.sum(dim=-2), stat[sp.owned].sum().reshape(1), weight_sq]
            elif grad.dim() >= 2:                    # columns of R here: rows need the others
                stat = state["exp_avg_sq_col"].mul(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
                own_sq, own_t = sq[:, sp.owned], (grad_sq / stat.unsqueeze(-2))[:, sp.owned]
                parts = [own_sq.sum(dim=-1), own_t.sum(dim=-1), weight_sq]
            else:                                    # a vector's elements
                stat = state["exp_avg_sq"].mul(beta2t).add_(sq, alpha=1.0 - beta2t)
                update = stat.rsqrt().mul_(grad)
                parts = [update[sp.owned].square().sum().reshape(1), weight_sq]
            requests.append((torch.cat(parts), sp.group if sp.group is not None else sp.param_group))
            pending.append((item, grad, step, beta2t, sq, stat))
        sums = reduce(requests) if reduce is not None else [r for r, _ in requests]
        for (item, grad, step, beta2t, sq, stat), total in zip(pending, sums):
            self._finish_split(item, grad, step, beta2t, sq, stat, total)

    def _finish_split(self, item: Item, grad, step, beta2t, sq, stat, total) -> None:
        sp, state = item.split, item.state
        if not bool(torch.isfinite(total).all()):
            # a NaN/Inf on any rank reaches every rank's sums: all drop this update alike
            # (the optimizer's step skips such steps before the rule; per-layer immediate
            # mode cannot, see optim/layerwise.py)
            return
        state["RMS"] = (total[-1] / item.param_numel).sqrt()
        if sp.dim is None:
            update = _whole_direction(state, grad, sq, beta2t)
            self._finish(item, update, _rms(update), step)
            return
        rows, cols = sp.grad_shape[0], sp.grad_shape[-1]
        if grad.dim() >= 2 and sp.dim == 0:
            c = grad.shape[-1]
            col = state["exp_avg_sq_col"]
            col.mul_(beta2t).add_(total[:c] / rows, alpha=1.0 - beta2t)
            state["exp_avg_sq_row"].copy_(stat)
            row_mean = total[2 * c:2 * c + 1] / rows
            update = factored_direction(grad, stat, row_mean, col)
            update_sq = row_mean * (total[c:2 * c] / col).sum()
            update_rms = (update_sq / (rows * cols)).sqrt()
        elif grad.dim() >= 2:
            a = grad.shape[0]
            row = state["exp_avg_sq_row"]
            row.mul_(beta2t).add_(total[:a] / cols, alpha=1.0 - beta2t)
            state["exp_avg_sq_col"].copy_(stat)
            row_mean = row.mean(dim=-1, keepdim=True)
            update = factored_direction(grad, row, row_mean, stat)
            update_sq = row_mean * (total[a:2 * a] / row).sum()
            update_rms = (update_sq / (rows * cols)).sqrt()
        else:
            state["exp_avg_sq"].copy_(stat)
            update = stat.rsqrt().mul_(grad)
            update_rms = (total[0] / rows).sqrt()
        self._finish(item, update, update_rms, step)

    # ------------------------------------------------------------ shared tail
    @staticmethod
    def _finish(item: Item, update: torch.Tensor, update_rms: torch.Tensor, step: int) -> None:
        """Update clipping, lr, first moment, weight decay, and the write into the weight.
        `update_rms` is RMS(update) over the whole tensor."""
        group, state, p = item.group, item.state, item.param
        update.div_((update_rms / group["clip_threshold"]).clamp_(min=1.0))
        lr = lr_of(group, step, state["RMS"])
        update.mul_(lr)
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
            update = state["exp_avg"]
        if group["weight_decay"] != 0:
            p.add_(p, alpha=float(-group["weight_decay"] * lr))
        apply_update(item, update, -1.0)

    @staticmethod
    def init_state(item: Item) -> None:
        """Zero statistics shaped by the gradient block this rank holds, and the RMS slot (every
        update recomputes RMS(W) before it reads it): the state without an update, which with
        relative_step would move the weights whatever lr the caller set."""
        if "RMS" not in item.state:
            init_state(item.state, _rule_grad(item), item.group)
            item.state["RMS"] = torch.zeros((), dtype=torch.float32, device=item.grad.device)

    @staticmethod
    def rotate(state: dict, rot: torch.Tensor, right: bool) -> None:
        raise NotImplementedError("GaLoreAdafactor cannot reproject factored moments")

    @staticmethod
    def reset(state: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in state:
                state[key].zero_()
