"""GaLore on FSDP2 (fully_shard) row shards: communication-free steps, owner refresh.

FSDP2 keeps every parameter and gradient as a DTensor split by rows (Shard(0), torch.chunk
sizes: 10 rows on 4 ranks = 3,3,3,1; a rank may hold 0 rows). With RIGHT projection
(Q: r x n, replicated) every GaLore step is local and exact on a row block G_i:

    R_i = G_i Q^T (m_i x r)     Adam moments m_i x r     W_i += -lr * alpha * N_i Q

so between refreshes the optimizer issues no collective at all (tests count them). Row-
sharded matrices are therefore always projected on the right, whatever their global shape
(left projection on row shards would need an r x n all-reduce every step). Use a single-
process GaLoreAdamW with proj_type="right" as the equivalent unsharded optimizer.

Refresh (every update_proj_gap steps), for all due matrices at once:
  refresh_mode="owner" (default): each matrix gets an owner (LPT on SVD cost); ONE
    all_to_all_single moves every row block to its owner, the owner computes the basis with
    the group's refresh method ("svd" exact, or "randomized"), ONE all_gather shares every
    new projector. Each SVD runs once in the world. Equal to the single-process optimizer.
  refresh_mode="subspace": distributed warm-started subspace iteration (group refresh must
    be "randomized"): the core's compute_basis runs on the local rows with the Gram
    operator X -> sum_i G_i^T (G_i X); all due matrices run in lockstep, so each iteration
    is ONE all-reduce of the packed n x r products, and no gradient is gathered. The first
    refresh (no basis to warm-start from) is an owner-path exact SVD, as in the single-
    process optimizer with refresh="randomized", which it equals.

GaLoreAdafactor (FSDPGaLoreAdafactor) is the one exception to "no collective between
refreshes": its rule normalises by whole-matrix statistics, so each step does one all-reduce
of O(r) floats per matrix (see the class).

HSDP (replicate x shard): pass `replicate_group` and fully_shard the model on the shard
mesh only. Gradients are then averaged over replicas by the optimizer in low rank: the
projected gradients R_i (m_i x r) and the non-GaLore gradients go in ONE all-reduce per
step (n/r less than all-reducing G), and the full gradients of due matrices in one more
all-reduce on refresh steps.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Any, Iterable

import torch
import torch.distributed as dist

from galore_ds import projector as pj
from galore_ds.distributed.common import (
    COMM,
    assign_owners,
    chunk_rows,
    flat_counts,
    gather_to_owners,
    share_from_owners,
    svd_cost,
)
from galore_ds.optim.adafactor import GaLoreAdafactor, factored_direction
from galore_ds.optim.adamw import GaLoreAdamW
from galore_ds.optim.adamw8bit import GaLoreAdamW8bit
from galore_ds.optim.base import ParamItem, RefreshJob

REFRESH_MODES = ("owner", "subspace")


def row_shard_info(p: torch.Tensor) -> tuple[dist.ProcessGroup, int, int] | None:
    """(process group, rank in it, its size) over which DTensor `p` is split by rows, or
    None when `p` is not row-sharded (plain tensor, replicated, or a size-1 shard mesh)."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return None
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for d, pl in enumerate(placements):
        if isinstance(pl, Shard):
            if pl.dim != 0:
                raise NotImplementedError(
                    f"GaLore on DTensor placement {pl}: only row sharding (Shard(0), FSDP2's "
                    "default) keeps steps local"
                )
            dims.append(d)
        elif not isinstance(pl, Replicate):
            raise NotImplementedError(f"GaLore on DTensor placement {pl}")
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("GaLore on a parameter row-sharded over several mesh dims")
    mesh, d = p.device_mesh, dims[0]
    size = mesh.size(d)
    if size == 1:
        return None
    return mesh.get_group(d), mesh.get_local_rank(d), size


class _LockstepGram:
    """Batches the Gram products of several subspace iterations running in threads: each
    round, once every live iteration waits in `gram`, the main thread all-reduces all their
    products (in job order) in one collective. Rounds are the same on every rank because
    every rank runs the same iterations on identical all-reduced values."""

    def __init__(self, pg, n: int) -> None:
        self.pg = pg
        self.cv = threading.Condition()
        self.live = n
        self.pending: dict[int, torch.Tensor] = {}
        self.results: dict[int, torch.Tensor] = {}
        self.error: BaseException | None = None

    def operator(self, i: int, g: torch.Tensor):
        def gram(x: torch.Tensor) -> torch.Tensor:
            local = g.t() @ (g @ x)
            with self.cv:
                self.pending[i] = local
                self.cv.notify_all()
                self.cv.wait_for(lambda: i in self.results)
                return self.results.pop(i)
        return gram

    def finish(self) -> None:
        with self.cv:
            self.live -= 1
            self.cv.notify_all()

    def drive(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: len(self.pending) == self.live)
                if self.live == 0:
                    return
                batch = sorted(self.pending.items())
                self.pending.clear()
            flat = torch.cat([t.reshape(-1) for _, t in batch])
            dist.all_reduce(flat, group=self.pg)
            COMM.record("subspace_gram", flat.numel() * flat.element_size())
            parts = torch.split(flat, [t.numel() for _, t in batch])
            with self.cv:
                for (i, t), part in zip(batch, parts):
                    self.results[i] = part.reshape(t.shape)
                self.cv.notify_all()


class FSDPGaLoreMixin:
    """Put before a GaLore optimizer class: overrides side choice, `_refresh` and (HSDP) the
    gradient reduction. Extra keywords: refresh_mode, replicate_group."""

    def __init__(self, params: Iterable, *args: Any, refresh_mode: str = "owner",
                 replicate_group: dist.ProcessGroup | None = None, **kwargs: Any) -> None:
        if refresh_mode not in REFRESH_MODES:
            raise ValueError(f"refresh_mode={refresh_mode!r}: expected one of {REFRESH_MODES}")
        self.refresh_mode = refresh_mode
        self.replicate_group = replicate_group
        self._index_params: list[torch.Tensor] = []
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            if "rank" not in group:
                continue
            if refresh_mode == "subspace" and group["refresh"] != "randomized":
                raise ValueError(
                    "refresh_mode='subspace' is distributed subspace iteration: set the group's "
                    "refresh='randomized' (its single-process equivalent)"
                )
            if group["proj_type"] == "left" and any(row_shard_info(p) for p in group["params"]):
                raise ValueError(
                    "proj_type='left' on row-sharded (FSDP2) parameters needs an r x n "
                    "all-reduce every step; use 'std' or 'right' (row shards are projected on "
                    "the right)"
                )

    # ------------------------------------------------------------------ collect
    def _collect(self) -> tuple[list[ParamItem], list[RefreshJob]]:
        self._index_params = [p for g in self.param_groups for p in g["params"]]
        items, jobs = super()._collect()
        for job in jobs:
            if row_shard_info(self._index_params[job.index]) is not None:
                job.side = "right"  # row shards: the only side with local steps
        return items, jobs

    # ------------------------------------------------------------------ refresh
    def _refresh(self, jobs: list[RefreshJob]) -> None:
        local: list[RefreshJob] = []
        sharded: dict[Any, list[tuple[RefreshJob, tuple]]] = defaultdict(list)
        for job in jobs:
            info = row_shard_info(self._index_params[job.index])
            if info is None:
                local.append(job)
            else:
                sharded[info[0]].append((job, info))
        if local:
            super()._refresh(local)  # replicated or unsharded: same gradient everywhere
        # every rank sees the same groups (same params), in parameter order
        for pg, entries in sharded.items():
            if self.refresh_mode == "owner":
                self._owner_refresh(pg, entries)
            else:
                self._subspace_refresh(pg, entries)

    def _owner_refresh(self, pg, entries: list[tuple[RefreshJob, tuple]]) -> None:
        jobs = [e[0] for e in entries]
        rank, world = entries[0][1][1], entries[0][1][2]
        shapes = [tuple(j.global_shape) for j in jobs]
        owners = assign_owners([svd_cost(s) for s in shapes], world)
        counts = []
        for job, s in zip(jobs, shapes):
            rows = chunk_rows(s[0], world)
            if job.item.grad.shape[0] != rows[rank]:
                raise RuntimeError(
                    f"FSDP2 shard of a {s} matrix has {job.item.grad.shape[0]} rows on rank "
                    f"{rank}, expected torch.chunk's {rows[rank]}"
                )
            counts.append(flat_counts(s, rows))
        fulls = gather_to_owners([j.item.grad for j in jobs], counts, owners, shapes, group=pg)
        bases = [
            self._compute_basis(job, full) if full is not None else None
            for job, full in zip(jobs, fulls)
        ]
        dims = [(job.item.group["rank"], s[1] if job.side == "right" else s[0])
                for job, s in zip(jobs, shapes)]
        device = jobs[0].item.grad.device
        shared = share_from_owners(bases, dims, owners, group=pg, device=device)
        for job, basis in zip(jobs, shared):
            self._set_projector(job, basis)

    def _subspace_refresh(self, pg, entries: list[tuple[RefreshJob, tuple]]) -> None:
        """Distributed subspace iteration: the core's own `compute_basis` (warm iteration,
        or Rayleigh-Ritz with oversampling) on the local rows, with the Gram operator
        X -> sum_i G_i^T (G_i X). All due matrices run in lockstep so that each round of
        Gram products is ONE packed all-reduce. A matrix without a previous basis (the first
        refresh) has nothing to warm-start from: it takes the owner path (exact SVD), which
        is what the single-process optimizer does too."""
        cold = [e for e in entries if "proj" not in e[0].item.state]
        warm = [e for e in entries if "proj" in e[0].item.state]
        if cold:
            self._owner_refresh(pg, cold)
        if not warm:
            return
        jobs = [e[0] for e in warm]
        batch = _LockstepGram(pg, len(jobs))
        bases: list[torch.Tensor | None] = [None] * len(jobs)

        def run(i: int, job: RefreshJob) -> None:
            try:
                g = pj.to_right(job.item.grad, job.side).float()
                bases[i] = self._compute_basis(job, job.item.grad, gram=batch.operator(i, g))
            except Exception as exc:  # noqa: BLE001 - re-raised on the main thread
                batch.error = exc
            finally:
                batch.finish()

        threads = [threading.Thread(target=run, args=(i, job), daemon=True)
                   for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        batch.drive()
        for t in threads:
            t.join()
        if batch.error is not None:
            raise batch.error
        for job, basis in zip(jobs, bases):
            if basis is not None and not bool(torch.isfinite(basis).all()):
                self.galore_stats["nonfinite_refresh_skipped"] += 1
                basis = None
            self._set_projector(job, basis)

    # ------------------------------------------------------------------ HSDP
    @torch.no_grad()
    def step(self, closure=None):
        if self.replicate_group is None or dist.get_world_size(self.replicate_group) == 1:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reps = dist.get_world_size(self.replicate_group)
        items, jobs = self._collect()
        if jobs:
            # the refresh needs the replica-averaged full gradient of due matrices
            grads = [job.item.grad for job in jobs]
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat, group=self.replicate_group)
            COMM.record("hsdp_refresh_grad", flat.numel() * flat.element_size())
            flat.div_(reps)
            for job, part in zip(jobs, torch.split(flat, [g.numel() for g in grads])):
                job.item.grad = part.reshape(job.item.grad.shape).to(job.item.grad.dtype)
            self._refresh(jobs)
        # ONE all-reduce of every projected (GaLore: m_i x r) or full (other) gradient
        lows = [self._low_rank_grad(item) for item in items]
        if lows:
            flat = torch.cat([g.reshape(-1).float() for g in lows])
            dist.all_reduce(flat, group=self.replicate_group)
            COMM.record("hsdp_low_rank", flat.numel() * flat.element_size())
            flat.div_(reps)
            for item, low, part in zip(items, lows, torch.split(flat, [g.numel() for g in lows])):
                item.lowrank_grad = part.reshape(low.shape).to(low.dtype)
                if not item.galore:
                    item.grad = item.lowrank_grad
        self._update_items(items)
        for item in items:
            item.state["step"] += 1
        return loss


class FSDPGaLoreAdamW(FSDPGaLoreMixin, GaLoreAdamW):
    """GaLoreAdamW for FSDP2 (fully_shard) parameters; see the module docstring."""


class FSDPGaLoreAdamW8bit(FSDPGaLoreMixin, GaLoreAdamW8bit):
    """GaLoreAdamW8bit for FSDP2 parameters. The 8-bit blocks are formed per rank (over the
    local m_i x r moments), so it is not bitwise equal to a single-process run."""


class FSDPGaLoreAdafactor(FSDPGaLoreMixin, GaLoreAdafactor):
    """GaLoreAdafactor for FSDP2 parameters, equal to the single-process optimizer.

    Unlike Adam, Adafactor normalises by statistics of the whole matrix: the column means of
    the squared (low-rank) gradient, the mean of the row statistic, RMS(update) for update
    clipping and RMS(weight). On row shards each rank computes its partial sums and ONE
    all-reduce per step sums them for every row-sharded tensor at once: 2c + 2 floats for a
    matrix whose rule sees c columns (c = r for GaLore matrices), 2 floats for a vector,
    a few KB for a whole model. RMS(update) comes from the same all-reduce, since
    sum(update^2) = mean(row) * sum_j S_j / col_j with S_j = sum_i grad_ij^2 / row_i.
    A non-finite sum drops that tensor's update on every rank (counted in
    galore_stats["nonfinite_update_skipped"]); no rank writes NaN into its rows.
    """

    #: the update itself is a collective: every rank must call it for every parameter
    collective_update = True

    def __init__(self, params: Iterable, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self.galore_stats["nonfinite_update_skipped"] = 0

    def _update_items(self, items: list[ParamItem]) -> None:
        sharded: dict[Any, list[ParamItem]] = defaultdict(list)
        for item in items:
            info = row_shard_info(item.source) if item.source is not None else None
            if info is None:
                self._update(item)  # whole tensor here: the single-process rule
            else:
                sharded[info[0]].append(item)
        for pg, group_items in sharded.items():  # same groups, same order on every rank
            self._sharded_updates(pg, group_items)

    def _sharded_updates(self, pg: dist.ProcessGroup, items: list[ParamItem]) -> None:
        partial, pending = [], []
        for item in items:
            group, state = item.group, item.state
            grad = self._rule_grad(item)
            self._init_state(state, grad, group)
            step = state["step"] + 1
            beta2t = 1.0 - math.pow(step, group["decay_rate"])
            grad_sq = grad.square()
            sq = grad_sq + group["eps"][0]
            weight_sq = torch.linalg.vector_norm(item.param, dtype=torch.float32).square()
            # The new row/vector statistics are local; they are written to the state only
            # once the sums are known to be finite.
            if grad.dim() >= 2:
                row = state["exp_avg_sq_row"].mul(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
                partial += [sq.sum(dim=-2), (grad_sq / row.unsqueeze(-1)).sum(dim=-2),
                            row.sum().reshape(1), weight_sq.reshape(1)]
                pending.append((item, grad, step, beta2t, row, None))
            else:
                v = state["exp_avg_sq"].mul(beta2t).add_(sq, alpha=1.0 - beta2t)
                update = v.rsqrt().mul_(grad)
                partial += [update.square().sum().reshape(1), weight_sq.reshape(1)]
                pending.append((item, grad, step, beta2t, v, update))
        flat = torch.cat(partial)
        dist.all_reduce(flat, group=pg)
        COMM.record("adafactor_stats", flat.numel() * flat.element_size())
        all_finite = bool(torch.isfinite(flat).all())
        offset = 0
        for item, grad, step, beta2t, stat, update in pending:
            cols = grad.shape[-1] if update is None else 0
            sums = flat[offset:offset + 2 * cols + 2]
            offset += 2 * cols + 2
            if not all_finite and not bool(torch.isfinite(sums).all()):
                self.galore_stats["nonfinite_update_skipped"] += 1
                continue
            state, shape = item.state, item.source.shape
            state["RMS"] = (sums[-1] / item.source.numel()).sqrt()
            if update is None:
                rows = shape[0]
                col = state["exp_avg_sq_col"]
                col.mul_(beta2t).add_(sums[:cols] / rows, alpha=1.0 - beta2t)
                state["exp_avg_sq_row"].copy_(stat)
                row_mean = sums[-2:-1] / rows
                update = factored_direction(grad, stat, row_mean, col)
                update_sq = row_mean * (sums[cols:2 * cols] / col).sum()
                update_rms = (update_sq / (rows * cols)).sqrt()
            else:
                state["exp_avg_sq"].copy_(stat)
                update_rms = (sums[0] / item.source.numel()).sqrt()
            self._finish(item, update, update_rms, step)


_BY_NAME = {"adamw": FSDPGaLoreAdamW, "galoreadamw": FSDPGaLoreAdamW,
            "adamw8bit": FSDPGaLoreAdamW8bit, "galoreadamw8bit": FSDPGaLoreAdamW8bit,
            "adafactor": FSDPGaLoreAdafactor, "galoreadafactor": FSDPGaLoreAdafactor}


def fsdp_optimizer(name: str, params: Iterable, **kwargs: Any):
    """Build the FSDP2 GaLore optimizer by name ("adamw" | "adamw8bit" | "adafactor")."""
    key = name.lower().replace("_", "").replace("-", "")
    if key not in _BY_NAME:
        raise ValueError(f"optimizer {name!r} on FSDP2: expected one of adamw, adamw8bit, adafactor")
    return _BY_NAME[key](params, **kwargs)
