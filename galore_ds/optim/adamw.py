"""GaLoreAdamW: AdamW whose moments live in each matrix's low-rank gradient subspace."""
from __future__ import annotations

from typing import Any, Iterable

from galore_ds.core.adamw import AdamWRule
from galore_ds.core.update import check_adam_hyperparameters
from galore_ds.optim.step import GaLoreOptimizer


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW with GaLore projection for groups that set `rank` (galore-torch's GaLoreAdamW).

    Defaults are galore-torch's (eps=1e-6, decoupled weight decay applied after the update).
    Groups without `rank` get plain AdamW in the same optimizer. Works on plain tensors,
    FSDP2/HSDP DTensors and DeepSpeed ZeRO partitions (galore_ds/layouts); GaLore options
    (refresh, signs, moments, stagger, ...) are keywords here and may be overridden per
    group; `max_grad_norm` and `reduce_group`: see GaLoreOptimizer.
    """

    rule_type: type = AdamWRule   # FiraAdamW and ApolloAdamW: AdamW's arguments, their own rule

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
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
        check_adam_hyperparameters(lr, betas, eps)
        self.rule = self.rule_type()
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, **galore_options)
        super().__init__(params, defaults, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         proj_type=proj_type, max_grad_norm=max_grad_norm, clip_timing=clip_timing,
                         reduce_group=reduce_group)
