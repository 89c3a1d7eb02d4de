"""GaLoreAdafactor: Adafactor (factored second moment) on the low-rank gradient."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from galore_ds.optim.base import GaLoreOptimizer, ParamItem


def _rms(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:  # fp32 accumulation without an fp32 copy of a bf16 weight
        return torch.linalg.vector_norm(t, dtype=torch.float32) / (t.numel() ** 0.5)
    return t.norm(2) / (t.numel() ** 0.5)


def factored_direction(grad: torch.Tensor, row: torch.Tensor, row_mean: torch.Tensor,
                       col: torch.Tensor) -> torch.Tensor:
    """grad scaled by Adafactor's factored second moment: grad / sqrt(row col^T / mean(row))."""
    r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
    return torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor (Shazeer & Stern 2018; galore-torch / transformers semantics) with GaLore.

    For a GaLore matrix the factored second moment is kept for the (m, r) or (r, n)
    low-rank gradient: m + r (or r + n) numbers. Weight decay is applied before the update
    (galore-torch's order). Use scale_parameter=False, relative_step=False and an explicit
    lr for a scheduled learning rate.
    """

    supported_moment_policies = ("keep", "reset")

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        **galore_options,
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError("lr is set and relative_step=True: pass relative_step=False for a manual lr")
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True requires relative_step=True")
        if lr is None and not relative_step:
            raise ValueError("relative_step=False needs an explicit lr")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init, **galore_options)
        super().__init__(params, defaults)

    @staticmethod
    def _lr(group: dict, step: int, rms: torch.Tensor) -> float | torch.Tensor:
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr = max(group["eps"][1], rms) * lr
        return lr

    def _init_state(self, state: dict, grad: torch.Tensor, group: dict) -> None:
        if "RMS" in state:
            return
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(grad)
        if grad.dim() >= 2:
            state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
            state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)

    def _rule_grad(self, item: ParamItem) -> torch.Tensor:
        """The gradient the rule consumes: low-rank (GaLore) or full, in fp32."""
        grad = self._low_rank_grad(item)
        return grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad

    def _update(self, item: ParamItem) -> None:
        group, state, p = item.group, item.state, item.param
        grad = self._rule_grad(item)
        self._init_state(state, grad, group)
        step = state["step"] + 1
        state["RMS"] = _rms(p)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grad**2 + group["eps"][0]
        if grad.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            update = factored_direction(grad, row, row.mean(dim=-1, keepdim=True), col)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = v.rsqrt().mul_(grad)
        self._finish(item, update, _rms(update), step)

    def _finish(self, item: ParamItem, update: torch.Tensor, update_rms: torch.Tensor, step: int) -> None:
        """Update clipping, lr, first moment, weight decay, and the write into the weight.
        `update_rms` is RMS(update) over the whole (possibly sharded) tensor."""
        group, state, p = item.group, item.state, item.param
        update.div_((update_rms / group["clip_threshold"]).clamp_(min=1.0))
        lr = self._lr(group, step, state["RMS"])
        update.mul_(lr)
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
            update = state["exp_avg"]
        if group["weight_decay"] != 0:
            p.add_(p, alpha=float(-group["weight_decay"] * lr))
        self._apply_update(item, update, -1.0)

    def _reset_moments(self, state: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in state:
                state[key].zero_()
