"""GaLoreAdamW8bit: AdamW with bitsandbytes' blockwise 8-bit moments on the low-rank gradient."""
from __future__ import annotations

from typing import Any, Iterable

from galore_ds.core.adamw8bit import AdamW8bitRule, bnb_functional
from galore_ds.core.update import check_adam_hyperparameters
from galore_ds.optim.step import GaLoreOptimizer


class GaLoreAdamW8bit(GaLoreOptimizer):
    """8-bit AdamW (bitsandbytes blockwise) with GaLore projection for groups with `rank`.

    Tensors with fewer than `min_8bit_size` elements keep fp32 moments (bitsandbytes' rule).
    Groups without `rank` (embeddings, lm_head, norms) get plain 8-bit AdamW. Blocks are formed
    over the moments each rank holds, so a sharded run equals one process to within the
    quantisation, not bit for bit (core/adamw8bit.py).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
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
        bnb_functional()  # a missing extra is named here, not at the first step
        self.rule = AdamW8bitRule()
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        min_8bit_size=min_8bit_size, **galore_options)
        super().__init__(params, defaults, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         proj_type=proj_type, max_grad_norm=max_grad_norm, clip_timing=clip_timing,
                         reduce_group=reduce_group)
