"""Per-layer GaLore updates inside the FSDP2 backward, on several ranks.

    model = fully_shard(...)                               # Shard(0) row blocks
    opt = FSDPGaLoreAdamW(param_groups(model, rank=r), lr=lr)
    lw = FSDPLayerwiseOptimizer(opt, accumulation_steps=k, max_grad_norm=1.0, lr_scheduler=s)
    for micro_batch in window:                             # gradient sync ON every micro-batch
        (model(**micro_batch).loss / k).backward()
        if lw.step(): log(lw.grad_norm)

What runs where
---------------
FSDP2's `foreach_reduce` calls the post-accumulate-grad hooks of the *sharded* parameters
right after it assigns (or accumulates into) their reduce-scattered gradient shard, once per
micro-batch per parameter and in the same order on every rank. `LayerwiseOptimizer` hooks
there: each rank projects its own row block (R_i = G_i Q^T, m_i x r), accumulates it, frees
the shard, and (with neither clipping nor accumulation) updates its rows at once. Every
GaLore step is local on row shards (right projection; see fsdp.py), so the only
communication is:

- per optimizer step: ONE all_reduce of 2 floats (squared norms of the low-rank and the
  full gradient) over the shard group, in `lw.step()`. It makes the clip coefficient and
  the NaN/Inf decision global: a non-finite gradient on any rank skips the step on all.
  A rank with zero rows of every matrix contributes 0 and still joins.
- per refreshed matrix: the optimizer's owner collectives (one all_to_all_single of the row
  blocks to the owner, one all_gather of the new projector), issued from inside backward
  by the hook of the matrix being refreshed. Since hooks fire in the same order everywhere,
  the collectives match across ranks. Each refresh blocks until its projector is shared,
  so refreshes run one after the other (as on one GPU): use `stagger=True` to spread them
  over the update_proj_gap window.

Keep gradient sync on for every micro-batch (FSDP2's default): with
`set_requires_gradient_sync(False)` no reduce-scatter runs, no hook fires, and FSDP2 holds
an unsharded gradient for every parameter until the last micro-batch, which is the memory
this mode exists to save (results would still be exact).

Non-finite gradients: with clipping or accumulation (deferred mode) the all-reduced norm
decides, so the whole step is skipped on every rank. In immediate mode a rank drops only its
own update of the affected rows, but still advances the step count and keeps Q, so every
rank's refresh schedule (and collectives) stays aligned; see `_finite_or_restore`.

Numbers equal the single-process `LayerwiseOptimizer` over an unsharded model with a
`GaLoreAdamW(proj_type="right")` on the same global micro-batches (tests/dist/fsdp_cases.py).

HSDP: fully_shard on FSDP2's own 2-D (replicate, shard) mesh. FSDP2 then all-reduces each
gradient shard over the replicas right after its reduce-scatter and before the hook, so the
hook sees the replica-averaged rows; the norm and refresh collectives run over the shard
group only (replicas hold identical values and compute identical updates). The optimizer's
own low-rank replica all-reduce (fsdp.py, `replicate_group`) is a step-time collective and is
refused here: per-layer HSDP moves full gradient shards between replicas, as FSDP2 does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from galore_ds.distributed.common import COMM
from galore_ds.distributed.fsdp import FSDPGaLoreMixin, row_shard_info
from galore_ds.layerwise import LayerwiseOptimizer
from galore_ds.optim.base import GaLoreOptimizer, RefreshJob


def _shard_group(params: list[torch.Tensor]) -> dist.ProcessGroup | None:
    """The one process group every parameter is row-sharded over (None: nothing sharded).

    The norm all-reduce sums every parameter's squares once per shard, which is exact only when
    each parameter is split over that same group (replicas, if any, hold the same rows)."""
    group, ranks = None, None
    unsharded = 0
    for p in params:
        info = row_shard_info(p)
        if info is None:
            unsharded += 1
            continue
        pg_ranks = tuple(dist.get_process_group_ranks(info[0]))
        if ranks is None:
            group, ranks = info[0], pg_ranks
        elif pg_ranks != ranks:
            raise ValueError(
                f"FSDPLayerwiseOptimizer: parameters are sharded over different rank sets "
                f"({ranks} and {pg_ranks}); fully_shard every module on one mesh"
            )
    if group is not None and unsharded:
        raise ValueError(
            f"FSDPLayerwiseOptimizer: {unsharded} parameter(s) are not row-sharded (Shard(0)) "
            "while others are: fully_shard the root module too, so that every parameter and "
            "its gradient is split over the same ranks"
        )
    return group


class FSDPLayerwiseOptimizer(LayerwiseOptimizer):
    """`LayerwiseOptimizer` for FSDP2 row-sharded parameters (see the module docstring).

    Args: as `LayerwiseOptimizer`; `optimizer` must be an FSDP GaLore optimizer (fsdp.py) without
    `replicate_group` (for HSDP, shard on a 2-D mesh instead).
    """

    def __init__(self, optimizer: GaLoreOptimizer, *args: Any, **kwargs: Any) -> None:
        if not isinstance(optimizer, FSDPGaLoreMixin):
            raise TypeError(
                f"FSDPLayerwiseOptimizer needs FSDPGaLoreAdamW, FSDPGaLoreAdamW8bit or "
                f"FSDPGaLoreAdafactor, got "
                f"{type(optimizer).__name__}"
            )
        rep = getattr(optimizer, "replicate_group", None)
        if rep is not None and dist.get_world_size(rep) > 1:
            raise ValueError(
                "FSDPLayerwiseOptimizer: the optimizer's replicate_group (low-rank replica "
                "all-reduce at step time) does not apply inside backward; for HSDP, fully_shard "
                "on the 2-D (replicate, shard) mesh and build the optimizer without replicate_group"
            )
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.shard_group = _shard_group(params)
        super().__init__(optimizer, *args, **kwargs)
        # The FSDP optimizer maps a RefreshJob's index to its parameter through this list,
        # which its own step() builds in _collect (never called in per-layer mode). Same
        # order as _collect's and LayerwiseOptimizer's indices: groups, then positions.
        self.optimizer._index_params = list(self._params)  # type: ignore[attr-defined]

    def _global_sq(self, sq_low: torch.Tensor | None, sq_full: torch.Tensor | None) -> tuple[float, float]:
        """Sum the two local squared norms over the shard group: ONE 2-float all_reduce.
        Every rank calls it once per optimizer step, even one holding no rows."""
        local = torch.zeros(2, dtype=torch.float32, device=self._device())
        if sq_low is not None:
            local[0] = sq_low
        if sq_full is not None:
            local[1] = sq_full
        if self.shard_group is not None:
            dist.all_reduce(local, group=self.shard_group)
            COMM.record("layerwise_norm", local.numel() * local.element_size())
        low, full = local.tolist()
        return low, full

    def _refresh(self, job: RefreshJob) -> None:
        """The FSDP optimizer's owner (or subspace) refresh of one matrix, called from its
        hook inside backward on every rank in the same order. Row shards are always projected
        on the right (what the FSDP optimizer's _collect enforces in step-time mode)."""
        p = self._params[job.index]
        if row_shard_info(p) is not None:
            job.side = "right"
        self.optimizer._refresh([job])

    def _finite_or_restore(self, p: torch.Tensor, sq: torch.Tensor) -> bool:
        """Immediate mode (no clipping, one micro-batch): a non-finite gradient in this rank's
        rows drops only this rank's update of those rows. Unlike one process, the step count
        still advances and the projector (installed by a collective refresh) is kept: other
        ranks may hold finite rows of the same matrix and update them, and every rank must
        keep the same refresh schedule and Q, or the next refresh's collectives would not
        match. (Deferred mode decides on the all-reduced norm instead: whole step, all ranks.)
        `sq` is this rank's squared gradient norm (non-finite iff a NaN/Inf is present).
        An optimizer whose update is itself a collective (FSDPGaLoreAdafactor) must run it on
        every rank: its all-reduced statistics carry the NaN to all ranks, and it drops this
        matrix's update everywhere."""
        if bool(torch.isfinite(sq)) or getattr(self.optimizer, "collective_update", False):
            self._undo.pop(p, None)
            return True
        self._undo.pop(p, None)
        state = self.optimizer.state[p]
        state["step"] = state.get("step", 0) + 1
        p.grad = None
        self.nonfinite_params_skipped += 1
        return False

    def _device(self) -> torch.device:
        p = self._params[0] if self._params else None
        if p is None:
            return torch.device("cpu")
        return p.to_local().device if hasattr(p, "to_local") else p.device


__all__ = ["FSDPLayerwiseOptimizer"]
