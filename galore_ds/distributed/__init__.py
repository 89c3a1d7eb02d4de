"""Sharded GaLore: shared ownership/gather/share helpers (common), FSDP2 adapter (fsdp).

`galore_ds.distributed.common` is imported by both the FSDP2 and the DeepSpeed adapters;
its API (assign_owners, chunk_rows, gather_to_owners, share_from_owners, COMM,
count_collectives) is stable. The FSDP2 classes load lazily (they import torch FSDP).
"""
from galore_ds.distributed.common import (
    COMM,
    CommCounter,
    assign_owners,
    chunk_rows,
    count_collectives,
    flat_counts,
    gather_to_owners,
    share_from_owners,
    svd_cost,
)

__all__ = [
    "COMM", "CommCounter", "assign_owners", "chunk_rows", "count_collectives", "flat_counts",
    "gather_to_owners", "share_from_owners", "svd_cost",
    "FSDPGaLoreAdamW", "FSDPGaLoreAdamW8bit", "FSDPGaLoreMixin", "fsdp_optimizer",
]


def __getattr__(name):  # lazy: FSDP classes
    if name in ("FSDPGaLoreAdamW", "FSDPGaLoreAdamW8bit", "FSDPGaLoreMixin", "fsdp_optimizer"):
        from galore_ds.distributed import fsdp

        return getattr(fsdp, name)
    raise AttributeError(name)
