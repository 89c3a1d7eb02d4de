"""GaLoreAdafactor: Adafactor (factored second moment) on the low-rank gradient."""
from __future__ import annotations

from typing import Any, Iterable

from galore_ds.core.adafactor import AdafactorRule
from galore_ds.optim.step import GaLoreOptimizer


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor (Shazeer & Stern 2018; galore-torch / transformers semantics) with GaLore.

    Exact on every layout: its whole-matrix statistics are completed by one small all-reduce
    per step where a rank holds only part of a matrix (core/adafactor.py). Use
    scale_parameter=False, relative_step=False and an explicit lr for a scheduled learning rate.
    """

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
        *,
        rank: int | None = None,
        update_proj_gap: int | None = None,
        scale: float | None = None,
        proj_type: str | None = None,
        max_grad_norm: float | None = None,
        clip_timing: str = "exact",
        reduce_group: Any = None,
        **galore_options: Any,
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError("lr is set and relative_step=True: pass relative_step=False for a manual lr")
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True requires relative_step=True")
        if lr is None and not relative_step:
            raise ValueError("relative_step=False needs an explicit lr")
        self.rule = AdafactorRule()
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init, **galore_options)
        super().__init__(params, defaults, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         proj_type=proj_type, max_grad_norm=max_grad_norm, clip_timing=clip_timing,
                         reduce_group=reduce_group)
