"""FiraAdamW: GaLore's AdamW plus the residual it discards, scaled per channel (core/fira.py)."""
from __future__ import annotations

from typing import Any, Iterable

from galore_ds.core.fira import FiraRule
from galore_ds.core.settings import FAMILY, FIRA_KEYS, defaults_of
from galore_ds.optim.adamw import GaLoreAdamW


class FiraAdamW(GaLoreAdamW):
    """Fira (arXiv 2410.01623; the `fira` package's FiraAdamW) for groups that set `rank`:
    GaLoreAdamW's arguments and defaults, `scale` being fira's `alpha`. Groups without `rank`
    get plain AdamW.

    Fira's options (keywords here, per group too; defaults in core/settings.py: FamilySettings):
        norm_growth_limit: gamma of the norm-growth limiter (1.01); None turns it off.
        residual: "exact" (G - P P^T G, the paper's) or "scaled" (G - scale P P^T G, the fira
            package's code, which its published runs used): docs/family.md.

    It reads each GaLore matrix's full gradient: it runs on every layout GaLore does except the
    two that average only projected gradients (lowrank_comm_hook, reduce_group), which refuse
    it in one line (docs/family.md). Clipping (max_grad_norm) scales
    p.grad in place, as torch.nn.utils.clip_grad_norm_ does.
    """

    rule_type = FiraRule

    def __init__(self, params: Iterable, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **{**defaults_of(FIRA_KEYS, FAMILY), **kwargs})


__all__ = ["FiraAdamW"]
