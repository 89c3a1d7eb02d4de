"""ApolloAdamW: APOLLO and APOLLO-Mini, the full gradient scaled by Adam's moments of a random
projection of it (core/apollo.py)."""
from __future__ import annotations

from typing import Any, Iterable

from galore_ds.core.apollo import ApolloRule
from galore_ds.core.settings import APOLLO_KEYS, FAMILY, defaults_of
from galore_ds.optim.adamw import GaLoreAdamW


class ApolloAdamW(GaLoreAdamW):
    """APOLLO (arXiv 2412.05270; apollo-torch's APOLLOAdamW) for groups that set `rank`, with
    GaLoreAdamW's arguments. Groups without `rank` get plain AdamW.

        APOLLO:       ApolloAdamW(galore_ds.param_groups(model, rank=256), lr=1e-2)
        APOLLO-Mini:  ApolloAdamW(galore_ds.param_groups(model, rank=1), lr=1e-2,
                                  scale_type="tensor", scale=128)

    apollo-torch's group keys mean the same here (keywords, or per group):
        scale: the update is multiplied by sqrt(scale) (apollo-torch's meaning, not GaLore's);
            default 1 (FamilySettings.apollo_scale), 128 for APOLLO-Mini.
        scale_type: "channel" (one factor per row or column) or "tensor" (APOLLO-Mini).
        proj: "random" (a seeded Gaussian projection, redrawn every update_proj_gap steps) or
            "svd" (GaLore's).
    and galore_ds's:
        norm_growth_limit: gamma of Fira's limiter (1.01); None is apollo-torch's disable_nl.
        proj_seeds: "hashed" (seeded by (seed, parameter index, refresh index), drawn on the
            CPU: the same matrices on every device) or "apollo" (apollo-torch's seeds and device).

    It reads each GaLore matrix's full gradient: it runs on every layout GaLore does except the
    two that average only projected gradients (lowrank_comm_hook, reduce_group), which refuse
    it in one line (docs/family.md). Clipping (max_grad_norm) scales
    p.grad in place, as torch.nn.utils.clip_grad_norm_ does.
    """

    rule_type = ApolloRule

    def __init__(self, params: Iterable, *args: Any, scale: float | None = None, **kwargs: Any) -> None:
        super().__init__(params, *args, scale=FAMILY.apollo_scale if scale is None else scale,
                         **{**defaults_of(APOLLO_KEYS, FAMILY), **kwargs})


__all__ = ["ApolloAdamW"]
